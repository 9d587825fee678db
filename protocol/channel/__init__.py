"""The guest channel: what corrald and the guest agent say to each other over
one VM's virtio-serial port, and how it is framed and encoded.

This room ships into the guest: guest/image/build.py puts every module of
this folder on the agent ISO, where Debian's bare python3 runs it. So a module
here imports the standard library and protocol.channel only
(tests/protocol/test_imports.py checks), and as little of it as it can:
every import costs the guest's boot time under TCG.

- ``frame``         16-byte framed stream: FrameEncoder, FrameDecoder, FrameClock
- ``codec``         the bounded binary codec: wire types, Message, @message, encode, decode
- ``messages``      the vocabulary (Hello, Exec, Output, Exit, ...) and who sends which
- ``constants``     the bounds (MAX_*) and the output stream numbers
- ``errors``        one exception tree rooted at ProtocolError
- ``capabilities``  the capability table (read by the image build and the host too)
"""
