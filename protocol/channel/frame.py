"""Framing of the guest channel: a 16-byte header, then the payload.

Header, network byte order (``HEADER``):

    offset 0   u32  magic            0xDEADBEEF
    offset 4   u32  payload length   at most MAX_PAYLOAD (or the decoder's max)
    offset 8   u32  CRC-32           of the payload only
    offset 12  u32  sequence id      first_seq, then +1 per frame, mod 2**32

The CRC function is always passed in (``crc``): the host passes
``protocol.hostcrc.crc32`` (crcmod), the guest ``zlib.crc32``. Both compute the
same CRC-32. It catches accidents, not attacks: a hostile peer computes it too.

Sequence ids wrap from 2**32 - 1 to 0 on both sides; at one frame per
microsecond that takes over an hour, and a replay would still need the exact
wrapped id, so wrapping is simpler than a hard stop and loses nothing.

``rebase(next_seq)`` moves either end to a new base between frames: a Resume
(protocol/channel/messages.py) does it on both sides at one agreed frame, so
that clones of one snapshot each continue from random sequence ids.
"""

from __future__ import annotations

import struct

from protocol.channel.errors import (
    BadMagic,
    CrcMismatch,
    DecoderPoisoned,
    FrameTooLarge,
    SequenceError,
    StalledFrame,
    TruncatedFrame,
)

TYPE_CHECKING = False  # typing costs the guest's boot (protocol/channel/codec.py): for type checkers only
if TYPE_CHECKING:
    from typing import Callable

    Crc32 = Callable[[bytes], int]

MAGIC = 0xDEADBEEF
HEADER = struct.Struct("!IIII")  # magic, payload length, CRC-32 of payload, sequence id
HEADER_SIZE = 16
MAX_PAYLOAD = 16 * 1024 * 1024

_MAGIC_BYTES = MAGIC.to_bytes(4, "big")
_MAGIC_SIZE = len(_MAGIC_BYTES)
_SEQ_MASK = 0xFFFFFFFF

assert HEADER.size == HEADER_SIZE


