"""Tests of protocol.channel.frame: framing, verification order, memory bounds."""

from __future__ import annotations

import os
import pickle
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.channel import errors
from protocol.channel.errors import (
    BadMagic,
    CrcMismatch,
    DecoderPoisoned,
    FrameTooLarge,
    ProtocolError,
    SequenceError,
    StalledFrame,
    TruncatedFrame,
)
from protocol.channel.frame import HEADER, HEADER_SIZE, MAGIC, MAX_PAYLOAD, FrameClock, FrameDecoder, FrameEncoder
from protocol.hostcrc import crc32 as crcmod_crc32

CRCS = {"zlib": zlib.crc32, "crcmod": crcmod_crc32}
BOUNDED = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

payload_lists = st.lists(st.binary(max_size=300), max_size=12)


def encode_all(payloads, crc=zlib.crc32, first_seq=0) -> bytes:
    encoder = FrameEncoder(crc, first_seq=first_seq)
    return b"".join(encoder.encode(p) for p in payloads)


def header(length: int, crc: int = 0, seq: int = 0, magic: int = MAGIC) -> bytes:
    return HEADER.pack(magic, length, crc, seq)


def feed_in_pieces(decoder: FrameDecoder, stream: bytes, cuts) -> list[bytes]:
    out: list[bytes] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        out += decoder.feed(stream[start:cut])
        start = cut
    return out


# --- round trips ------------------------------------------------------------------

@pytest.mark.parametrize("crc_name", sorted(CRCS))
@BOUNDED
@given(payloads=payload_lists, data=st.data())
def test_round_trip_random_chunking(crc_name, payloads, data):
    crc = CRCS[crc_name]
    stream = encode_all(payloads, crc)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    decoder = FrameDecoder(crc)
    assert feed_in_pieces(decoder, stream, cuts) == payloads
    decoder.eof()
    assert decoder.frames_decoded == len(payloads)
    assert decoder.bytes_decoded == len(stream)


@BOUNDED
@given(payloads=payload_lists)
def test_round_trip_one_byte_feeds(payloads):
    stream = encode_all(payloads)
    decoder = FrameDecoder(zlib.crc32)
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i:i + 1])
    assert out == payloads
    decoder.eof()


@BOUNDED
@given(payloads=payload_lists)
def test_reading_exactly_wanted_bytes_yields_one_frame_per_payload_step(payloads):
    stream = memoryview(encode_all(payloads))
    decoder = FrameDecoder(zlib.crc32)
    out, pos = [], 0
    while pos < len(stream):
        want = decoder.wanted
        assert want > 0 or decoder.buffered == HEADER_SIZE
        frames = decoder.feed(stream[pos:pos + want])
        pos += want
        assert len(frames) <= 1
        out += frames
    assert out == payloads
    assert decoder.wanted == HEADER_SIZE


def test_whole_stream_in_one_feed_accepts_bytearray_and_memoryview():
    payloads = [b"", b"a", os.urandom(70_000), b"tail"]
    stream = encode_all(payloads)
    assert FrameDecoder(zlib.crc32).feed(bytearray(stream)) == payloads
    assert FrameDecoder(zlib.crc32).feed(memoryview(stream)) == payloads
    # A non-byte memoryview is read as its raw bytes.
    padded = stream + b"\0" * (-len(stream) % 4)
    decoder = FrameDecoder(zlib.crc32)
    assert decoder.feed(memoryview(padded).cast("I")) == payloads
    assert decoder.buffered == len(padded) - len(stream)


def test_feed_does_not_keep_views_of_callers_buffer():
    frame = encode_all([b"hello"])
    for data in (frame, frame[:3], bytearray(frame[:-1]) + bytes([frame[-1] ^ 1])):
        buf = bytearray(data)
        try:
            FrameDecoder(zlib.crc32).feed(buf)
        except ProtocolError:
            pass
        buf.clear()  # BufferError if the decoder still held an export


def test_counters_and_sequence_start():
    decoder = FrameDecoder(zlib.crc32, first_seq=41)
    assert decoder.feed(encode_all([b"x", b"yz"], first_seq=41)) == [b"x", b"yz"]
    assert (decoder.frames_decoded, decoder.bytes_decoded, decoder.expected_seq) == (2, 2 * HEADER_SIZE + 3, 43)


