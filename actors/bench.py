"""Benchmarks, each printed beside a baseline measured in the same run.

    scripts/bench [--only frames|boot|service|scram|intake|capabilities] [--boots N] [--tasks N] [--instance NAME]

- cold boot: createXML until the agent's Hello, over N boots, against the same
  kernel booting a busybox-only initramfs whose init powers off at once
  (createXML until the domain stops running): what our initramfs, root mount
  and agent start add on top of the bare kernel.
- frame decode: FrameDecoder throughput against raw zlib.crc32 over the same bytes.
- service: through a real corrald (actors, ZeroMQ, warm pool): warm acquire
  (resume + agent answer, from the replies) and end-to-end latency of `true`
  p50/p99 with a pool of 2, one task at a time, against `true` over a bare
  GuestLink on a booted VM (what the actors and ZeroMQ add); throughput with pools of 1, 2 and 4 against booting a cold
  VM for every task.
- acquire: what a warm acquire is made of, on one bare VM: libvirt resume()
  then the agent's heartbeat answer, against QEMU's own QMP `cont` (a second
  monitor socket added for the benchmark only) then the same answer.
- scram: through a real corrald with a pool of 2, both VMs running a task:
  `corral admin scram` until every VM is paused (as the reply reports it and
  libvirt confirms), against one bare suspend() call on a running VM.
- intake: what the admission check (identity, grants, budget) costs per
  request: sequential round trips through the real IntakeServer and client
  to an actor that answers at once (no VM), with the local identity and its
  budget and with CurveZMQ + ZAP, against the same server admitting
  everything unchecked.
- capabilities: through a real corrald with a default pool of 1 and the rare
  tiers booted on demand: `true` with net:egress, res:large_mem (the first
  one waits for its VM to boot, the rest find it warm) and res:high_cpu (CPU
  set live before the resume), against default `true` in the same run.
"""

from __future__ import annotations

import argparse
import os
import concurrent.futures
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import config
from actors.hypervisor import hypervisor_from_config
from actors.guest_link import booted_vm
from actors.hypervisor import Hypervisor
from guest.image.build import Cpio
from protocol.bench import frame_decode_throughput

BUSYBOX_POWEROFF_INIT = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def latency(samples_s: list[float]) -> str:
    ms = [s * 1000 for s in samples_s]
    return f"p50 {percentile(ms, 50):7.1f} ms  p99 {percentile(ms, 99):7.1f} ms  (n={len(ms)})"


def summary(samples: list[float]) -> str:
    return (f"{min(samples):.2f} / {statistics.median(samples):.2f} / {max(samples):.2f} s "
            f"(min / median / max, n={len(samples)})")


def boot_to_hello(hypervisor: Hypervisor, timeout_s: float) -> float:
    started = time.monotonic()
    with booted_vm(hypervisor, timeout_s):
        return time.monotonic() - started


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

    name = hypervisor.prefix + "bench" + format(time.monotonic_ns() % 16**7, "07x")
    spec = hypervisor.spec_for(name, overlay=Path("/nonexistent"), socket=None)
    spec = dataclasses.replace(spec, initrd=initrd, disks=(), channel_socket=None)
    started = time.monotonic()
    domain = hypervisor.conn.createXML(spec.to_xml(), 0)
    while time.monotonic() - started < timeout_s:
        try:
            # Powered off: QEMU stops the guest at once; libvirt's clean-up after
            # that (seconds, here) is not the guest's boot and is not counted.
            if domain.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                return time.monotonic() - started
        except libvirt.libvirtError:
            return time.monotonic() - started  # already gone: on_poweroff destroys it
        time.sleep(0.002)
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


def bare_link_true(hypervisor: Hypervisor, cfg: config.Config, runs: int) -> list[float]:
    """`true` over a GuestLink on one booted VM: the guest's own cost."""
    with booted_vm(hypervisor, cfg.vm.boot_timeout_s) as (_, link, _):
        samples = []
        for _ in range(runs + 3):
            started = time.monotonic()
            link.run([b"true"], time.monotonic() + 30)
            samples.append(time.monotonic() - started)
        return samples[3:]  # the first commands pay TCG's translation


def cold_vm_per_task(hypervisor: Hypervisor, cfg: config.Config, tasks: int) -> float:
    """Tasks per second when every task boots, runs `true` in, and destroys its own VM."""
    started = time.monotonic()
    for _ in range(tasks):
        with booted_vm(hypervisor, cfg.vm.boot_timeout_s) as (_, link, _):
            link.run([b"true"], time.monotonic() + 30)
    return tasks / (time.monotonic() - started)