def _check_seq(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= _SEQ_MASK:
        raise ValueError(f"{what} must be an int in [0, 2**32), got {value!r}")
    return value


class FrameEncoder:
    """Wraps payloads in frames with increasing sequence ids (one per direction)."""

    __slots__ = ("_crc", "next_seq")

    def __init__(self, crc: Crc32, first_seq: int = 0) -> None:
        if not callable(crc):
            raise TypeError("crc must be a CRC-32 function such as zlib.crc32")
        self._crc = crc
        self.next_seq = _check_seq(first_seq, "first_seq")

    def encode(self, payload: bytes) -> bytes:
        """Return header + payload; raises FrameTooLarge over MAX_PAYLOAD."""
        length = len(payload)
        if length > MAX_PAYLOAD:
            raise FrameTooLarge(f"payload of {length} bytes exceeds {MAX_PAYLOAD}")
        header = HEADER.pack(MAGIC, length, self._crc(payload), self.next_seq)
        self.next_seq = (self.next_seq + 1) & _SEQ_MASK
        return b"".join((header, payload))

    def rebase(self, next_seq: int) -> None:
        """The next frame carries ``next_seq``, and counting goes on from there."""
        self.next_seq = _check_seq(next_seq, "next_seq")


class FrameDecoder:
    """Incremental, verify-then-parse decoder of a frame stream.

    ``feed(data)`` returns the payloads of the frames that ``data`` completes.
    Checks, each as early as the bytes allow: magic once the first 4 header
    bytes are in; length <= max_payload and the sequence id once the header
    is complete (before any payload byte is buffered or allocated); the CRC
    once the payload is complete, before the payload is returned.

    Memory: at most HEADER_SIZE bytes of header plus the payload bytes of the
    current frame received so far: the payload buffer grows by what arrives,
    never past the validated declared length, so a peer that declares 1 MiB and
    sends 10 bytes costs 10 bytes, not 1 MiB. ``data`` is consumed in place,
    never appended to a buffer; a frame lying wholly inside one ``data`` chunk
    is copied out once, without staging.

    Any error poisons the decoder: later calls raise DecoderPoisoned, payloads
    completed earlier in the failing call are dropped with the channel, and
    nothing tries to resynchronise. ``eof()`` also closes the decoder.
    """

    __slots__ = (
        "_crc",
        "_max_payload",
        "_expected_seq",
        "_header",
        "_header_have",
        "_payload",
        "_payload_length",
        "_payload_crc",
        "_closed_reason",
        "frames_decoded",
        "bytes_decoded",
    )

    def __init__(self, crc: Crc32, max_payload: int = MAX_PAYLOAD, first_seq: int = 0) -> None:
        if not callable(crc):
            raise TypeError("crc must be a CRC-32 function such as zlib.crc32")
        if not isinstance(max_payload, int) or not 0 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in [0, {MAX_PAYLOAD}], got {max_payload!r}")
        self._crc = crc
        self._max_payload = max_payload
        self._expected_seq = _check_seq(first_seq, "first_seq")
        self._header = bytearray(HEADER_SIZE)
        self._header_have = 0
        self._payload: bytearray | None = None  # None while reading a header
        self._payload_length = 0  # declared, validated length of the payload in progress
        self._payload_crc = 0
        self._closed_reason: str | None = None
        self.frames_decoded = 0
        self.bytes_decoded = 0  # wire bytes (header + payload) of completed frames

    @property
    def wanted(self) -> int:
        """Bytes still needed to complete the current header or payload."""
        payload = self._payload
        if payload is None:
            return HEADER_SIZE - self._header_have
        return self._payload_length - len(payload)

    @property
    def buffered(self) -> int:
        """Bytes held for the frame in progress (received, not yet returned).
        Safe to read from another thread (a stats reader): one read of the buffer."""
        payload = self._payload
        return self._header_have + (len(payload) if payload is not None else 0)

    @property
    def declared_length(self) -> int | None:
        """The validated declared payload length of the frame whose payload is
        in progress; None while reading a header (or between frames)."""
        return self._payload_length if self._payload is not None else None

    @property
    def in_frame(self) -> bool:
        """True from a frame's first header byte until its last payload byte."""
        return self._payload is not None or self._header_have > 0

    @property
    def expected_seq(self) -> int:
        return self._expected_seq

    def rebase(self, next_seq: int) -> None:
        """Expect ``next_seq`` on the next frame from now on: a frame with the
        old count is then a SequenceError like any replay. Only between frames
        (ValueError inside one: its header was checked against the old count,
        so the caller must treat bytes there as the peer's violation first)."""
        if self._closed_reason is not None:
            raise DecoderPoisoned(f"decoder unusable: {self._closed_reason}")
        if self.in_frame:
            raise ValueError("cannot rebase inside a frame")
        self._expected_seq = _check_seq(next_seq, "next_seq")

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume ``data``; return the payloads of every frame it completes."""
        if self._closed_reason is not None:
            raise DecoderPoisoned(f"decoder unusable: {self._closed_reason}")
        # Release our views on return, so a caller's bytearray can be resized
        # even while a traceback keeps this frame alive.
        with memoryview(data) as raw, raw.cast("B") as view:
            try:
                return self._consume(view)
            except BaseException as exc:
                self._close(f"earlier error {type(exc).__name__}: {exc}")
                raise

    def eof(self) -> None:
        """Declare end of stream; raises TruncatedFrame inside a frame."""
        if self._closed_reason is not None:
            raise DecoderPoisoned(f"decoder unusable: {self._closed_reason}")
        if self._payload is not None:
            have, length = len(self._payload), self._payload_length
            self._close("eof inside a payload")
            raise TruncatedFrame(f"stream ended after {have} of {length} payload bytes")
        if self._header_have:
            have = self._header_have
            self._close("eof inside a header")
            raise TruncatedFrame(f"stream ended after {have} of {HEADER_SIZE} header bytes")
        self._close("eof() was called")

    def _close(self, reason: str) -> None:
        self._closed_reason = reason
        self._payload = None  # a hostile peer must not keep a large buffer pinned
        self._header_have = 0

    def _consume(self, view: memoryview) -> list[bytes]:
        frames: list[bytes] = []
        pos, end = 0, len(view)
        while pos < end:
            if self._payload is not None:
                pos = self._fill_payload(view, pos, end, frames)
                continue
            if self._header_have == 0 and end - pos >= HEADER_SIZE:
                header = HEADER.unpack_from(view, pos)  # whole header at hand
                pos += HEADER_SIZE
            else:
                have = self._header_have
                take = min(HEADER_SIZE - have, end - pos)
                self._header[have:have + take] = view[pos:pos + take]
                pos += take
                self._header_have = have = have + take
                if have >= _MAGIC_SIZE > have - take:  # magic just completed
                    self._check_magic(self._header)
                if have < HEADER_SIZE:
                    break
                header = HEADER.unpack_from(self._header)
                self._header_have = 0
            length, payload_crc = self._check_header(*header)
            if end - pos >= length:
                # Payload wholly in this chunk: verify in place, copy out once.
                with view[pos:pos + length] as payload_view:
                    self._finish_frame(payload_view, payload_crc, frames)
                pos += length
            else:
                # Grown by what arrives (_fill_payload), not allocated as declared.
                self._payload = bytearray()
                self._payload_length = length
                self._payload_crc = payload_crc
        return frames

    def _fill_payload(self, view: memoryview, pos: int, end: int, frames: list[bytes]) -> int:
        payload = self._payload
        take = min(self._payload_length - len(payload), end - pos)
        payload += view[pos:pos + take]
        if len(payload) == self._payload_length:
            self._payload = None
            self._finish_frame(payload, self._payload_crc, frames)
        return pos + take

    @staticmethod
    def _check_magic(header: bytes | bytearray | memoryview) -> None:
        if header[:_MAGIC_SIZE] != _MAGIC_BYTES:
            got = bytes(header[:_MAGIC_SIZE]).hex()
            raise BadMagic(f"bad magic 0x{got}, expected 0x{MAGIC:08X}")

    def _check_header(self, magic: int, length: int, payload_crc: int, seq: int) -> tuple[int, int]:
        if magic != MAGIC:
            raise BadMagic(f"bad magic 0x{magic:08X}, expected 0x{MAGIC:08X}")
        if length > self._max_payload:
            raise FrameTooLarge(f"declared payload of {length} bytes exceeds {self._max_payload}")
        if seq != self._expected_seq:
            raise SequenceError(self._expected_seq, seq)
        self._expected_seq = (seq + 1) & _SEQ_MASK
        return length, payload_crc

    def _finish_frame(self, payload: bytearray | memoryview, payload_crc: int, frames: list[bytes]) -> None:
        actual = self._crc(payload)
        if actual != payload_crc:
            raise CrcMismatch(
                f"payload CRC-32 0x{actual:08X} != header 0x{payload_crc:08X} "
                f"(sequence {(self._expected_seq - 1) & _SEQ_MASK})"
            )
        frames.append(bytes(payload))
        self.frames_decoded += 1
        self.bytes_decoded += HEADER_SIZE + len(payload)


class FrameClock:
    """How long the frame in progress on one channel may take to arrive.

    A frame may take ``base_s`` from its first header byte, plus its declared
    payload length at ``rate_bytes_per_s`` once its header is in: so half a
    header gets ``base_s``, and a 1 MiB frame at 1 MiB/s gets ``base_s + 1``.
    Time the reader chose not to read (``hold``/``release``: its own rate
    limit, a memory cap, a VM the host paused) does not count: the deadline
    moves on by as long. The reader calls ``update`` after every ``feed`` and
    ``check`` when its wake-up for ``deadline`` comes; times are the reader's
    monotonic clock, passed in.

    This bounds a trickle as well as a stop: a peer must deliver each frame at
    about the guaranteed rate, so a frame in progress pins its bytes for
    seconds, not for the task timeout.
    """

    __slots__ = ("base_s", "rate_bytes_per_s", "_frame", "_deadline", "_sized", "_held_since")

    def __init__(self, base_s: float, rate_bytes_per_s: float) -> None:
        if not base_s > 0:
            raise ValueError(f"base_s must be > 0, got {base_s!r}")
        if not rate_bytes_per_s > 0:
            raise ValueError(f"rate_bytes_per_s must be > 0, got {rate_bytes_per_s!r}")
        self.base_s = float(base_s)
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self._frame: int | None = None  # decoder.frames_decoded when the frame in progress began
        self._deadline = 0.0  # as if it is never held again
        self._sized = False  # the declared length's time is added
        self._held_since: float | None = None

    @property
    def deadline(self) -> float | None:
        """When the frame in progress must be complete; None if there is none or while held."""
        if self._frame is None or self._held_since is not None:
            return None
        return self._deadline

    def update(self, decoder: FrameDecoder, now: float) -> None:
        """Start, size or clear the clock from the decoder's state after a feed."""
        if not decoder.in_frame:
            self._frame = None
            return
        if self._frame != decoder.frames_decoded:  # a new frame began in the last feed
            self._frame = decoder.frames_decoded
            self._deadline = now + self.base_s
            self._sized = False
            if self._held_since is not None:
                self._held_since = now  # time held before this frame began is no credit
        length = decoder.declared_length
        if length is not None and not self._sized:
            self._sized = True
            self._deadline += length / self.rate_bytes_per_s

    def hold(self, now: float) -> None:
        """The reader stops reading: the clock stops too."""
        if self._held_since is None:
            self._held_since = now

    def release(self, now: float) -> None:
        """The reader reads again: the deadline moves on by the time held."""
        if self._held_since is not None:
            self._deadline += max(0.0, now - self._held_since)
            self._held_since = None

    def check(self, decoder: FrameDecoder, now: float) -> None:
        """Raise StalledFrame if the frame in progress is past its deadline."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return
        length = decoder.declared_length
        have = decoder.buffered
        where = (f"{have} of {HEADER_SIZE} header bytes" if length is None
                 else f"{have} of {length} payload bytes")
        allowed = self.base_s + (length or 0) / self.rate_bytes_per_s
        seq = (decoder.expected_seq - (length is not None)) & _SEQ_MASK  # past its header: counted
        raise StalledFrame(f"frame (sequence {seq}) "
                           f"stalled at {where}: not complete within {allowed:.2f} s of reading")
