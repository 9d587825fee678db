"""The least of DNS the egress proxy needs: an A query for one name, and the
IPv4 addresses its answer holds (RFC 1035). Used where `egress.resolver` names
a server; with none, the proxy uses the host's resolver (getaddrinfo).

Every length and pointer in an answer is checked before it is used; an answer
that is not well-formed, not ours or not a success yields no address (the
connection is then denied as not resolving), never an exception past this
module. The test suite's DNS server builds its answers with answer()."""

from __future__ import annotations

import ipaddress
import secrets
import struct

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
TYPE_A, CLASS_IN = 1, 1
MAX_POINTERS = 32  # compression pointers followed in one name


class BadAnswer(ValueError):
    pass


def encode_name(name: str) -> bytes:
    out = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".") if label)
    return out + b"\0"


def query(name: str, query_id: int | None = None) -> tuple[int, bytes]:
    """(id, packet) of a recursive A query for `name`."""
    qid = secrets.randbits(16) if query_id is None else query_id
    return qid, HEADER.pack(qid, 0x0100, 1, 0, 0, 0) + encode_name(name) + struct.pack("!HH", TYPE_A, CLASS_IN)


def _skip_name(packet: bytes, pos: int) -> int:
    """The position after the (possibly compressed) name at `pos`."""
    for _ in range(MAX_POINTERS + 64):
        if pos >= len(packet):
            raise BadAnswer("name runs past the end")
        length = packet[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(packet):
                raise BadAnswer("pointer runs past the end")
            return pos + 2
        if length & 0xC0:
            raise BadAnswer("bad label type")
        pos += 1 + length
    raise BadAnswer("name too long")


def read_name(packet: bytes, pos: int) -> str:
    labels, jumps = [], 0
    while True:
        if pos >= len(packet):
            raise BadAnswer("name runs past the end")
        length = packet[pos]
        if length == 0:
            return ".".join(labels).lower()
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(packet) or jumps >= MAX_POINTERS:
                raise BadAnswer("bad compression pointer")
            pos = struct.unpack_from("!H", packet, pos)[0] & 0x3FFF
            jumps += 1
            continue
        if length & 0xC0 or pos + 1 + length > len(packet):
            raise BadAnswer("bad label")
        labels.append(packet[pos + 1:pos + 1 + length].decode("ascii", errors="replace"))
        if len(labels) > 127:
            raise BadAnswer("name too long")
        pos += 1 + length


def addresses(packet: bytes, query_id: int, name: str) -> tuple[ipaddress.IPv4Address, ...]:
    """The A records of an answer to our query (id and question checked)."""
    try:
        if len(packet) < HEADER.size:
            raise BadAnswer("short")
        qid, flags, qdcount, ancount, _, _ = HEADER.unpack_from(packet)
        if qid != query_id or not flags & 0x8000 or flags & 0x000F or qdcount != 1:
            raise BadAnswer("not an answer to our query, or an error")
        pos = HEADER.size
        if read_name(packet, pos) != name.lower():
            raise BadAnswer("answers another question")
        pos = _skip_name(packet, pos) + 4
        found = []
        for _ in range(ancount):
            pos = _skip_name(packet, pos)
            if pos + RR.size > len(packet):
                raise BadAnswer("record runs past the end")
            rtype, rclass, _, rdlength = RR.unpack_from(packet, pos)
            pos += RR.size
            if pos + rdlength > len(packet):
                raise BadAnswer("record data runs past the end")
            if rtype == TYPE_A and rclass == CLASS_IN and rdlength == 4:
                found.append(ipaddress.IPv4Address(packet[pos:pos + 4]))
            pos += rdlength
        return tuple(found)
    except (BadAnswer, struct.error):
        return ()


def answer(request: bytes, records: dict[str, list[str]]) -> bytes | None:
    """A server's answer to an A query: `records` name -> IPv4 addresses; an
    unknown name gets NXDOMAIN. None for a packet that is no query."""
    try:
        qid, _, qdcount, _, _, _ = HEADER.unpack_from(request)
        end = _skip_name(request, HEADER.size)
        name = read_name(request, HEADER.size)
    except (BadAnswer, struct.error):
        return None
    question = request[HEADER.size:end + 4]
    found = records.get(name)
    if qdcount != 1 or found is None:
        return HEADER.pack(qid, 0x8183, 1, 0, 0, 0) + question  # NXDOMAIN
    body = b"".join(b"\xc0\x0c" + RR.pack(TYPE_A, CLASS_IN, 5, 4) + ipaddress.IPv4Address(a).packed
                    for a in found)
    return HEADER.pack(qid, 0x8180, 1, len(found), 0, 0) + question + body