def run_service(cfg: config.Config, hypervisor: Hypervisor, pool_size: int, body, tier_max: int = 2):
    from actors.service import Corral
    from protocol.client import Client

    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(
            cfg, daemon=dataclasses.replace(cfg.daemon, endpoint=f"ipc://{tmp}/bench.sock"),
            control=dataclasses.replace(cfg.control, endpoint=f"ipc://{tmp}/control/control.sock"),
            pool=dataclasses.replace(cfg.pool, size=pool_size, tier_size=0, tier_max=tier_max),
            metrics=dataclasses.replace(cfg.metrics, port=0))
        service = Corral(cfg, hypervisor)
        service.start()
        try:
            with Client(cfg.daemon.endpoint) as client:
                deadline = time.monotonic() + 60 + 15 * pool_size
                while dict(client.status().pool).get(b"ready") != str(pool_size).encode():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"pool of {pool_size} not ready")
                    time.sleep(0.1)
                return body(client, service)
        finally:
            service.stop()


def sequential_true(client, runs: int) -> tuple[list[float], list[float]]:
    end_to_end, acquire = [], []
    for _ in range(runs):
        started = time.monotonic()
        reply = client.run(["true"], wait_s=60)
        end_to_end.append(time.monotonic() - started)
        if reply.error_code or reply.exit_code:
            raise RuntimeError(f"`true` failed: {reply.error_code} {reply.error_message}")
        acquire.append(reply.acquire_ms / 1000)
    return end_to_end, acquire


def throughput(client, tasks: int) -> float:
    started = time.monotonic()
    futures = [client.submit(["true"]) for _ in range(tasks)]
    for future in concurrent.futures.as_completed(futures, timeout=600):
        if future.result().error_code:
            raise RuntimeError(future.result().error_message)
    return tasks / (time.monotonic() - started)


def bench_service(cfg: config.Config, runs: int) -> None:
    hypervisor = hypervisor_from_config(cfg)
    try:
        print(f"accelerator: {hypervisor.accelerator}")
        bare = bare_link_true(hypervisor, cfg, runs)
        # A pool of 2: the next task finds a paused VM while the last one resets.
        end_to_end, acquire = run_service(cfg, hypervisor, 2, lambda c, _: sequential_true(c, runs))
        print(f"`true` end to end through ZeroMQ:  {latency(end_to_end)}")
        print(f"baseline, `true` over a GuestLink: {latency(bare)}")
        print(f"ratio (p50):                       {percentile(end_to_end, 50) / percentile(bare, 50):.2f}x")
        print(f"warm acquire (resume + answer):    {latency(acquire)}")
        cold_rate = cold_vm_per_task(hypervisor, cfg, 3)
        print(f"baseline, cold VM per task:        {cold_rate:7.2f} tasks/s")
        for size in (1, 2, 4):
            rate = run_service(cfg, hypervisor, size, lambda c, _: throughput(c, runs))
            print(f"throughput, warm pool of {size}:       {rate:7.2f} tasks/s  "
                  f"({rate / cold_rate:.1f}x cold VM per task)")
    finally:
        hypervisor.close()


def scram_rounds(service, client, rounds: int) -> list[float]:
    from protocol import admin

    paused_in = []
    for _ in range(rounds):
        running = [client.submit(["sleep", "2"]) for _ in range(2)]
        while dict(client.status().pool).get(b"busy") != b"2":
            time.sleep(0.01)
        time.sleep(0.2)
        reply = admin.request(service.cfg.control.endpoint, "scram", ["bench"])
        if not reply.ok:
            raise RuntimeError(reply.message)
        paused_in.append(float(dict(reply.fields)[b"paused_in_ms"]) / 1000)
        admin.request(service.cfg.control.endpoint, "resume", [])
        for future in running:
            future.result(timeout=60)
        while dict(client.status().pool).get(b"ready") != b"2":
            time.sleep(0.05)
    return paused_in


def bench_scram(cfg: config.Config, rounds: int) -> None:
    hypervisor = hypervisor_from_config(cfg)
    try:
        with booted_vm(hypervisor, cfg.vm.boot_timeout_s) as (handle, _, _):
            suspends = []
            for _ in range(rounds):
                started = time.monotonic()
                hypervisor.suspend(handle.name)
                suspends.append(time.monotonic() - started)
                hypervisor.resume(handle.name)
        paused_in = run_service(cfg, hypervisor, 2, lambda client, service: scram_rounds(service, client, rounds))
        print(f"SCRAM until 2 busy VMs paused:     {latency(paused_in)}")
        print(f"baseline, one suspend() call:      {latency(suspends)}")
        print(f"ratio (p50):                       {percentile(paused_in, 50) / percentile(suspends, 50):.2f}x")
    finally:
        hypervisor.close()