def test_sequence_wraps_to_zero_on_both_sides():
    encoder = FrameEncoder(zlib.crc32, first_seq=0xFFFFFFFF)
    stream = encoder.encode(b"last") + encoder.encode(b"first")
    assert struct.unpack_from("!I", stream, HEADER_SIZE + 4 + 12)[0] == 0
    decoder = FrameDecoder(zlib.crc32, first_seq=0xFFFFFFFF)
    assert decoder.feed(stream) == [b"last", b"first"]


def test_partial_header_buffers_at_most_a_header_and_one_payload():
    payloads = [os.urandom(1000), os.urandom(5000)]
    stream = encode_all(payloads)
    decoder = FrameDecoder(zlib.crc32)
    cut = HEADER_SIZE + 1000 + HEADER_SIZE + 123
    assert decoder.feed(stream[:cut]) == payloads[:1]
    assert decoder.buffered == 123
    assert decoder.wanted == 5000 - 123
    assert decoder.feed(stream[cut:]) == payloads[1:]


# --- garbage ----------------------------------------------------------------------

def test_bad_magic_raised_after_exactly_four_bytes():
    stream = header(0, magic=0xDEADBEEE)
    decoder = FrameDecoder(zlib.crc32)
    for i in range(3):
        assert decoder.feed(stream[i:i + 1]) == []
    with pytest.raises(BadMagic):
        decoder.feed(stream[3:4])


def test_bad_magic_in_a_whole_header():
    with pytest.raises(BadMagic):
        FrameDecoder(zlib.crc32).feed(b"GET / HTTP/1.1\r\n\r\n")


def test_bad_magic_after_good_frames():
    stream = encode_all([b"ok"]) + b"\xde\xad\xbe\xee"
    decoder = FrameDecoder(zlib.crc32)
    with pytest.raises(BadMagic):
        decoder.feed(stream)


def _feed_garbage(decoder: FrameDecoder, stream: bytes, cuts, max_payload: int) -> None:
    start = 0
    try:
        for cut in sorted(set(cuts)) + [len(stream)]:
            decoder.feed(stream[start:cut])
            start = cut
            assert decoder.buffered + decoder.wanted <= HEADER_SIZE + max_payload
        decoder.eof()
    except ProtocolError:
        pass
    # Poisoned or closed now, either way: only ProtocolError, never resync.
    with pytest.raises(DecoderPoisoned):
        decoder.feed(b"\0")


@BOUNDED
@given(garbage=st.binary(max_size=600), data=st.data())
def test_random_garbage_only_raises_protocol_errors_and_stays_bounded(garbage, data):
    max_payload = 256
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=10))
    _feed_garbage(FrameDecoder(zlib.crc32, max_payload=max_payload), garbage, cuts, max_payload)


@BOUNDED
@given(
    length=st.integers(0, 2**32 - 1) | st.integers(0, 300),
    crc=st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2) | st.integers(0, 2**32 - 1),
    body=st.binary(max_size=600),
    data=st.data(),
)
def test_garbage_behind_a_valid_magic_only_raises_protocol_errors(length, crc, seq, body, data):
    max_payload = 256
    stream = header(length, crc, seq) + body
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    _feed_garbage(FrameDecoder(zlib.crc32, max_payload=max_payload), stream, cuts, max_payload)


# --- truncation -------------------------------------------------------------------

def test_eof_inside_a_frame_raises_truncated_at_every_cut():
    payloads = [b"abc", b"", b"defghij"]
    stream = encode_all(payloads)
    boundaries = {0, HEADER_SIZE + 3, 2 * HEADER_SIZE + 3, len(stream)}
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder(zlib.crc32)
        decoder.feed(stream[:cut])
        if cut in boundaries:
            decoder.eof()
        else:
            with pytest.raises(TruncatedFrame):
                decoder.eof()
        with pytest.raises(DecoderPoisoned):
            decoder.feed(stream[cut:])


# --- oversize ---------------------------------------------------------------------

def test_oversize_declared_length_rejected_from_header_alone_without_allocating():
    decoder = FrameDecoder(zlib.crc32)
    huge = header(0xFFFFFFF0)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            decoder.feed(huge)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert decoder.buffered == 0


