"""Host memory while hostile guests hold frames half-sent: a one-off
measurement (real corrald tree in this process, real TCG VMs on the hostile
agent ISO), not run in CI, since booting 8 VMs on a small host takes minutes:

    CORRAL_TEST_INSTANCE=frames python -m tests.tools.measure_partial_frames --vms 8
    CORRAL_TEST_INSTANCE=frames python -m tests.tools.measure_partial_frames --vms 8 --max-partial-bytes 4194304

Each round, every VM of the pool is given `stall_frame N` at once: its agent
declares a 1 MiB frame, sends N bytes of it and stops. Rounds: N = 10 (the
attack of issue 16), then N = 1 MiB - 1 (all but the last byte: the most a
frame can hold). Prints, per round, this process's RSS before and at its
peak (sampled every 5 ms), IOGuard's most bytes admitted and held in partial
frames, and when the answers came. For comparison it first feeds the same
headers to main's decoder (`git show main:protocol/channel/frame.py`), which
allocated each frame's declared length at its header.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import subprocess
import threading
import time
import tracemalloc
import types
import zlib
from pathlib import Path

from actors.vm.accelerator import detect_accelerator
from actors.vm.host import Hypervisor
from actors.service import Corral
from guest.image.build import build_agent_iso
from guest.image.paths import guest_image
from protocol.client.api import Client
from protocol.channel.frame import HEADER, MAGIC
from tests.support.host import STATE_DIR, TEST_INSTANCE
from tests.support.service import pool_vms, service_config, start_service
from tests.support.waiting import wait_until

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
DECLARED = 1 * MiB  # what guest/hostile_agent.py's stall_frame declares
PAGE = 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Samples this process's RSS every 5 ms while running."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def mains_decoder_cost(vms: int) -> int:
    """Bytes main's FrameDecoder allocates for `vms` headers declaring 1 MiB plus 10 bytes each."""
    source = subprocess.run(["git", "-C", str(REPO), "show", "main:protocol/channel/frame.py"],
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("protocol.frame_on_main")
    module.__package__ = "protocol"
    exec(compile(source, "main:protocol/channel/frame.py", "exec"), module.__dict__)
    tracemalloc.start()
    try:
        decoders = [module.FrameDecoder(zlib.crc32) for _ in range(vms)]
        for decoder in decoders:
            decoder.feed(HEADER.pack(MAGIC, DECLARED, 0, 0) + b"s" * 10)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return held


def round_of_stalls(svc: Corral, client: Client, vms: int, sent: int) -> None:
    wait_until(lambda: list(pool_vms(svc).values()).count("ready") >= vms, 1800, f"{vms} ready VMs")
    ioguard = svc.directory.get("ioguard").proxy()
    before = rss_bytes()
    started = time.monotonic()
    with PeakRss() as peak:
        futures = [client.submit(["stall_frame", str(sent)], timeout_s=120) for _ in range(vms)]
        answered = []
        for future in concurrent.futures.as_completed(futures, timeout=600):
            reply = future.result()
            answered.append(time.monotonic() - started)
            assert reply.error_code == "protocol_violation", reply
    total = ioguard.stats().get(timeout=5)["total"]
    print(f"FIGURE {vms} VMs each declaring 1 MiB and sending {sent} bytes: RSS {before / MiB:.1f} MiB "
          f"-> peak {peak.peak / MiB:.1f} MiB (+{(peak.peak - before) / MiB:.1f}); IOGuard held at most "
          f"{total['held_peak'] / MiB:.2f} MiB, admitted at most {total['partial_peak'] / MiB:.2f} MiB "
          f"(max_partial_bytes {svc.cfg.ioguard.max_partial_bytes / MiB:g} MiB; peaks since start), "
          f"{total['room_waits']} waits for room; "
          f"answered protocol_violation after {min(answered):.2f}-{max(answered):.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=8)
    parser.add_argument("--max-partial-bytes", type=int, default=None)
    args = parser.parse_args()

    held = mains_decoder_cost(args.vms)
    print(f"FIGURE main's decoder, {args.vms} headers declaring 1 MiB + 10 bytes each: "
          f"{held / MiB:.2f} MiB allocated (until the task's timeout + 5 s)", flush=True)

    instance = f"{TEST_INSTANCE}m"[:16]
    socket_dir = Path(f"/tmp/corral-measure-{instance}")
    socket_dir.mkdir(exist_ok=True)
    ioguard = {"max_partial_bytes": args.max_partial_bytes} if args.max_partial_bytes else {}
    cfg = service_config(socket_dir, instance, pool={"size": args.vms, "boot_backoff_max_s": 5.0}, ioguard=ioguard)
    iso = build_agent_iso(STATE_DIR, hostile=True)
    image = dataclasses.replace(guest_image(STATE_DIR), agent_iso=iso)
    hypervisor = Hypervisor(uri=cfg.libvirt_uri, state_dir=cfg.state_dir, image=image,
                            accelerator=detect_accelerator(cfg.vm.accelerator), memory_mib=256, vcpus=1,
                            tmpfs_size=cfg.vm.tmpfs_size, instance=instance)
    svc = start_service(cfg, hypervisor)
    try:
        with Client(cfg.daemon.endpoint) as client:
            for sent in (10, DECLARED - 1):
                round_of_stalls(svc, client, args.vms, sent)
    finally:
        svc.stop()
        hypervisor.close()


if __name__ == "__main__":
    main()