def capability_latencies(client, runs: int) -> dict:
    """name -> (first task's latency, later tasks' latencies), `true` each time."""
    figures = {}
    for name, capabilities in (("default", ()), ("net:egress", ("net:egress",)),
                               ("res:large_mem", ("res:large_mem",)),
                               ("res:high_cpu", ("res:high_cpu",))):
        samples = []
        for _ in range(runs + 1):
            started = time.monotonic()
            reply = client.run(["true"], capabilities=capabilities, wait_s=120)
            samples.append(time.monotonic() - started)
            if reply.error_code or reply.exit_code:
                raise RuntimeError(f"`true` with {name} failed: {reply.error_code} {reply.error_message}")
        figures[name] = (samples[0], samples[1:])
    return figures


def bench_capabilities(cfg: config.Config, runs: int) -> None:
    hypervisor = hypervisor_from_config(cfg)
    try:
        figures = run_service(cfg, hypervisor, 1, lambda client, _: capability_latencies(client, runs), tier_max=1)
    finally:
        hypervisor.close()
    base = percentile(figures["default"][1], 50)
    for name, (first, later) in figures.items():
        print(f"`true` with {name:14s} first {first * 1000:8.1f} ms, then {latency(later)}  "
              f"ratio (p50 / default p50) {percentile(later, 50) / base:.2f}x")


