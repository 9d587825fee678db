"""Tests of the guest channel's messages (protocol.channel.messages) through the
schema-driven payload codec (protocol.channel.codec) and their bounds."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.channel import codec, constants, messages as m
from protocol.channel.errors import (
    FieldTooLong,
    MalformedPayload,
    PayloadError,
    TrailingBytes,
    UnexpectedMessage,
    UnknownMessageType,
)
from protocol.channel.codec import Bool, Bytes, BytesList, Integer, Pairs, Str

BOUNDED = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MESSAGES = sorted(m.ALL_MESSAGES, key=lambda cls: cls.TYPE_ID)
SMALL = 24  # sizes hypothesis draws; the bounds themselves are tested separately


# --- an independent writer: the wire format as docs/protocol.md states it ----------

def raw_field(wire, value) -> bytes:
    """Encode without any checks, so tests can build payloads the codec must reject."""
    if isinstance(wire, Integer):
        return value.to_bytes(wire.max_size, "big", signed=wire.min_value < 0)
    if isinstance(wire, Bool):
        return bytes([value])  # an int here lets a test write a bad bool byte
    if isinstance(wire, Str) and isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(wire, Bytes):
        return struct.pack("!I", len(value)) + value
    if isinstance(wire, BytesList):
        return struct.pack("!H", len(value)) + b"".join(raw_field(wire.item, v) for v in value)
    if isinstance(wire, Pairs):
        return struct.pack("!H", len(value)) + b"".join(
            raw_field(wire.key, k) + raw_field(wire.value, v) for k, v in value)
    raise AssertionError(f"no raw writer for {wire!r}")


def raw_payload(cls, **overrides) -> bytes:
    values = {name: overrides.get(name, minimal_value(wire)) for name, wire in cls.SCHEMA}
    return bytes([cls.TYPE_ID]) + b"".join(raw_field(wire, values[name]) for name, wire in cls.SCHEMA)


# --- values and strategies built from the schema --------------------------------------

def minimal_value(wire):
    if isinstance(wire, Integer):
        return min(wire.choices) if wire.choices else 0
    if isinstance(wire, Bool):
        return False
    if isinstance(wire, Str):
        return ""
    if isinstance(wire, Bytes):
        return b"\0" * wire.min_len
    if isinstance(wire, BytesList):
        return (b"",) * wire.min_count
    if isinstance(wire, Pairs):
        return ()
    raise AssertionError(wire)


def minimal_message(cls):
    return cls(**{name: minimal_value(wire) for name, wire in cls.SCHEMA})


def strategy_for(wire):
    if isinstance(wire, Integer):
        if wire.choices:
            return st.sampled_from(sorted(wire.choices))
        return st.integers(wire.min_value, wire.max_value)
    if isinstance(wire, Bool):
        return st.booleans()
    if isinstance(wire, Str):
        return st.text(max_size=min(wire.max_len // 4, SMALL))  # <= 4 UTF-8 bytes a char
    if isinstance(wire, Bytes):
        return st.binary(min_size=wire.min_len, max_size=max(wire.min_len, min(wire.max_len, SMALL)))
    if isinstance(wire, BytesList):
        return st.lists(strategy_for(wire.item), min_size=wire.min_count, max_size=4).map(tuple)
    if isinstance(wire, Pairs):
        return st.lists(st.tuples(strategy_for(wire.key), strategy_for(wire.value)), max_size=4).map(tuple)
    raise AssertionError(wire)


def message_strategy(cls):
    return st.builds(cls, **{name: strategy_for(wire) for name, wire in cls.SCHEMA})


any_message = st.one_of(*(message_strategy(cls) for cls in MESSAGES))


def over_bound_cases():
    """(class, field, value one over a bound) for every length and count bound."""
    for cls in MESSAGES:
        for name, wire in cls.SCHEMA:
            if isinstance(wire, Str):
                yield cls, name, "bytes", "x" * (wire.max_len + 1)
            elif isinstance(wire, Bytes):
                yield cls, name, "bytes", b"x" * (wire.max_len + 1)
            elif isinstance(wire, BytesList):
                yield cls, name, "count", (b"",) * (wire.max_count + 1)
                yield cls, name, "item", (b"x" * (wire.item.max_len + 1),)
            elif isinstance(wire, Pairs):
                yield cls, name, "count", ((b"", b""),) * (wire.max_count + 1)
                yield cls, name, "key", ((b"k" * (wire.key.max_len + 1), b""),)
                yield cls, name, "value", ((b"", b"v" * (wire.value.max_len + 1)),)


def at_bound(value):
    """The same shape as an over-bound value, exactly at the bound."""
    if isinstance(value, (str, bytes)):
        return value[:-1]
    if len(value) > 1:
        return value[:-1]
    (item,) = value
    if isinstance(item, bytes):
        return (item[:-1],)
    return (tuple(part[:-1] if len(part) > 1 else part for part in item),)


OVER_BOUND = list(over_bound_cases())
OVER_BOUND_IDS = [f"{cls.__name__}.{name}.{what}" for cls, name, what, _ in OVER_BOUND]


# --- round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@BOUNDED
@given(data=st.data())
def test_round_trip_every_message(cls, data):
    msg = data.draw(message_strategy(cls))
    payload = codec.encode(msg)
    assert payload[0] == cls.TYPE_ID
    assert codec.decode(payload) == msg
    assert codec.decode(bytearray(payload)) == msg
    assert codec.decode(memoryview(payload)) == msg
    # The independent writer agrees byte for byte with the codec.
    assert raw_payload(cls, **{name: getattr(msg, name) for name, _ in cls.SCHEMA}) == payload


def test_known_encoding():
    payload = codec.encode(m.Output(exec_id=7, stream=constants.STDERR, offset=0, data=b"hi"))
    assert payload == bytes.fromhex("03" "00000007" "02" "0000000000000000" "00000002") + b"hi"
    exit_payload = codec.encode(m.Exit(1, -1, 9, True, False, True, 2, 3, 4, 5))
    assert exit_payload == bytes.fromhex("04 00000001 ffffffff 09 01 00 01 00000002 00000003 00000004 00000005 00")


def test_every_message_is_a_frozen_slotted_dataclass_with_a_docstring():
    ids = [cls.TYPE_ID for cls in MESSAGES]
    assert ids == list(range(1, 16))
    for cls in MESSAGES:
        msg = minimal_message(cls)
        assert not hasattr(msg, "__dict__")
        with pytest.raises(AttributeError):
            setattr(msg, cls.SCHEMA[0][0], None)
        assert cls.__doc__ and cls.__doc__.strip()


def test_directions():
    assert m.HOST_TO_GUEST == {m.Exec, m.Reset, m.Heartbeat, m.Error, m.PutFile, m.Collect, m.Resume, m.Stdin}
    assert m.GUEST_TO_HOST == {m.Hello, m.Output, m.Exit, m.ResetDone, m.HeartbeatAck, m.Error,
                               m.Collected, m.ResumeDone}
    assert m.HOST_TO_GUEST | m.GUEST_TO_HOST == m.ALL_MESSAGES


def test_all_messages_lists_every_message_of_the_vocabulary_and_only_guest_channel_ids():
    # ALL_MESSAGES is written out by hand: a message defined but left out of it
    # would be rejected by both sides' decoders.
    defined = {value for value in vars(m).values()
               if isinstance(value, type) and issubclass(value, codec.Message) and value is not codec.Message}
    assert defined == m.ALL_MESSAGES
    assert all(1 <= cls.TYPE_ID < 32 for cls in defined)  # 32 and up: protocol/wire/


# --- bounds ---------------------------------------------------------------------------

@pytest.mark.parametrize(("cls", "name", "what", "value"), OVER_BOUND, ids=OVER_BOUND_IDS)
def test_one_over_a_bound_is_rejected_on_decode_and_encode(cls, name, what, value):
    with pytest.raises(FieldTooLong, match=f"{cls.__name__}.{name}"):
        codec.decode(raw_payload(cls, **{name: value}))
    good = minimal_message(cls)
    with pytest.raises(ValueError, match=f"{cls.__name__}.{name}"):
        codec.encode(_replace(good, name, value))


@pytest.mark.parametrize(("cls", "name", "what", "value"), OVER_BOUND, ids=OVER_BOUND_IDS)
def test_exactly_at_a_bound_is_accepted(cls, name, what, value):
    msg = _replace(minimal_message(cls), name, at_bound(value))
    assert codec.decode(codec.encode(msg)) == msg


def _replace(msg, name, value):
    values = {field: getattr(msg, field) for field, _ in type(msg).SCHEMA}
    values[name] = value
    return type(msg)(**values)


def test_bound_is_checked_before_the_bytes_are_there():
    # A declared 4 GiB stdin in a tiny payload: the bound speaks first.
    payload = raw_payload(m.Exec)
    stdin_at = len(payload) - (4 + 4 + 4 + 1 + 2)  # stdin's length, timeout_ms, output_cap, as_root, capabilities
    lying = payload[:stdin_at] + struct.pack("!I", 0xFFFFFFFF)
    with pytest.raises(FieldTooLong, match="Exec.stdin"):
        codec.decode(lying)


def test_lying_count_in_a_short_payload_is_malformed():
    payload = bytes([m.Exec.TYPE_ID]) + struct.pack("!IH", 1, 4000)
    with pytest.raises(MalformedPayload, match="Exec.argv"):
        codec.decode(payload)


def test_argv_must_not_be_empty():
    with pytest.raises(MalformedPayload, match="argv"):
        codec.decode(raw_payload(m.Exec, argv=()))
    with pytest.raises(ValueError, match="argv"):
        codec.encode(_replace(minimal_message(m.Exec), "argv", ()))


# --- Resume and ResumeDone ----------------------------------------------------------------

def test_resume_known_encoding():
    resume = m.Resume(time_ns=0x0102030405060708, entropy=bytes(range(32)), host_seq=0xAABBCCDD, guest_seq=7)
    payload = codec.encode(resume)
    assert payload == (bytes.fromhex("0d" "0102030405060708" "00000020") + bytes(range(32))
                       + bytes.fromhex("aabbccdd" "00000007"))
    assert codec.decode(payload, m.HOST_TO_GUEST) == resume
    assert codec.max_payload_size([m.Resume]) == len(payload) == 1 + 8 + 4 + 32 + 4 + 4


@pytest.mark.parametrize("length", [0, 1, 31])
def test_resume_entropy_under_32_bytes_is_refused(length):
    with pytest.raises(MalformedPayload, match="Resume.entropy"):
        codec.decode(raw_payload(m.Resume, entropy=b"e" * length), m.HOST_TO_GUEST)
    with pytest.raises(ValueError, match="Resume.entropy"):
        codec.encode(m.Resume(time_ns=1, entropy=b"e" * length, host_seq=0, guest_seq=0))


@pytest.mark.parametrize("length", [33, 0xFFFFFFFF])
def test_resume_entropy_over_32_bytes_is_refused_from_its_length_alone(length):
    # The declared length is judged before any byte of it is looked for.
    payload = bytes([m.Resume.TYPE_ID]) + struct.pack("!QI", 1, length)
    with pytest.raises(FieldTooLong, match="Resume.entropy"):
        codec.decode(payload, m.HOST_TO_GUEST)
    with pytest.raises(ValueError, match="Resume.entropy"):
        codec.encode(m.Resume(time_ns=1, entropy=b"e" * 33, host_seq=0, guest_seq=0))


def test_resume_fields_are_range_checked_on_encode():
    entropy = b"e" * constants.RESUME_ENTROPY_LEN
    for bad in ({"time_ns": -1}, {"time_ns": 1 << 64}, {"host_seq": 1 << 32}, {"guest_seq": -1}):
        fields = {"time_ns": 1, "entropy": entropy, "host_seq": 0, "guest_seq": 0} | bad
        with pytest.raises(ValueError, match="Resume"):
            codec.encode(m.Resume(**fields))
    with pytest.raises(TypeError, match="Resume.entropy"):
        codec.encode(m.Resume(time_ns=1, entropy=bytearray(entropy), host_seq=0, guest_seq=0))


@pytest.mark.parametrize("step", [0, 1, -1, 3600 * 10**9, -(1 << 63), (1 << 63) - 1])
def test_resume_done_carries_a_signed_64_bit_clock_step(step):
    payload = codec.encode(m.ResumeDone(clock_step_ns=step))
    assert payload == bytes([14]) + step.to_bytes(8, "big", signed=True)
    assert codec.decode(payload, m.GUEST_TO_HOST) == m.ResumeDone(clock_step_ns=step)


@pytest.mark.parametrize("step", [-(1 << 63) - 1, 1 << 63])
def test_resume_done_step_outside_i64_is_refused_on_encode(step):
    with pytest.raises(ValueError, match="ResumeDone.clock_step_ns"):
        codec.encode(m.ResumeDone(clock_step_ns=step))


def test_resume_goes_only_host_to_guest_and_resume_done_only_back():
    resume = codec.encode(m.Resume(time_ns=1, entropy=b"e" * 32, host_seq=0, guest_seq=0))
    done = codec.encode(m.ResumeDone(clock_step_ns=5))
    with pytest.raises(UnexpectedMessage):
        codec.decode(resume, m.GUEST_TO_HOST)
    with pytest.raises(UnexpectedMessage):
        codec.decode(done, m.HOST_TO_GUEST)


def test_bytes_bounds_are_checked_when_declared():
    with pytest.raises(ValueError):
        Bytes(31, min_len=32)
    assert repr(Bytes(32, min_len=32)) == "bytes[32]" and repr(Bytes(8, min_len=2)) == "bytes[2..8]"


@pytest.mark.parametrize("stream", [0, 3, 255])
def test_output_stream_is_stdout_or_stderr(stream):
    with pytest.raises(MalformedPayload, match="Output.stream"):
        codec.decode(raw_payload(m.Output, stream=stream))
    with pytest.raises(ValueError, match="Output.stream"):
        codec.encode(m.Output(1, stream, 0, b""))


def test_guest_to_host_max_payload_is_the_largest_collected_chunk():
    biggest = m.Collected(0xFFFFFFFF, 0xFFFF, b"o" * constants.MAX_OUTPUT_CHUNK, True, "e" * constants.MAX_FILE_ERROR_LEN)
    assert len(codec.encode(biggest)) == m.GUEST_TO_HOST_MAX_PAYLOAD
    assert m.GUEST_TO_HOST_MAX_PAYLOAD == constants.MAX_OUTPUT_CHUNK + constants.MAX_FILE_ERROR_LEN + 16  # ~1 MiB per VM
    for cls in m.GUEST_TO_HOST:
        largest = cls(**{name: _largest_value(wire) for name, wire in cls.SCHEMA})
        assert len(codec.encode(largest)) == codec.max_payload_size([cls])


def _largest_value(wire):
    if isinstance(wire, Integer):
        return max(wire.choices) if wire.choices else wire.max_value
    if isinstance(wire, Bool):
        return True
    if isinstance(wire, Str):
        return "s" * wire.max_len
    if isinstance(wire, Bytes):
        return b"b" * wire.max_len
    raise AssertionError(f"no lists in guest-to-host messages: {wire!r}")


# --- field-level malformations ----------------------------------------------------------

BOOL_FIELDS = [(cls, name) for cls in MESSAGES for name, wire in cls.SCHEMA if isinstance(wire, Bool)]
STR_FIELDS = [(cls, name) for cls in MESSAGES for name, wire in cls.SCHEMA if isinstance(wire, Str)]


@pytest.mark.parametrize(("cls", "name"), BOOL_FIELDS, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("byte", [2, 0x80, 0xFF])
def test_bad_bool_byte(cls, name, byte):
    with pytest.raises(MalformedPayload, match=f"{cls.__name__}.{name}"):
        codec.decode(raw_payload(cls, **{name: byte}))


@pytest.mark.parametrize(("cls", "name"), STR_FIELDS, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("bad", [b"\xff", b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf"],
                         ids=["ff", "cut", "surrogate", "overlong"])
def test_invalid_utf8(cls, name, bad):
    with pytest.raises(MalformedPayload, match=f"{cls.__name__}.{name}"):
        codec.decode(raw_payload(cls, **{name: bad}))


@pytest.mark.parametrize("type_id", [0, 16, 0x80, 0xFF])
def test_unknown_type_id(type_id):
    with pytest.raises(UnknownMessageType):
        codec.decode(bytes([type_id]) + b"\0" * 8)


def test_empty_payload_is_malformed():
    with pytest.raises(MalformedPayload):
        codec.decode(b"")


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
def test_trailing_bytes(cls):
    with pytest.raises(TrailingBytes):
        codec.decode(codec.encode(minimal_message(cls)) + b"\0")


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_truncated_at_every_cut_point_is_malformed(cls, data):
    payload = codec.encode(data.draw(message_strategy(cls)))
    for cut in range(len(payload)):
        with pytest.raises(MalformedPayload):
            codec.decode(payload[:cut])


def test_allowed_filter():
    exec_payload = codec.encode(minimal_message(m.Exec))
    with pytest.raises(UnexpectedMessage, match="Exec"):
        codec.decode(exec_payload, allowed=m.GUEST_TO_HOST)
    assert codec.decode(exec_payload, allowed=m.HOST_TO_GUEST) == minimal_message(m.Exec)
    error_payload = codec.encode(m.Error("boom", "details"))
    for allowed in (m.GUEST_TO_HOST, m.HOST_TO_GUEST):
        assert codec.decode(error_payload, allowed=allowed) == m.Error("boom", "details")
    with pytest.raises(UnexpectedMessage):
        codec.decode(error_payload, allowed=frozenset())
    # Checked before the fields are parsed: a state that refuses Output never parses one.
    with pytest.raises(UnexpectedMessage):
        codec.decode(bytes([m.Output.TYPE_ID]), allowed=frozenset({m.Exit}))


# --- encoding checks Python types -------------------------------------------------------

@pytest.mark.parametrize(("msg", "error"), [
    (m.Reset(reset_id=-1), ValueError),
    (m.Reset(reset_id=2**32), ValueError),
    (m.Heartbeat(nonce=2**64), ValueError),
    (m.Exit(1, 2**31, 0, False, False, False, 0, 0, 0, 0), ValueError),
    (m.Exit(1, 0, 256, False, False, False, 0, 0, 0, 0), ValueError),
    (m.Reset(reset_id=True), TypeError),
    (m.Reset(reset_id=1.0), TypeError),
    (m.ResetDone(1, 1, ""), TypeError),
    (m.ResetDone(1, True, b"bytes"), TypeError),
    (m.Error("\ud800", ""), ValueError),
    (m.Output(1, 1, 0, "text"), TypeError),
    (m.Output(1, 1, 0, bytearray(b"x")), TypeError),
    (m.Exec(1, [b"ls", "-l"], (), b"/", b"", 0, 0, False, 0), TypeError),
    (m.Exec(1, b"ls", (), b"/", b"", 0, 0, False, 0), TypeError),
    (m.Exec(1, (b"ls",), ((b"K",),), b"/", b"", 0, 0, False, 0), TypeError),
    (m.Exec(1, (b"ls",), {b"K": b"V"}, b"/", b"", 0, 0, False, 0), TypeError),
], ids=repr)
def test_encode_rejects_wrong_types_and_ranges(msg, error):
    with pytest.raises(error):
        codec.encode(msg)


def test_encode_accepts_lists_and_decodes_tuples():
    msg = m.Exec(1, [b"ls", b"-l"], [(b"K", b"V")], b"/", b"", 0, 0, False, 0)
    decoded = codec.decode(codec.encode(msg))
    assert decoded.argv == (b"ls", b"-l") and decoded.env == ((b"K", b"V"),)


def test_encode_rejects_non_messages():
    with pytest.raises(TypeError):
        codec.encode(("not", "a", "message"))


# --- garbage ------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=200))
def test_random_garbage_only_raises_payload_errors(garbage):
    try:
        msg = codec.decode(garbage)
    except PayloadError:
        return
    assert codec.encode(msg) == garbage  # whatever decodes is canonical


@settings(max_examples=300, deadline=None)
@given(type_id=st.sampled_from([cls.TYPE_ID for cls in MESSAGES]), body=st.binary(max_size=200))
def test_garbage_behind_a_valid_type_id_only_raises_payload_errors(type_id, body):
    garbage = bytes([type_id]) + body
    try:
        msg = codec.decode(garbage, allowed=m.ALL_MESSAGES)
    except PayloadError:
        return
    assert codec.encode(msg) == garbage


@BOUNDED
@given(msg=any_message, data=st.data())
def test_mutated_payloads_only_raise_protocol_errors(msg, data):
    payload = bytearray(codec.encode(msg))
    index = data.draw(st.integers(0, len(payload) - 1))
    payload[index] = data.draw(st.integers(0, 255))
    try:
        codec.decode(payload, allowed=m.GUEST_TO_HOST)
    except (PayloadError, UnexpectedMessage):
        pass
