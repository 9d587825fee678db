"""Tests of protocol.wire.envelope: the [b"", TAG, payload] frames around every
caller and operator payload."""

from __future__ import annotations

import pytest

from protocol.wire import envelope
from protocol.wire.control import CONTROL_TAG
from protocol.wire.tasks import PROTOCOL_TAG


@pytest.mark.parametrize("tag", [PROTOCOL_TAG, CONTROL_TAG])
def test_build_gives_the_three_frames_and_parse_takes_the_payload_back(tag):
    frames = envelope.build(tag, b"payload")
    assert frames == [b"", tag, b"payload"]
    assert envelope.parse(tag, frames) == b"payload"
    assert envelope.parse(tag, envelope.build(tag, b"")) == b""  # an empty payload is the codec's to refuse


MALFORMED = {
    "no frames": [],
    "one empty frame": [b""],
    "tag only": [b"", PROTOCOL_TAG],
    "no delimiter": [PROTOCOL_TAG, b"payload"],
    "delimiter not empty": [b"x", PROTOCOL_TAG, b"payload"],
    "another protocol": [b"", b"corral/0", b"payload"],
    "the operators' tag": [b"", CONTROL_TAG, b"payload"],
    "extra frame": [b"", PROTOCOL_TAG, b"payload", b"more"],
    "routing id left on": [b"caller", b"", PROTOCOL_TAG, b"payload"],
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_anything_else_is_one_error_naming_the_expected_frames(frames):
    with pytest.raises(envelope.MalformedEnvelope, match=r"expected \[empty, corral/1, payload\] frames"):
        envelope.parse(PROTOCOL_TAG, frames)
