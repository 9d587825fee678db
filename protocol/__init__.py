"""Wire protocol of the guest channel (SecureChannel).

Imported by the host daemon and by the guest agent, so every module here is
standard-library only, except ``protocol.hostcrc`` (host side, uses crcmod).

- ``protocol.channel.errors``   one exception tree rooted at ``ProtocolError``
- ``protocol.channel.frame``    16-byte framed stream: ``FrameEncoder``/``FrameDecoder``
- ``protocol.channel.messages`` bounded binary message codec and the message vocabulary
- ``protocol.hostcrc``  crcmod's CRC-32 for the host
- ``protocol.bench``    decoder throughput measurement

The format is documented byte by byte in docs/protocol.md.
"""
