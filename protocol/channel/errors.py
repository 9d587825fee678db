"""Exception tree of the guest-channel protocol.

Every error a peer can provoke on the channel is a ``ProtocolError``; each
class carries a machine-readable ``code`` for metrics and task error replies.
The tree says who is at fault and where the bytes went wrong:

    ProtocolError
    ├── FrameError          the byte stream is not a valid frame sequence
    ├── PayloadError        a frame's payload is not a valid message
    └── UnexpectedMessage   a valid message that is not allowed here
        ├── WrongExec           output or an exit for an exec that is not running
        ├── OutputOutOfOrder    an output chunk that does not start where its stream ends
        └── OutputAfterExit     an output chunk of an exec that has exited
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every protocol violation."""

    code: str = "protocol_error"


# --- framing ---------------------------------------------------------------

class FrameError(ProtocolError):
    """The byte stream does not form valid frames."""

    code = "frame_error"


class BadMagic(FrameError):
    """A frame header does not start with the magic number."""

    code = "bad_magic"


class FrameTooLarge(FrameError):
    """A frame declares (or would need) a payload over the allowed maximum."""

    code = "frame_too_large"


class CrcMismatch(FrameError):
    """The payload's CRC-32 differs from the one in its header."""

    code = "crc_mismatch"


class SequenceError(FrameError):
    """A frame's sequence id is not the expected one (gap or replay)."""

    code = "bad_sequence"

    def __init__(self, expected: int, got: int) -> None:
        kind = "replay" if got < expected else "gap"
        super().__init__(f"sequence {kind}: expected {expected}, got {got}")
        self.expected = expected
        self.got = got

    def __reduce__(self):
        # args holds the message, not the constructor's arguments.
        return (type(self), (self.expected, self.got))


class TruncatedFrame(FrameError):
    """The stream ended inside a frame header or payload."""

    code = "truncated_frame"


class StalledFrame(FrameError):
    """A frame in progress did not complete within its time: the peer started a
    frame (even half a header) and stopped or trickled (protocol.frame.FrameClock)."""

    code = "stalled_frame"


class DecoderPoisoned(FrameError):
    """The decoder was used after an error (or after eof): no resynchronising."""

    code = "decoder_poisoned"


# --- payload ---------------------------------------------------------------

class PayloadError(ProtocolError):
    """A frame's payload does not decode to a valid message."""

    code = "payload_error"


class UnknownMessageType(PayloadError):
    """The payload's type id names no message."""

    code = "unknown_message_type"


class MalformedPayload(PayloadError):
    """A field cannot be read: short payload, bad bool byte, bad UTF-8, bad value."""

    code = "malformed_payload"


class FieldTooLong(PayloadError):
    """A length or count is over its field's bound."""

    code = "field_too_long"


class TrailingBytes(PayloadError):
    """Bytes are left over after the message's last field."""

    code = "trailing_bytes"


# --- protocol state --------------------------------------------------------

class UnexpectedMessage(ProtocolError):
    """A well-formed message that is not allowed here (wrong direction or state)."""

    code = "unexpected_message"


class WrongExec(UnexpectedMessage):
    """An Output or Exit names an exec other than the one running."""

    code = "wrong_exec"


class OutputOutOfOrder(UnexpectedMessage):
    """An Output's offset is not the bytes of its stream received so far: a
    gap, an overlap or a chunk sent twice."""

    code = "output_out_of_order"


class OutputAfterExit(UnexpectedMessage):
    """An Output of an exec whose Exit came already."""

    code = "output_after_exit"
