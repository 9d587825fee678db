"""Benchmarks, each printed beside a baseline measured in the same run.

    scripts/bench [--boots N] [--frames-mib M]

- cold boot: createXML until the agent's Hello, over N boots, against the same
  kernel booting a busybox-only initramfs whose init powers off at once
  (createXML until the domain is gone): what our initramfs, root mount and
  agent start add on top of the bare kernel.
- frame decode: FrameDecoder throughput against raw zlib.crc32 over the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import config
from actors.hypervisor import hypervisor_from_config
from actors.guest_link import GuestLink
from actors.hypervisor import DOMAIN_PREFIX, Hypervisor
from guest.image.build import Cpio
from protocol.bench import frame_decode_throughput

BUSYBOX_POWEROFF_INIT = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"


def summary(samples: list[float]) -> str:
    return (f"{min(samples):.2f} / {statistics.median(samples):.2f} / {max(samples):.2f} s "
            f"(min / median / max, n={len(samples)})")


def boot_to_hello(hypervisor: Hypervisor, timeout_s: float) -> float:
    started = time.monotonic()
    handle = hypervisor.create()
    link = GuestLink(handle.socket)
    try:
        deadline = started + timeout_s
        link.connect(deadline)
        link.wait_hello(deadline)
        return time.monotonic() - started
    finally:
        link.close()
        hypervisor.destroy(handle)


def busybox_initramfs(path: Path) -> None:
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    cpio.file("init", BUSYBOX_POWEROFF_INIT, 0o755)
    path.write_bytes(cpio.finish())


def boot_busybox_to_poweroff(hypervisor: Hypervisor, initrd: Path, timeout_s: float) -> float:
    import libvirt

    name = DOMAIN_PREFIX + "bench" + format(time.monotonic_ns() % 16**7, "07x")
    spec = hypervisor.spec_for(name, overlay=Path("/nonexistent"), socket=None)
    spec = dataclasses.replace(spec, initrd=initrd, disks=(), channel_socket=None)
    started = time.monotonic()
    hypervisor.conn.createXML(spec.to_xml(), 0)
    while time.monotonic() - started < timeout_s:
        try:
            hypervisor.conn.lookupByName(name)
        except libvirt.libvirtError:
            return time.monotonic() - started  # powered off: on_poweroff destroys it
        time.sleep(0.005)
    hypervisor.destroy_domain(name)
    raise TimeoutError(f"busybox baseline did not power off within {timeout_s} s")


def bench_boot(cfg: config.Config, boots: int) -> None:
    hypervisor = hypervisor_from_config(cfg)
    try:
        print(f"accelerator: {hypervisor.accelerator}")
        ours = [boot_to_hello(hypervisor, cfg.vm.boot_timeout_s) for _ in range(boots)]
        with tempfile.TemporaryDirectory() as tmp:
            initrd = Path(tmp) / "busybox-initrd.img"
            busybox_initramfs(initrd)
            initrd.chmod(0o644)
            Path(tmp).chmod(0o755)  # QEMU runs as its own user
            baseline = [boot_busybox_to_poweroff(hypervisor, initrd, cfg.vm.boot_timeout_s)
                        for _ in range(boots)]
    finally:
        hypervisor.close()
    ratio = statistics.median(ours) / statistics.median(baseline)
    print(f"cold boot to agent ready:         {summary(ours)}")
    print(f"baseline, busybox-only initramfs: {summary(baseline)}")
    print(f"ratio (median, ours / baseline):  {ratio:.2f}x")


def bench_frames(total_mib: int) -> None:
    figures = frame_decode_throughput(total_bytes=total_mib << 20)
    decoder = figures["decoder_mib_s"]
    zlib_raw = figures["zlib_crc32_mib_s"]
    print(f"frame decode (1 MiB frames, 64 KiB reads, crcmod): {decoder:8.1f} MiB/s")
    print(f"baseline, raw zlib.crc32 over the same bytes:      {zlib_raw:8.1f} MiB/s")
    print(f"baseline, raw crcmod crc-32 over the same bytes:   {figures['crcmod_crc32_mib_s']:8.1f} MiB/s")
    print(f"ratio (decoder / raw zlib.crc32):                  {decoder / zlib_raw:8.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="corral benchmarks")
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--frames-mib", type=int, default=256)
    parser.add_argument("--only", choices=("boot", "frames"))
    args = parser.parse_args(argv)
    cfg = config.load()
    if args.only in (None, "frames"):
        bench_frames(args.frames_mib)
    if args.only in (None, "boot"):
        bench_boot(cfg, args.boots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
