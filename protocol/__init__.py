"""corral's protocols: what crosses a boundary between corrald, its guests,
its callers and its operators, and how it is encoded.

Three rooms, each importing only from the ones listed before it (and the
standard library):

- ``protocol.channel``  the guest channel between corrald and the guest agent:
  framing, the bounded binary codec, the message vocabulary, bounds, errors,
  the capability table. Ships into the guest: standard library only.
- ``protocol.wire``     what callers and operators say to corrald over ZeroMQ:
  the envelope, task and status messages, error codes, outcomes, operator
  messages, signed receipts. Host side (cryptography for receipts).
- ``protocol.client``   the caller's and the operator's side: the Python
  ``Client``, the ``corral`` command line, ``corral admin``. Uses zmq.

At the top, host side: ``protocol.hostcrc`` (crcmod's CRC-32 for the host's
frame codec) and ``protocol.bench`` (decoder throughput). Nothing in
protocol/ imports actors/: corrald builds on the protocols, not the reverse.

The formats are documented byte by byte in docs/protocol.md.
"""
