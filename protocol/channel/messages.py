"""Messages of the guest channel and their bounded binary encoding.

A payload is one byte of message type id, then the message's fields in
schema order, big-endian, with nothing after the last field. Field types:

    u8 u16 u32 u64 i32   fixed width integers
    bool                 one byte, 0 or 1 only
    bytes                u32 length + raw bytes             (bounded length)
    str                  u32 length + UTF-8                 (bounded byte length)
    bytes_list           u16 count + each item as bytes     (bounded count, item length)
    pairs                u16 count + each (key, value) as two bytes fields
    records              u16 count + each item as a fixed tuple of bytes/integer fields

Each message is a frozen dataclass whose field annotations carry their wire
type (``Annotated[int, U32]``); ``@message`` turns them into the class's
``SCHEMA``. One generic codec (``encode``/``decode``) walks the schema: no
message has hand-written code, nothing nests, nothing recurses.

Decoding checks every length and count against its bound before slicing or
allocating, and raises only PayloadError subclasses (or UnexpectedMessage).
Encoding checks Python types (TypeError) and bounds (ValueError), so a host
bug cannot produce a payload the peer would reject. Semantic checks (e.g. an
argument containing NUL, env keys with '=') are the receiver's job.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Annotated, Any, ClassVar, Iterable, get_args, get_type_hints

from protocol.channel.errors import (
    FieldTooLong,
    MalformedPayload,
    PayloadError,
    TrailingBytes,
    UnexpectedMessage,
    UnknownMessageType,
)

KiB = 1024
MiB = 1024 * KiB

# --- bounds the host and the guest agent work with -------------------------

MAX_AGENT_VERSION_LEN = 64
MAX_BOOT_ID_LEN = 64
MAX_KERNEL_LEN = 128

MAX_ARGV_ITEMS = 4096
MAX_ARG_LEN = 128 * KiB
MAX_ENV_ITEMS = 1024
MAX_ENV_KEY_LEN = 4 * KiB
MAX_ENV_VALUE_LEN = 128 * KiB
MAX_CWD_LEN = 4096
MAX_STDIN = 8 * MiB

MAX_OUTPUT_CHUNK = 1 * MiB  # the guest splits output into chunks of at most this
STDOUT = 1
STDERR = 2

MAX_RESET_DETAIL_LEN = 1024
# Files put into the guest before a run and collected after it (protocol/wire/tasks.py
# carries them from the caller; config caps the totals far below these bounds).
MAX_FILES = 64
MAX_PATH_LEN = 4096
MAX_FILE_IN = 12 * MiB  # one PutFile must fit one frame with room to spare
MAX_FILE_ERROR_LEN = 512
MAX_ERROR_CODE_LEN = 64
MAX_ERROR_MESSAGE_LEN = 4096

_LENGTH = struct.Struct("!I")  # prefix of bytes and str fields
_COUNT = struct.Struct("!H")  # prefix of bytes_list and pairs fields


# --- wire types --------------------------------------------------------------

class WireType:
    """How one field is laid out. ``max_size`` is its largest encoding."""

    __slots__ = ("label", "max_size")

    def encode(self, value: Any, out: list[bytes]) -> None:
        """Check ``value`` (TypeError/ValueError) and append its encoding."""
        raise NotImplementedError

    def decode(self, buf: memoryview, pos: int) -> tuple[Any, int]:
        """Read a value at ``pos``; return it and the position after it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.label


def _need(buf: memoryview, pos: int, size: int) -> int:
    end = pos + size
    if end > len(buf):
        raise MalformedPayload(f"needs {size} bytes at offset {pos}, payload has {len(buf) - pos}")
    return end


class Integer(WireType):
    """Fixed-width integer, optionally restricted to a set of values."""

    __slots__ = ("_struct", "min_value", "max_value", "choices")

    def __init__(self, label: str, fmt: str, min_value: int, max_value: int,
                 choices: frozenset[int] | None = None) -> None:
        self.label = label if choices is None else f"{label} in {sorted(choices)}"
        self._struct = struct.Struct(fmt)
        self.max_size = self._struct.size
        self.min_value = min_value
        self.max_value = max_value
        self.choices = choices

    def one_of(self, *choices: int) -> Integer:
        return Integer(self.label, self._struct.format, self.min_value, self.max_value, frozenset(choices))

    def encode(self, value: Any, out: list[bytes]) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{self.label} needs an int, got {type(value).__name__}")
        if not self.min_value <= value <= self.max_value:
            raise ValueError(f"{value} out of range for {self.label}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{value} not allowed for {self.label}")
        out.append(self._struct.pack(value))

    def decode(self, buf: memoryview, pos: int) -> tuple[int, int]:
        end = _need(buf, pos, self.max_size)
        (value,) = self._struct.unpack_from(buf, pos)
        if self.choices is not None and value not in self.choices:
            raise MalformedPayload(f"{value} not allowed for {self.label}")
        return value, end


