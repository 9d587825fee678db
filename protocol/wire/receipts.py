"""Signed receipts for collected files: the format, and offline verification.

A receipt says: this file (path, SHA-256, size) came out of task `task_id`,
which ran `command` to this exit status (outcome, exit code, signal) in a
corral sandbox. corrald signs it with its host Ed25519 key (actors/artifacts/signing.py
owns the key); anyone holding the host's public key checks it offline with
`corral verify ARTIFACT RECEIPT`, no corrald needed.

What is signed is not the JSON but a canonical binary encoding of the same
fields (the bounded codec of protocol.channel.codec, type ReceiptBody), after a
domain-separation prefix, so no JSON canonicalisation question arises and a
signature over anything else corrald signs can never pass for a receipt.
The JSON document (UTF-8, at most MAX_RECEIPT bytes) is what callers save.
The signature scheme is Ed25519 from `cryptography`: no home-made crypto.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.channel.codec import I32, U8, U64, Bytes, BytesList, Message, Str, encode, field, message
from protocol.channel.constants import MAX_ARG_LEN, MAX_ARGV_ITEMS, MAX_PATH_LEN
from protocol.wire.tasks import MAX_RECEIPT, MAX_TASK_ID_LEN

FORMAT = "corral-receipt/1"
DOMAIN = b"corral receipt v1\n"


class ReceiptInvalid(Exception):
    """The receipt does not vouch for this artifact; the message says why."""


@message(48)  # never sent on any socket: only the bytes a receipt signs
class ReceiptBody(Message):
    """The signed facts of one receipt."""

    task_id: str = field(Str(MAX_TASK_ID_LEN))
    command: tuple[bytes, ...] = field(BytesList(MAX_ARGV_ITEMS, MAX_ARG_LEN, min_count=1))
    outcome: str = field(Str(32))
    exit_code: int = field(I32)
    signal: int = field(U8)
    path: bytes = field(Bytes(MAX_PATH_LEN))
    sha256: bytes = field(Bytes(32))
    size: int = field(U64)


def signed_bytes(body: ReceiptBody) -> bytes:
    return DOMAIN + encode(body)


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short name of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _text(value: bytes) -> str:
    # Lossless for any bytes: undecodable bytes become lone surrogates, which
    # json (ensure_ascii) writes as \udcXX escapes and reads back the same.
    return value.decode("utf-8", errors="surrogateescape")


def _raw(value: str) -> bytes:
    return value.encode("utf-8", errors="surrogateescape")


def body_for(task_id: str, command: tuple[bytes, ...], outcome: str, exit_code: int, signal: int,
             path: bytes, data: bytes) -> ReceiptBody:
    return ReceiptBody(task_id=task_id, command=tuple(command), outcome=outcome, exit_code=exit_code,
                       signal=signal, path=path, sha256=hashlib.sha256(data).digest(), size=len(data))


def make_receipt(body: ReceiptBody, private_key: Ed25519PrivateKey) -> bytes:
    """The JSON receipt for `body`, signed with `private_key`."""
    document = {
        "format": FORMAT, "task_id": body.task_id, "command": [_text(a) for a in body.command],
        "outcome": body.outcome, "exit_code": body.exit_code, "signal": body.signal,
        "path": _text(body.path), "sha256": body.sha256.hex(), "size": body.size,
        "key_id": key_id(private_key.public_key()),
        "signature": private_key.sign(signed_bytes(body)).hex(),
    }
    receipt = json.dumps(document, indent=1, ensure_ascii=True).encode() + b"\n"
    if len(receipt) > MAX_RECEIPT:  # a huge command line: the file still gets an answer
        raise ValueError(f"receipt of {len(receipt)} bytes is over the limit of {MAX_RECEIPT}")
    return receipt


def parse(receipt: bytes) -> tuple[ReceiptBody, str, bytes]:
    """(body, key_id, signature) from a receipt document; ReceiptInvalid if malformed."""
    if len(receipt) > MAX_RECEIPT:
        raise ReceiptInvalid(f"receipt is {len(receipt)} bytes, over the limit of {MAX_RECEIPT}")
    try:
        doc = json.loads(receipt)
        if doc["format"] != FORMAT:
            raise ReceiptInvalid(f"unknown receipt format {doc['format']!r}")
        body = ReceiptBody(
            task_id=doc["task_id"], command=tuple(_raw(a) for a in doc["command"]),
            outcome=doc["outcome"], exit_code=doc["exit_code"], signal=doc["signal"],
            path=_raw(doc["path"]), sha256=bytes.fromhex(doc["sha256"]), size=doc["size"])
        encode(body)  # every field of the right type and within its bound
        return body, str(doc["key_id"]), bytes.fromhex(doc["signature"])
    except ReceiptInvalid:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReceiptInvalid(f"malformed receipt: {type(e).__name__}: {e}") from None


def verify(artifact: bytes, receipt: bytes, public_key: Ed25519PublicKey) -> ReceiptBody:
    """The receipt's facts if it is a valid signature by `public_key` over this
    exact artifact; ReceiptInvalid saying why not otherwise."""
    body, signer, signature = parse(receipt)
    expected = key_id(public_key)
    if signer != expected:
        raise ReceiptInvalid(f"signed by key {signer}, not by the trusted key {expected}")
    try:
        public_key.verify(signature, signed_bytes(body))
    except InvalidSignature:
        raise ReceiptInvalid("bad signature: the receipt was altered or not made by this key") from None
    digest = hashlib.sha256(artifact).digest()
    if len(artifact) != body.size or digest != body.sha256:
        raise ReceiptInvalid(f"artifact does not match the receipt: sha256 {digest.hex()} "
                             f"({len(artifact)} bytes), receipt says {body.sha256.hex()} ({body.size} bytes)")
    return body


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """A PEM Ed25519 public key (as corrald writes beside its secret key)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as e:
        raise ReceiptInvalid(f"{path} is not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptInvalid(f"{path} is not an Ed25519 public key")
    return key