def test_oversize_rejected_byte_by_byte_before_any_payload():
    decoder = FrameDecoder(zlib.crc32, max_payload=100)
    stream = header(101) + b"x" * 101
    for i in range(HEADER_SIZE - 1):
        decoder.feed(stream[i:i + 1])
    with pytest.raises(FrameTooLarge):
        decoder.feed(stream[HEADER_SIZE - 1:])


def test_max_payload_is_inclusive():
    payload = b"y" * 100
    assert FrameDecoder(zlib.crc32, max_payload=100).feed(encode_all([payload])) == [payload]


def test_payload_buffer_grows_with_the_bytes_received_not_the_declared_length():
    # A header declaring 1 MiB followed by 10 bytes costs about 10 bytes.
    length = 1 << 20
    decoder = FrameDecoder(zlib.crc32)
    tracemalloc.start()
    try:
        decoder.feed(header(length) + b"z" * 10)
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 4 * 1024
        assert (decoder.buffered, decoder.wanted, decoder.declared_length) == (10, length - 10, length)
        # Fed on in 64 KiB steps, what it holds follows what arrived (plus the
        # bytearray's growth margin, at most 1/8), never the declared length.
        received = 10
        for _ in range(8):
            decoder.feed(b"z" * (64 * 1024))
            received += 64 * 1024
            current, _ = tracemalloc.get_traced_memory()
            assert decoder.buffered == received
            assert received <= current < received * 9 // 8 + 64 * 1024
    finally:
        tracemalloc.stop()


def test_a_payload_never_grows_past_its_declared_length():
    payload = os.urandom(1000)
    stream = encode_all([payload, b"next"])
    decoder = FrameDecoder(zlib.crc32)
    assert decoder.feed(stream[:HEADER_SIZE + 999]) == []
    assert decoder.buffered == 999 and decoder.wanted == 1
    # The rest of this frame and the whole next one in one feed: the first
    # buffer takes exactly one byte more, the next frame is copied out whole.
    assert decoder.feed(stream[HEADER_SIZE + 999:]) == [payload, b"next"]
    assert decoder.buffered == 0 and decoder.declared_length is None


def test_in_frame_and_declared_length_follow_the_stream():
    stream = encode_all([b"abc", b""])
    decoder = FrameDecoder(zlib.crc32)
    assert not decoder.in_frame and decoder.declared_length is None
    decoder.feed(stream[:1])
    assert decoder.in_frame and decoder.declared_length is None  # inside a header
    decoder.feed(stream[1:HEADER_SIZE])
    assert decoder.in_frame and decoder.declared_length == 3 and decoder.buffered == 0
    decoder.feed(stream[HEADER_SIZE:HEADER_SIZE + 3])
    assert not decoder.in_frame
    assert decoder.feed(stream[HEADER_SIZE + 3:]) == [b""]  # an empty payload ends with its header
    assert not decoder.in_frame and decoder.frames_decoded == 2


def test_encoder_refuses_oversize_payload():
    encoder = FrameEncoder(zlib.crc32)
    with pytest.raises(FrameTooLarge):
        encoder.encode(bytes(MAX_PAYLOAD + 1))
    assert encoder.next_seq == 0  # a refused payload uses no sequence id


def test_constructor_arguments_are_checked():
    with pytest.raises(ValueError):
        FrameDecoder(zlib.crc32, max_payload=MAX_PAYLOAD + 1)
    with pytest.raises(ValueError):
        FrameEncoder(zlib.crc32, first_seq=2**32)
    with pytest.raises(TypeError):
        FrameDecoder(None)


# --- CRC and sequence -------------------------------------------------------------

