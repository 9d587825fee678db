"""The ZeroMQ envelope every caller and operator payload travels in.

A DEALER sends and receives three frames, [b"", TAG, payload]: an empty
delimiter (what a REQ socket would put there), the protocol's tag
(protocol.wire.tasks.PROTOCOL_TAG for callers, protocol.wire.control.CONTROL_TAG
for operators) and one encoded message (protocol.channel.codec). corrald's
ROUTER sees the connection's routing id in front of those frames and puts it
back in front of its answer: ``[routing_id, *build(TAG, payload)]`` out,
``parse(TAG, frames[1:])`` in.

A tag that differs is another protocol or another version: it is refused
with the frames, never guessed at.
"""

from __future__ import annotations

from typing import Sequence


class MalformedEnvelope(Exception):
    """Frames that are not [b"", tag, payload] for the expected tag."""


def build(tag: bytes, payload: bytes) -> list[bytes]:
    """The frames a DEALER sends (or a ROUTER sends after the routing id)."""
    return [b"", tag, payload]


def parse(tag: bytes, frames: Sequence[bytes]) -> bytes:
    """The payload of [b"", tag, payload]; MalformedEnvelope for anything else."""
    if len(frames) != 3 or frames[0] != b"" or frames[1] != tag:
        raise MalformedEnvelope(f"expected [empty, {tag.decode()}, payload] frames")
    return frames[2]
