"""Host-side CRC-32 (crcmod). Not importable in the guest, which uses zlib.crc32.

crcmod's predefined 'crc-32' is the same function as zlib.crc32 (reflected
polynomial 0x04C11DB7, init and xor-out 0xFFFFFFFF); tests cross-check them.
"""

from __future__ import annotations

import importlib

import crcmod.predefined

crc32 = crcmod.predefined.mkPredefinedCrcFun("crc-32")

# The flag lives in the submodule crcmod.crcmod; the package attribute of that
# name is shadowed by the package itself, so look the module up by name.
USING_C_EXTENSION: bool = bool(importlib.import_module("crcmod.crcmod")._usingExtension)
