"""The bounded binary codec every corral protocol uses: wire types, the
``Message`` base and its registry, ``encode``/``decode``.

A payload is one byte of message type id, then the message's fields in
schema order, big-endian, with nothing after the last field. Field types:

    u8 u16 u32 u64 i32 i64  fixed width integers
    bool                 one byte, 0 or 1 only
    bytes                u32 length + raw bytes             (bounded length, optionally a minimum)
    str                  u32 length + UTF-8                 (bounded byte length)
    bytes_list           u16 count + each item as bytes     (bounded count, item length)
    pairs                u16 count + each (key, value) as two bytes fields
    records              u16 count + each item as a fixed tuple of bytes/integer fields

Each message is a class whose fields are declared in order as
``name: type = field(wire type)`` (``exec_id: int = field(U32)``); ``@message``
turns them into the class's ``SCHEMA``, makes it a frozen, slotted value type
(keyword or positional construction, equality, hash, repr; ``replace`` makes a
changed copy) and registers it under its type id. One generic codec walks the
schema: no message has hand-written code, nothing nests, nothing recurses.
The guest channel's messages are in protocol/channel/messages.py; the caller's
and the operator's (protocol/wire/) use this codec with type ids of their own.

Decoding checks every length and count against its bound before slicing or
allocating, and raises only PayloadError subclasses (or UnexpectedMessage).
Encoding checks Python types (TypeError) and bounds (ValueError), so a host
bug cannot produce a payload the peer would reject. Semantic checks (e.g. an
argument containing NUL, env keys with '=') are the receiver's job.

Ships in the guest: standard library only, and only what the interpreter has
already loaded at start-up besides struct. Under TCG every module imported
costs the guest's boot: dataclasses and typing (with the inspect, re and enum
they pull in) once took ~0.45 s of it, so messages are built without them.
Add no import here lightly.
"""

from __future__ import annotations

import struct

from protocol.channel.errors import (
    FieldTooLong,
    MalformedPayload,
    PayloadError,
    TrailingBytes,
    UnexpectedMessage,
    UnknownMessageType,
)

TYPE_CHECKING = False  # typing costs the guest's boot: imported for type checkers only
if TYPE_CHECKING:
    from typing import Any, ClassVar, Iterable

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
    """u32 length + raw bytes, length at most ``max_len`` and at least ``min_len``
    (``Bytes(32, min_len=32)``: exactly 32)."""

    __slots__ = ("max_len", "min_len")

    def __init__(self, max_len: int, min_len: int = 0) -> None:
        if not 0 <= min_len <= max_len:
            raise ValueError("lengths must satisfy 0 <= min_len <= max_len")
        self.label = (f"bytes[<={max_len}]" if not min_len
                      else f"bytes[{max_len}]" if min_len == max_len else f"bytes[{min_len}..{max_len}]")
        self.max_len = max_len
        self.min_len = min_len
        self.max_size = _LENGTH.size + max_len

    def _check(self, value: Any) -> None:
        if type(value) is not bytes:
            raise TypeError(f"{self.label} needs bytes, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise ValueError(f"{len(value)} bytes over the bound of {self.label}")
        if len(value) < self.min_len:
            raise ValueError(f"{len(value)} bytes under the minimum of {self.label}")

    def encode(self, value: Any, out: list[bytes]) -> None:
        self._check(value)
        out.append(_LENGTH.pack(len(value)))
        out.append(value)

    def _read_span(self, buf: memoryview, pos: int) -> tuple[int, int]:
        start = _need(buf, pos, _LENGTH.size)
        (length,) = _LENGTH.unpack_from(buf, pos)
        if length > self.max_len:  # bound first, then presence, then slice
            raise FieldTooLong(f"length {length} over the bound of {self.label}")
        if length < self.min_len:
            raise MalformedPayload(f"length {length} under the minimum of {self.label}")
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
        if not isinstance(value, str):  # a StrEnum member is its text (error codes)
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
I64 = Integer("i64", "!q", -0x8000000000000000, 0x7FFFFFFFFFFFFFFF)
BOOL = Bool()


# --- message registry ----------------------------------------------------------

class Field:
    """One declared field of a message: its wire type and, optionally, a default."""

    __slots__ = ("wire", "default")
    NO_DEFAULT = object()

    def __init__(self, wire: WireType, default: Any = NO_DEFAULT) -> None:
        if not isinstance(wire, WireType):
            raise TypeError(f"field() needs a wire type, got {wire!r:.80}")
        self.wire = wire
        self.default = default


def field(wire: WireType, *, default: Any = Field.NO_DEFAULT) -> Any:
    """Declare a message field: ``name: type = field(wire type[, default=value])``.
    (Typed Any so that a type checker takes the declaration for the field's value.)"""
    return Field(wire, default)


class Message:
    """Base of every message: ``TYPE_ID``, ``SCHEMA`` and ``SENDERS`` are set by
    ``@message``, and so is what the methods here read (``_NAMES``, ``_DEFAULTS``).
    One generic ``__init__``, ``__eq__``, ... serves every message: no code is
    generated per class, which would cost the guest's boot compiling it."""

    __slots__ = ()
    TYPE_ID: ClassVar[int]
    SCHEMA: ClassVar[tuple[tuple[str, WireType], ...]]
    SENDERS: ClassVar[frozenset[str]]  # who may send it: "host", "guest", "client", ...
    _NAMES: ClassVar[tuple[str, ...]]
    _DEFAULTS: ClassVar[dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        names = cls._NAMES
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes {len(names)} positional arguments but {len(args)} were given")
        init = object.__setattr__
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
            init(self, name, value)
        for name in names[len(args):]:
            if name in kwargs:
                init(self, name, kwargs.pop(name))
            elif name in cls._DEFAULTS:
                init(self, name, cls._DEFAULTS[name])
            else:
                raise TypeError(f"{cls.__name__}() missing required argument {name!r}")
        if kwargs:  # what is left names no field
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {next(iter(kwargs))!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._NAMES)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._NAMES)
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")

    # copy and pickle: a frozen object's state is set the way __init__ sets it.
    def __getstate__(self) -> tuple[Any, ...]:
        return self._values()

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self._NAMES, state):
            object.__setattr__(self, name, value)


