"""The egress port's vocabulary (docs/egress.md): a net:egress VM's second
virtio-serial port carries the TCP connections its tasks open to the guest's
proxy address, each as a numbered stream, to the host's EgressProxy, which
alone decides where each may go.

Same frames as the agent's channel (protocol/channel/frame.py: magic, length,
CRC, sequence ids per direction) on a port of its own, with these messages
only; type ids 24-27 of the guest range, used nowhere else. The guest opens
streams (odd or even does not matter: only it opens); either side sends data,
an end of its data (half-close) or a close. Ships in the guest: standard
library and this room only.
"""

from __future__ import annotations

from protocol.channel.codec import U32, Bytes, Message, field, message

PORT_NAME = "org.corral.egress.0"
# Where tasks find the proxy in the guest (the relay listens there; tasks get it
# as http_proxy / https_proxy).
PROXY_HOST = "127.0.0.1"
PROXY_PORT = 3128
MAX_CHUNK = 64 * 1024  # one StreamData's bytes
MAX_STREAMS = 64  # open at once per VM; more are closed at once

_HOST = "host"
_GUEST = "guest"


@message(24, _GUEST)
class StreamOpen(Message):
    """A task connected to the proxy address: stream `stream` begins."""

    stream: int = field(U32)


@message(25, _HOST, _GUEST)
class StreamData(Message):
    stream: int = field(U32)
    data: bytes = field(Bytes(MAX_CHUNK, min_len=1))


@message(26, _HOST, _GUEST)
class StreamEof(Message):
    """The sender has no more data for this stream (it may still receive)."""

    stream: int = field(U32)


@message(27, _HOST, _GUEST)
class StreamClose(Message):
    """The stream is over, both ways; the id is not used again."""

    stream: int = field(U32)


GUEST_SENDS = frozenset({StreamOpen, StreamData, StreamEof, StreamClose})
HOST_SENDS = frozenset({StreamData, StreamEof, StreamClose})
