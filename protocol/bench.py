"""Throughput of FrameDecoder against the raw CRC-32 it is built on.

Host-only (uses crcmod). ``python -m protocol.bench`` prints one run.
"""

from __future__ import annotations

import os
import time
import zlib

from protocol import hostcrc
from protocol.channel.frame import FrameDecoder, FrameEncoder

MiB = 1024 * 1024


def _mib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("inf")


def frame_decode_throughput(total_bytes: int = 256 * MiB, frame_size: int = 1 * MiB,
                            chunk: int = 64 * 1024) -> dict:
    """Decode a prebuilt stream of ``total_bytes`` of payload in ``chunk``-sized feeds.

    Returns MiB/s (of payload) for the decoder with hostcrc.crc32, and, over
    the same payload bytes in the same run, raw zlib.crc32 and raw crcmod.
    """
    frames = max(1, total_bytes // frame_size)
    payload = os.urandom(frame_size)  # one random payload reused: CRC cost does not depend on content
    encoder = FrameEncoder(hostcrc.crc32)
    stream = memoryview(b"".join(encoder.encode(payload) for _ in range(frames)))
    payload_bytes = frames * frame_size

    decoder = FrameDecoder(hostcrc.crc32)
    decoded = 0
    start = time.perf_counter()
    for offset in range(0, len(stream), chunk):
        for frame in decoder.feed(stream[offset:offset + chunk]):
            decoded += len(frame)
    decoder.eof()
    decode_s = time.perf_counter() - start
    if decoded != payload_bytes or decoder.frames_decoded != frames:
        raise AssertionError("decoder lost data during the benchmark")

    def time_raw_crc(crc) -> float:
        begin = time.perf_counter()
        for _ in range(frames):
            crc(payload)
        return time.perf_counter() - begin

    zlib_s = time_raw_crc(zlib.crc32)
    crcmod_s = time_raw_crc(hostcrc.crc32)
    return {
        "total_bytes": payload_bytes,
        "frame_size": frame_size,
        "chunk": chunk,
        "frames": frames,
        "decoder_mib_s": _mib_per_s(payload_bytes, decode_s),
        "zlib_crc32_mib_s": _mib_per_s(payload_bytes, zlib_s),
        "crcmod_crc32_mib_s": _mib_per_s(payload_bytes, crcmod_s),
        "crcmod_c_extension": hostcrc.USING_C_EXTENSION,
    }


if __name__ == "__main__":
    for key, value in frame_decode_throughput().items():
        print(f"{key:20} {value:.1f}" if isinstance(value, float) else f"{key:20} {value}")