class Bool(WireType):
    """One byte, 0 (False) or 1 (True); any other byte is malformed."""

    __slots__ = ()

    def __init__(self) -> None:
        self.label = "bool"
        self.max_size = 1

    def encode(self, value: Any, out: list[bytes]) -> None:
        if type(value) is not bool:
            raise TypeError(f"bool needs a bool, got {type(value).__name__}")
        out.append(b"\x01" if value else b"\x00")

    def decode(self, buf: memoryview, pos: int) -> tuple[bool, int]:
        end = _need(buf, pos, 1)
        byte = buf[pos]
        if byte > 1:
            raise MalformedPayload(f"bool byte must be 0 or 1, got {byte}")
        return byte == 1, end


class Bytes(WireType):
    """u32 length + raw bytes, length at most ``max_len``."""

    __slots__ = ("max_len",)

    def __init__(self, max_len: int) -> None:
        self.label = f"bytes[<={max_len}]"
        self.max_len = max_len
        self.max_size = _LENGTH.size + max_len

    def _check(self, value: Any) -> None:
        if type(value) is not bytes:
            raise TypeError(f"{self.label} needs bytes, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise ValueError(f"{len(value)} bytes over the bound of {self.label}")

    def encode(self, value: Any, out: list[bytes]) -> None:
        self._check(value)
        out.append(_LENGTH.pack(len(value)))
        out.append(value)

    def _read_span(self, buf: memoryview, pos: int) -> tuple[int, int]:
        start = _need(buf, pos, _LENGTH.size)
        (length,) = _LENGTH.unpack_from(buf, pos)
        if length > self.max_len:  # bound first, then presence, then slice
            raise FieldTooLong(f"length {length} over the bound of {self.label}")
        return start, _need(buf, start, length)

    def decode(self, buf: memoryview, pos: int) -> tuple[bytes, int]:
        start, end = self._read_span(buf, pos)
        return bytes(buf[start:end]), end


class Str(Bytes):
    """u32 length + UTF-8 text, at most ``max_len`` bytes once encoded."""

    __slots__ = ()

    def __init__(self, max_len: int) -> None:
        super().__init__(max_len)
        self.label = f"str[<={max_len} bytes]"

    def encode(self, value: Any, out: list[bytes]) -> None:
        if type(value) is not str:
            raise TypeError(f"{self.label} needs a str, got {type(value).__name__}")
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates
            raise ValueError(f"not encodable as UTF-8: {exc.reason}") from None
        super().encode(data, out)

    def decode(self, buf: memoryview, pos: int) -> tuple[str, int]:
        start, end = self._read_span(buf, pos)
        try:
            return str(buf[start:end], "utf-8"), end
        except UnicodeDecodeError as exc:
            raise MalformedPayload(f"invalid UTF-8 at offset {start + exc.start}: {exc.reason}") from None


class _CountedItems(WireType):
    """u16 count, then each item as a fixed tuple of bytes fields."""

    __slots__ = ("max_count", "min_count", "_parts", "_min_item_size")

    def __init__(self, label: str, max_count: int, parts: tuple[Bytes, ...], min_count: int = 0) -> None:
        if not 0 <= min_count <= max_count <= 0xFFFF:
            raise ValueError("counts must satisfy 0 <= min_count <= max_count <= 65535")
        self.label = label
        self.max_count = max_count
        self.min_count = min_count
        self._parts = parts
        self._min_item_size = _LENGTH.size * len(parts)
        self.max_size = _COUNT.size + max_count * sum(p.max_size for p in parts)

    def _item_parts(self, item: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def _make_item(self, values: list[bytes]) -> Any:
        raise NotImplementedError

    def encode(self, value: Any, out: list[bytes]) -> None:
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{self.label} needs a tuple or list, got {type(value).__name__}")
        if not self.min_count <= len(value) <= self.max_count:
            raise ValueError(f"{len(value)} items outside [{self.min_count}, {self.max_count}] for {self.label}")
        out.append(_COUNT.pack(len(value)))
        for item in value:
            for part, part_value in zip(self._parts, self._item_parts(item)):
                part.encode(part_value, out)

    def decode(self, buf: memoryview, pos: int) -> tuple[tuple[Any, ...], int]:
        pos = _need(buf, pos, _COUNT.size)
        (count,) = _COUNT.unpack_from(buf, pos - _COUNT.size)
        if count > self.max_count:
            raise FieldTooLong(f"count {count} over the bound of {self.label}")
        if count < self.min_count:
            raise MalformedPayload(f"count {count} under the minimum of {self.label}")
        # Every item needs at least its length prefixes: reject a lying count early.
        _need(buf, pos, count * self._min_item_size)
        items = []
        for _ in range(count):
            values = []
            for part in self._parts:
                value, pos = part.decode(buf, pos)
                values.append(value)
            items.append(self._make_item(values))
        return tuple(items), pos


class BytesList(_CountedItems):
    """u16 count + each item as bytes; e.g. argv."""

    __slots__ = ()

    def __init__(self, max_count: int, max_item_len: int, min_count: int = 0) -> None:
        super().__init__(f"bytes_list[{min_count}..{max_count} x <={max_item_len}]",
                         max_count, (Bytes(max_item_len),), min_count)

    @property
    def item(self) -> Bytes:
        return self._parts[0]

    def _item_parts(self, item: Any) -> tuple[Any, ...]:
        return (item,)

    def _make_item(self, values: list[bytes]) -> bytes:
        return values[0]


class Pairs(_CountedItems):
    """u16 count + each (key, value) as two bytes fields; e.g. env."""

    __slots__ = ()

    def __init__(self, max_count: int, max_key_len: int, max_value_len: int) -> None:
        super().__init__(f"pairs[<={max_count} x (<={max_key_len}, <={max_value_len})]",
                         max_count, (Bytes(max_key_len), Bytes(max_value_len)))

    @property
    def key(self) -> Bytes:
        return self._parts[0]

    @property
    def value(self) -> Bytes:
        return self._parts[1]

    def _item_parts(self, item: Any) -> tuple[Any, ...]:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{self.label} items must be (key, value) pairs, got {item!r:.80}")
        return item

    def _make_item(self, values: list[bytes]) -> tuple[bytes, bytes]:
        return values[0], values[1]


class Records(_CountedItems):
    """u16 count + each item as a fixed tuple of fields (bytes, str or integers);
    e.g. files as (path, mode, data). Items decode to tuples."""

    __slots__ = ()

    def __init__(self, max_count: int, *parts: WireType) -> None:
        super().__init__(f"records[<={max_count} x ({', '.join(map(repr, parts))})]", max_count, parts)
        # Integers have a fixed size; bytes and str need at least their length prefix.
        self._min_item_size = sum(p.max_size if isinstance(p, Integer) else _LENGTH.size for p in parts)

    def _item_parts(self, item: Any) -> tuple[Any, ...]:
        if not isinstance(item, (tuple, list)) or len(item) != len(self._parts):
            raise TypeError(f"{self.label} items must be {len(self._parts)}-tuples, got {item!r:.80}")
        return item

    def _make_item(self, values: list) -> tuple:
        return tuple(values)


U8 = Integer("u8", "!B", 0, 0xFF)
U16 = Integer("u16", "!H", 0, 0xFFFF)
U32 = Integer("u32", "!I", 0, 0xFFFFFFFF)
U64 = Integer("u64", "!Q", 0, 0xFFFFFFFFFFFFFFFF)
I32 = Integer("i32", "!i", -0x80000000, 0x7FFFFFFF)
BOOL = Bool()


# --- message registry ----------------------------------------------------------

class Message:
    """Base of every message: ``TYPE_ID`` and ``SCHEMA`` are set by ``@message``."""

    __slots__ = ()
    TYPE_ID: ClassVar[int]
    SCHEMA: ClassVar[tuple[tuple[str, WireType], ...]]


_HOST = "host"
_GUEST = "guest"
_BY_TYPE_ID: dict[int, type[Message]] = {}
_SENDERS: dict[type[Message], frozenset[str]] = {}


def message(type_id: int, *senders: str):
    """Register a message dataclass under ``type_id``; build its SCHEMA from annotations."""

    def register(cls: type[Message]) -> type[Message]:
        if not (0 <= type_id <= 0xFF) or type_id in _BY_TYPE_ID:
            raise ValueError(f"type id {type_id} invalid or already used")
        params = cls.__dataclass_params__
        if not (params.frozen and hasattr(cls, "__slots__")):
            raise TypeError(f"{cls.__name__} must be a frozen, slotted dataclass")
        hints = get_type_hints(cls, include_extras=True)
        schema = []
        for field in dataclasses.fields(cls):
            wire = [meta for meta in get_args(hints[field.name])[1:] if isinstance(meta, WireType)]
            if len(wire) != 1:
                raise TypeError(f"{cls.__name__}.{field.name} needs exactly one wire type annotation")
            schema.append((field.name, wire[0]))
        cls.TYPE_ID = type_id
        cls.SCHEMA = tuple(schema)
        _BY_TYPE_ID[type_id] = cls
        _SENDERS[cls] = frozenset(senders)
        return cls

    return register


# --- the vocabulary ------------------------------------------------------------

@message(1, _GUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class Hello(Message):
    """Guest agent is up and ready for work."""

    agent_version: Annotated[str, Str(MAX_AGENT_VERSION_LEN)]
    boot_id: Annotated[str, Str(MAX_BOOT_ID_LEN)]
    kernel: Annotated[str, Str(MAX_KERNEL_LEN)]


@message(2, _HOST)
@dataclasses.dataclass(frozen=True, slots=True)
class Exec(Message):
    """Run one command in the guest as the unprivileged task user."""

    exec_id: Annotated[int, U32]
    argv: Annotated[tuple[bytes, ...], BytesList(MAX_ARGV_ITEMS, MAX_ARG_LEN, min_count=1)]
    env: Annotated[tuple[tuple[bytes, bytes], ...], Pairs(MAX_ENV_ITEMS, MAX_ENV_KEY_LEN, MAX_ENV_VALUE_LEN)]
    cwd: Annotated[bytes, Bytes(MAX_CWD_LEN)]
    stdin: Annotated[bytes, Bytes(MAX_STDIN)]
    timeout_ms: Annotated[int, U32]
    output_cap: Annotated[int, U32]  # bytes kept per stream; the rest is dropped and flagged
    as_root: Annotated[bool, BOOL]  # host-internal diagnostics only; never settable by clients
    capabilities: Annotated[int, U16]  # soft capability bits (protocol/channel/capabilities.py)


@message(3, _GUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class Output(Message):
    """A chunk of a running command's stdout or stderr."""

    exec_id: Annotated[int, U32]
    stream: Annotated[int, U8.one_of(STDOUT, STDERR)]
    data: Annotated[bytes, Bytes(MAX_OUTPUT_CHUNK)]


@message(4, _GUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class Exit(Message):
    """A command finished: status, truncation flags and resource use."""

    exec_id: Annotated[int, U32]
    exit_code: Annotated[int, I32]  # -1 when killed by a signal
    signal: Annotated[int, U8]  # 0 if none
    timed_out: Annotated[bool, BOOL]
    stdout_truncated: Annotated[bool, BOOL]
    stderr_truncated: Annotated[bool, BOOL]
    wall_ms: Annotated[int, U32]
    user_cpu_ms: Annotated[int, U32]
    sys_cpu_ms: Annotated[int, U32]
    max_rss_kib: Annotated[int, U32]
    # The kernel's OOM killer killed a process during the run (/proc/vmstat oom_kill rose).
    oom_killed: Annotated[bool, BOOL] = False


@message(5, _HOST)
@dataclasses.dataclass(frozen=True, slots=True)
class Reset(Message):
    """Kill every task process, wipe /tmp and the task user's home."""

    reset_id: Annotated[int, U32]


@message(6, _GUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class ResetDone(Message):
    """Outcome of a Reset; ok=False means the VM must be destroyed."""

    reset_id: Annotated[int, U32]
    ok: Annotated[bool, BOOL]
    detail: Annotated[str, Str(MAX_RESET_DETAIL_LEN)]


@message(7, _HOST)
@dataclasses.dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Liveness probe; the guest echoes the nonce."""

    nonce: Annotated[int, U64]


@message(8, _GUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatAck(Message):
    """Answer to a Heartbeat, same nonce."""

    nonce: Annotated[int, U64]


@message(9, _HOST, _GUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class Error(Message):
    """A failure report with a machine-readable code (either direction)."""

    code: Annotated[str, Str(MAX_ERROR_CODE_LEN)]
    message: Annotated[str, Str(MAX_ERROR_MESSAGE_LEN)]


@message(10, _HOST)
@dataclasses.dataclass(frozen=True, slots=True)
class PutFile(Message):
    """Before an Exec: write a file as the task user (new file, parents made).
    A failure is reported as Error put_failed in answer to the next Exec."""

    path: Annotated[bytes, Bytes(MAX_PATH_LEN)]
    mode: Annotated[int, U16]  # permission bits, at most 0o777
    data: Annotated[bytes, Bytes(MAX_FILE_IN)]


@message(11, _HOST)
@dataclasses.dataclass(frozen=True, slots=True)
class Collect(Message):
    """After an Exit: read these files as the task user, at most `max_bytes` in
    all; answered by Collected chunks, file by file in order."""

    collect_id: Annotated[int, U32]
    paths: Annotated[tuple[bytes, ...], BytesList(MAX_FILES, MAX_PATH_LEN, min_count=1)]
    max_bytes: Annotated[int, U32]


@message(12, _GUEST)
@dataclasses.dataclass(frozen=True, slots=True)
class Collected(Message):
    """A chunk of collected file `index`; `last` ends that file. A file that
    cannot be collected is one Collected with `error` set, no data, last."""

    collect_id: Annotated[int, U32]
    index: Annotated[int, U16]
    data: Annotated[bytes, Bytes(MAX_OUTPUT_CHUNK)]
    last: Annotated[bool, BOOL]
    error: Annotated[str, Str(MAX_FILE_ERROR_LEN)]


ALL_MESSAGES: frozenset[type[Message]] = frozenset(_BY_TYPE_ID.values())
HOST_TO_GUEST: frozenset[type[Message]] = frozenset(c for c, s in _SENDERS.items() if _HOST in s)
GUEST_TO_HOST: frozenset[type[Message]] = frozenset(c for c, s in _SENDERS.items() if _GUEST in s)


def max_payload_size(classes: Iterable[type[Message]]) -> int:
    """Largest payload any of ``classes`` can encode to (type id included)."""
    return max(1 + sum(wire.max_size for _, wire in cls.SCHEMA) for cls in classes)


# The host can size its frame decoder to this instead of the 16 MiB frame cap,
# so a guest can make it hold at most ~1 MiB per channel.
GUEST_TO_HOST_MAX_PAYLOAD: int = max_payload_size(GUEST_TO_HOST)


# --- the codec -------------------------------------------------------------------

def encode(msg: Message) -> bytes:
    """Encode a message to its payload; TypeError/ValueError on a bad field."""
    cls = type(msg)
    if _BY_TYPE_ID.get(getattr(cls, "TYPE_ID", None)) is not cls:
        raise TypeError(f"not a protocol message: {cls.__name__}")
    out = [bytes((cls.TYPE_ID,))]
    for name, wire in cls.SCHEMA:
        try:
            wire.encode(getattr(msg, name), out)
        except TypeError as exc:
            raise TypeError(f"{cls.__name__}.{name}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{cls.__name__}.{name}: {exc}") from None
    return b"".join(out)


def decode(payload: bytes | bytearray | memoryview,
           allowed: frozenset[type[Message]] | None = None) -> Message:
    """Decode one payload; only ``allowed`` message types (all if None) are accepted."""
    with memoryview(payload) as raw, raw.cast("B") as buf:
        if len(buf) == 0:
            raise MalformedPayload("empty payload: no message type id")
        cls = _BY_TYPE_ID.get(buf[0])
        if cls is None:
            raise UnknownMessageType(f"unknown message type id {buf[0]}")
        if allowed is not None and cls not in allowed:
            raise UnexpectedMessage(f"{cls.__name__} is not allowed here")
        values = {}
        pos = 1
        for name, wire in cls.SCHEMA:
            try:
                values[name], pos = wire.decode(buf, pos)
            except PayloadError as exc:
                raise type(exc)(f"{cls.__name__}.{name}: {exc}") from None
        if pos != len(buf):
            raise TrailingBytes(f"{cls.__name__}: {len(buf) - pos} bytes after the last field")
        return cls(**values)
