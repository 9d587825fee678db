"""corrald's host signing key: Ed25519, made on first start, kept 0600.

The secret key is `artifacts.key_file` (default <state_dir>/keys/receipt.key,
PEM PKCS#8); its public half is written beside it as `<key_file>.pub` (PEM),
the file callers give to `corral verify --key`. A secret key file that others
can read, or that is not an Ed25519 key, stops corrald at start-up with a
clear error rather than signing with a key that may be known.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from actors.errors import CorralError
from protocol.wire import receipts


class Signer:
    """Signs receipts with the host key. Immutable after start: safe to share."""

    def __init__(self, private_key: Ed25519PrivateKey, key_file: Path):
        self._key = private_key
        self.key_file = key_file
        self.public_key_file = public_key_file(key_file)
        self.key_id = receipts.key_id(private_key.public_key())

    def receipt(self, body: receipts.ReceiptBody) -> bytes:
        return receipts.make_receipt(body, self._key)


def public_key_file(key_file: Path) -> Path:
    return key_file.with_name(key_file.name + ".pub")


def load_or_create(key_file: Path) -> Signer:
    key_file = Path(key_file)
    try:
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not key_file.exists():
            _create(key_file)
        key = _load(key_file)
        pub = public_key_file(key_file)
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        if not pub.exists() or pub.read_bytes() != pem:
            tmp = pub.with_name(pub.name + ".tmp")
            tmp.write_bytes(pem)
            tmp.chmod(0o644)
            tmp.replace(pub)
    except OSError as e:
        raise CorralError(f"signing key {key_file}: {e.strerror or e}") from None
    return Signer(key, key_file)


def _create(key_file: Path) -> None:
    """Write a new key whole to a private temporary file, then link it into
    place: a concurrent start finds either no key or a complete one, and the
    first link wins."""
    key = Ed25519PrivateKey.generate()
    tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, key_file)
        except FileExistsError:
            pass  # another start made one first: use that
    finally:
        tmp.unlink()


def _load(key_file: Path) -> Ed25519PrivateKey:
    fd = os.open(key_file, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
            raise CorralError(f"signing key {key_file} must be a regular file of mode 0600 "
                              f"(it is {stat.filemode(info.st_mode)}): others may know it")
        data = f.read(64 * 1024)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CorralError(f"signing key {key_file} is not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CorralError(f"signing key {key_file} is not an Ed25519 key")
    return key