def intake_round_trips(admission, runs: int, **client_keys) -> list[float]:
    import pykka

    from actors.directory import Directory
    from actors.intake import IntakeServer, TaskLimits
    from actors.messages import Submit
    from actors.metrics import Metrics
    from protocol.client import Client
    from protocol.tasks import error_reply

    class Answerer(pykka.ThreadingActor):
        def __init__(self, directory: Directory):
            super().__init__()
            self.directory = directory

        def on_receive(self, message) -> None:
            if isinstance(message, Submit):
                self.directory.answer(message.task.ticket, error_reply(message.task.request.task_id, "", ""))

    directory = Directory()
    limits = TaskLimits(60_000, 3_600_000, 1 << 20, 16 << 20, 1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        server = IntakeServer(f"ipc://{tmp}/intake.sock", limits, Metrics(), directory, admission)
        directory.answer_fallback = server.post
        server.start()
        answerer = Answerer.start(directory)
        directory["scheduler"] = answerer
        try:
            with Client(server.endpoint, **client_keys) as client:
                samples = []
                for i in range(runs + 50):  # the first 50 warm up
                    started = time.perf_counter()
                    reply = client.run(["true"], capabilities=["dev:python"], wait_s=10)
                    if reply.error_code:
                        raise RuntimeError(f"{reply.error_code}: {reply.error_message}")
                    if i >= 50:
                        samples.append(time.perf_counter() - started)
                return samples
        finally:
            answerer.stop()
            server.stop()


def bench_intake(runs: int) -> None:
    from actors.identity import Admission
    from actors.intake import KNOWN_CAPABILITIES, OFFERED_CAPABILITIES
    from protocol.client import keygen

    with tempfile.TemporaryDirectory() as keys:
        keygen("corrald", keys)
        keygen("bench", Path(keys) / "clients")
        Path(keys, "clients", "bench.key_secret").rename(Path(keys, "bench.key_secret"))
        budget = {"budget": {"capacity": 1e9, "refill_per_s": 1e9}}
        local = config.load(overrides=budget)
        curve = config.load(overrides={**budget, "identity": {
            "server_secret_key": f"{keys}/corrald.key_secret", "client_keys_dir": f"{keys}/clients"}})
        modes = [
            ("baseline, no admission check", Admission.unlimited(OFFERED_CAPABILITIES), {}),
            ("local identity + budget", Admission.from_config(local, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES), {}),
            ("CurveZMQ + ZAP + budget", Admission.from_config(curve, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES),
             {"server_key": f"{keys}/corrald.key", "client_key": f"{keys}/bench.key_secret"}),
        ]
        results = {name: intake_round_trips(admission, runs, **client_keys)
                   for name, admission, client_keys in modes}
    base = percentile(results[modes[0][0]], 50)
    for name, samples in results.items():
        print(f"intake round trip, {name + ':':<31} {latency(samples)}  "
              f"ratio (p50) {percentile(samples, 50) / base:.2f}x")


def _qmp_domain(hypervisor: Hypervisor, qmp_dir: Path):
    """A VM like the pool's plus a QMP socket of our own (benchmark only)."""
    import pwd
    import xml.etree.ElementTree as ET

    from actors.hypervisor import create_overlay

    user = pwd.getpwnam("libvirt-qemu")  # QEMU creates the socket as libvirt's qemu user
    qmp_dir.mkdir(mode=0o750, exist_ok=True)
    os.chown(qmp_dir, user.pw_uid, user.pw_gid)
    name = hypervisor.new_name()
    overlay, channel = hypervisor.overlay_dir / f"{name}.qcow2", hypervisor.run_dir / f"{name}.sock"
    qmp_path = qmp_dir / f"{name}.qmp"
    ns = "http://libvirt.org/schemas/domain/qemu/1.0"
    ET.register_namespace("qemu", ns)
    domain = ET.fromstring(hypervisor.spec_for(name, overlay, channel).to_xml())
    commandline = ET.SubElement(domain, f"{{{ns}}}commandline")
    for arg in ("-qmp", f"unix:{qmp_path},server=on,wait=off"):
        ET.SubElement(commandline, f"{{{ns}}}arg", value=arg)
    create_overlay(hypervisor.image.disk, overlay)
    hypervisor.conn.createXML(ET.tostring(domain, encoding="unicode"), 0)
    return name, channel, qmp_path


def bench_acquire(cfg: config.Config, rounds: int) -> None:
    import json
    import socket

    from actors.guest_link import GuestLink
    from protocol import messages

    hypervisor = hypervisor_from_config(cfg)
    name = None
    try:
        name, channel, qmp_path = _qmp_domain(hypervisor, cfg.state_dir / "bench-qmp")
        link = GuestLink(str(channel))
        deadline = time.monotonic() + cfg.vm.boot_timeout_s
        link.connect(deadline)
        link.wait_hello(deadline)
        qmp = socket.socket(socket.AF_UNIX)
        qmp.connect(str(qmp_path))
        qmp_file = qmp.makefile("rwb")

        def qmp_execute(command: str) -> None:
            qmp_file.write(json.dumps({"execute": command}).encode() + b"\n")
            qmp_file.flush()
            while not {"return", "error"} & json.loads(qmp_file.readline()).keys():
                pass  # an event: read on

        qmp_file.readline()  # the greeting
        qmp_execute("qmp_capabilities")
        resumes = {"libvirt": ([], []), "qmp": ([], [])}
        for nonce in range(1, rounds + 1):
            for way, resume in (("libvirt", lambda: hypervisor.resume(name)), ("qmp", lambda: qmp_execute("cont"))):
                hypervisor.suspend(name)
                link.send(messages.Heartbeat(nonce=nonce))
                started = time.monotonic()
                resume()
                resumed = time.monotonic()
                link.receive(frozenset({messages.HeartbeatAck}), resumed + 5)
                resumes[way][0].append(resumed - started)
                resumes[way][1].append(time.monotonic() - started)
                # libvirt learns of a QMP `cont` only from QEMU's RESUME event: until it
                # has, its own suspend() races it (a reason the bypass needs care).
                while hypervisor.domain_states().get(name) != "running":
                    time.sleep(0.001)
        for way, label in (("libvirt", "libvirt resume()"), ("qmp", "QMP cont")):
            alone, answered = resumes[way]
            print(f"{label + ' + heartbeat answer:':34} {latency(answered)}")
            print(f"{'  of which ' + label + ':':34} {latency(alone)}")
        ratio = percentile(resumes["qmp"][1], 50) / percentile(resumes["libvirt"][1], 50)
        print(f"ratio (p50, QMP / libvirt):        {ratio:.2f}x")
    finally:
        if name is not None:
            hypervisor.destroy_by_name(name)
        hypervisor.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="corral benchmarks")
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--frames-mib", type=int, default=256)
    parser.add_argument("--tasks", type=int, default=50, help="tasks per service measurement")
    parser.add_argument("--only", choices=("boot", "frames", "service", "scram", "acquire", "intake", "capabilities"))
    parser.add_argument("--scrams", type=int, default=5)
    parser.add_argument("--instance", help="names the VMs (default: daemon.instance of the config)")
    args = parser.parse_args(argv)
    cfg = config.load(overrides={"daemon": {"instance": args.instance}} if args.instance else None)
    if args.only in (None, "frames"):
        bench_frames(args.frames_mib)
    if args.only in (None, "boot"):
        bench_boot(cfg, args.boots)
    if args.only in (None, "service"):
        bench_service(cfg, args.tasks)
    if args.only in (None, "acquire"):
        bench_acquire(cfg, 30)
    if args.only in (None, "scram"):
        bench_scram(cfg, args.scrams)
    if args.only in (None, "intake"):
        bench_intake(max(args.tasks, 1000))
    if args.only in (None, "capabilities"):
        bench_capabilities(cfg, min(args.tasks, 8))  # under pool.max_uses: no retirement mid-run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