def replace(msg: Message, **changes: Any) -> Message:
    """A copy of ``msg`` with ``changes`` applied (what dataclasses.replace does)."""
    values = {name: getattr(msg, name) for name in msg._NAMES}
    unknown = changes.keys() - values.keys()
    if unknown:
        raise TypeError(f"{type(msg).__name__} has no field {sorted(unknown)[0]!r}")
    values.update(changes)
    return type(msg)(**values)


_BY_TYPE_ID: dict[int, type[Message]] = {}


def message(type_id: int, *senders: str):
    """Register a message class under ``type_id``, sent by ``senders``: build its
    SCHEMA from its field() declarations, and make it frozen and slotted."""

    def register(cls: type[Message]) -> type[Message]:
        if not (0 <= type_id <= 0xFF) or type_id in _BY_TYPE_ID:
            raise ValueError(f"type id {type_id} invalid or already used")
        if cls.__bases__ != (Message,):
            raise TypeError(f"{cls.__name__} must derive from Message alone")
        namespace = dict(vars(cls))
        declared = {name: value for name, value in namespace.items() if isinstance(value, Field)}
        annotated = list(namespace.get("__annotations__", {}))
        if annotated != list(declared):
            raise TypeError(f"{cls.__name__}: declare each field, in order, as `name: type = field(wire type)`; "
                            f"annotated {annotated}, declared {list(declared)}")
        defaults = {}
        for name, declaration in declared.items():
            if declaration.default is not Field.NO_DEFAULT:
                defaults[name] = declaration.default
            elif defaults:
                raise TypeError(f"{cls.__name__}.{name}: a field without a default after one with a default")
            del namespace[name]
        # Slotted like the base: no __dict__, so no attribute but the fields (the
        # class is made anew, as __slots__ only counts at class creation).
        namespace.pop("__dict__", None)
        namespace.pop("__weakref__", None)
        namespace["__slots__"] = tuple(declared)
        namespace["__match_args__"] = tuple(declared)
        namespace["TYPE_ID"] = type_id
        namespace["SCHEMA"] = tuple((name, declaration.wire) for name, declaration in declared.items())
        namespace["SENDERS"] = frozenset(senders)
        namespace["_NAMES"] = tuple(declared)
        namespace["_DEFAULTS"] = defaults
        registered = type(cls)(cls.__name__, cls.__bases__, namespace)
        registered.__qualname__ = cls.__qualname__
        _BY_TYPE_ID[type_id] = registered
        return registered

    return register


def max_payload_size(classes: Iterable[type[Message]]) -> int:
    """Largest payload any of ``classes`` can encode to (type id included)."""
    return max(1 + sum(wire.max_size for _, wire in cls.SCHEMA) for cls in classes)


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