@BOUNDED
@given(payload=st.binary(min_size=1, max_size=200), data=st.data())
def test_one_flipped_payload_bit_is_a_crc_mismatch(payload, data):
    stream = bytearray(encode_all([payload]))
    bit = data.draw(st.integers(0, len(payload) * 8 - 1))
    stream[HEADER_SIZE + bit // 8] ^= 1 << (bit % 8)
    decoder = FrameDecoder(zlib.crc32)
    with pytest.raises(CrcMismatch):
        decoder.feed(stream)


def test_sequence_gap_and_replay():
    encoder = FrameEncoder(zlib.crc32)
    first, second, third = (encoder.encode(p) for p in (b"1", b"2", b"3"))

    gap = FrameDecoder(zlib.crc32)
    assert gap.feed(first) == [b"1"]
    with pytest.raises(SequenceError, match="expected 1, got 2") as info:
        gap.feed(third)
    assert (info.value.expected, info.value.got) == (1, 2)

    replay = FrameDecoder(zlib.crc32)
    assert replay.feed(first + second) == [b"1", b"2"]
    with pytest.raises(SequenceError, match="replay: expected 2, got 1"):
        replay.feed(second)


def test_sequence_checked_before_payload_arrives():
    decoder = FrameDecoder(zlib.crc32)
    with pytest.raises(SequenceError):
        decoder.feed(header(1000, seq=5))


def test_rebase_moves_both_ends_to_a_new_base_between_frames():
    encoder = FrameEncoder(zlib.crc32)
    decoder = FrameDecoder(zlib.crc32)
    assert decoder.feed(encoder.encode(b"before")) == [b"before"]
    encoder.rebase(0xFFFFFFFF)
    decoder.rebase(0xFFFFFFFF)
    assert (encoder.next_seq, decoder.expected_seq) == (0xFFFFFFFF, 0xFFFFFFFF)
    stream = encoder.encode(b"after") + encoder.encode(b"wrapped")
    assert struct.unpack_from("!I", stream, 12)[0] == 0xFFFFFFFF
    assert decoder.feed(stream) == [b"after", b"wrapped"]
    assert decoder.expected_seq == encoder.next_seq == 1


def test_after_a_rebase_the_old_count_is_refused():
    old = FrameEncoder(zlib.crc32)
    decoder = FrameDecoder(zlib.crc32)
    assert decoder.feed(old.encode(b"0")) == [b"0"]
    decoder.rebase(0x12345678)
    with pytest.raises(SequenceError, match="expected 305419896, got 1") as info:
        decoder.feed(old.encode(b"1"))  # what the stream would have carried without the rebase
    assert (info.value.expected, info.value.got) == (0x12345678, 1)


def test_rebase_is_refused_inside_a_frame_and_on_a_closed_decoder():
    stream = encode_all([b"abc"])
    for cut in (1, HEADER_SIZE, HEADER_SIZE + 1):  # in the header, at its end, in the payload
        decoder = FrameDecoder(zlib.crc32)
        decoder.feed(stream[:cut])
        with pytest.raises(ValueError, match="inside a frame"):
            decoder.rebase(9)
        assert decoder.expected_seq == (1 if cut >= HEADER_SIZE else 0)  # unchanged
    decoder = FrameDecoder(zlib.crc32)
    with pytest.raises(SequenceError):
        decoder.feed(header(0, seq=3))
    with pytest.raises(DecoderPoisoned):
        decoder.rebase(3)


@pytest.mark.parametrize("bad", [-1, 2**32, "1", None])
def test_rebase_values_are_checked(bad):
    with pytest.raises(ValueError):
        FrameEncoder(zlib.crc32).rebase(bad)
    with pytest.raises(ValueError):
        FrameDecoder(zlib.crc32).rebase(bad)


def test_sequence_error_pickles():
    error = pickle.loads(pickle.dumps(SequenceError(3, 9)))
    assert (error.expected, error.got, str(error)) == (3, 9, "sequence gap: expected 3, got 9")


# --- poisoning --------------------------------------------------------------------

def test_decoder_poisoned_after_error_even_for_good_data():
    decoder = FrameDecoder(zlib.crc32)
    with pytest.raises(BadMagic):
        decoder.feed(b"\0" * 4)
    good = encode_all([b"fine"])
    with pytest.raises(DecoderPoisoned, match="BadMagic"):
        decoder.feed(good)
    with pytest.raises(DecoderPoisoned):
        decoder.eof()


def test_error_drops_the_partial_payload_buffer():
    decoder = FrameDecoder(zlib.crc32)
    decoder.feed(header(1 << 20) + b"a")
    with pytest.raises(TruncatedFrame):
        decoder.eof()
    assert decoder.buffered == 0
    assert decoder._payload is None  # the 1 MiB buffer is released with the channel


def test_feed_after_clean_eof_is_refused():
    decoder = FrameDecoder(zlib.crc32)
    decoder.feed(encode_all([b"done"]))
    decoder.eof()
    with pytest.raises(DecoderPoisoned, match="eof"):
        decoder.feed(encode_all([b"more"], first_seq=1))


# --- CRC implementations ------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=4096))
def test_crcmod_crc32_equals_zlib_crc32(data):
    assert crcmod_crc32(data) == zlib.crc32(data)


def test_crc32_check_value():
    assert crcmod_crc32(b"123456789") == zlib.crc32(b"123456789") == 0xCBF43926


@BOUNDED
@given(payloads=payload_lists)
def test_frames_cross_decode_between_crc_implementations(payloads):
    assert FrameDecoder(zlib.crc32).feed(encode_all(payloads, crcmod_crc32)) == payloads
    assert FrameDecoder(crcmod_crc32).feed(encode_all(payloads, zlib.crc32)) == payloads


# --- FrameClock: how long a frame in progress may take ------------------------------

def clocked(base_s=1.0, rate=1000.0):
    return FrameDecoder(zlib.crc32), FrameClock(base_s, rate)


def test_the_clock_runs_only_inside_a_frame():
    decoder, clock = clocked()
    clock.update(decoder, 10.0)
    assert clock.deadline is None
    decoder.feed(encode_all([b"whole"]))  # a frame in one feed never starts the clock
    clock.update(decoder, 10.0)
    assert clock.deadline is None
    clock.check(decoder, 1e9)  # nothing in progress: never stalled


def test_half_a_header_gets_the_base_time():
    decoder, clock = clocked(base_s=1.0)
    decoder.feed(header(500)[:7])
    clock.update(decoder, 10.0)
    assert clock.deadline == 11.0
    clock.check(decoder, 10.99)
    with pytest.raises(StalledFrame, match="7 of 16 header bytes"):
        clock.check(decoder, 11.0)


def test_a_declared_length_adds_its_time_at_the_guaranteed_rate():
    decoder, clock = clocked(base_s=1.0, rate=1000.0)
    decoder.feed(header(500)[:4])
    clock.update(decoder, 10.0)
    decoder.feed(header(500)[4:] + b"x" * 10)
    clock.update(decoder, 10.5)
    assert clock.deadline == pytest.approx(11.5)  # from the first byte: 1 s + 500 B at 1000 B/s
    decoder.feed(b"x" * 100)
    clock.update(decoder, 11.0)  # progress does not move the deadline: a trickle is bounded too
    assert clock.deadline == pytest.approx(11.5)
    with pytest.raises(StalledFrame, match="110 of 500 payload bytes"):
        clock.check(decoder, 11.5)


def test_time_held_by_the_reader_does_not_count():
    decoder, clock = clocked(base_s=1.0, rate=1000.0)
    decoder.feed(header(1000) + b"x")
    clock.update(decoder, 10.0)
    assert clock.deadline == pytest.approx(12.0)
    clock.hold(10.5)
    assert clock.deadline is None  # held: no deadline to wake up for
    clock.hold(11.0)  # holding twice keeps the first start
    clock.release(13.5)
    assert clock.deadline == pytest.approx(15.0)  # moved on by the 3 s held
    clock.check(decoder, 14.9)
    with pytest.raises(StalledFrame):
        clock.check(decoder, 15.0)


def test_a_new_frame_gets_a_fresh_clock_and_no_credit_for_time_held_before_it():
    decoder, clock = clocked(base_s=1.0, rate=1000.0)
    stream = encode_all([b"a" * 100, b"b" * 100])
    decoder.feed(stream[:HEADER_SIZE + 50])
    clock.update(decoder, 10.0)
    assert clock.deadline == pytest.approx(11.1)
    decoder.feed(stream[HEADER_SIZE + 50:HEADER_SIZE + 100 + 3])  # the first ends, the next begins
    clock.update(decoder, 10.6)
    assert clock.deadline == pytest.approx(11.6)
    clock.hold(10.7)
    decoder.feed(stream[HEADER_SIZE + 100 + 3:])  # read while held (a paused VM's last bytes)
    clock.update(decoder, 20.0)
    assert clock.deadline is None
    clock.release(30.0)
    assert clock.deadline is None  # nothing in progress


def test_clock_arguments_are_checked():
    with pytest.raises(ValueError):
        FrameClock(0, 1000)
    with pytest.raises(ValueError):
        FrameClock(1, 0)


# --- errors --------------------------------------------------------------------------

def test_every_error_has_a_distinct_code_under_one_root():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, ProtocolError) for c in classes)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)) == 18
