"""Benchmarks, each printed beside a baseline measured in the same run.

    scripts/bench [--only frames|boot|service|scram|intake|capabilities|strict|steady|refill|stream|session]
                  [--boots N]
                  [--tasks N]
                  [--strict-tasks N] [--rate R] [--seconds S] [--instance NAME]

- cold boot: createXML until the agent's Hello, over N boots, against the same
  kernel booting a busybox-only initramfs whose init powers off at once
  (createXML until the domain stops running): what our initramfs, root mount
  and agent start add on top of the bare kernel.
- frame decode: FrameDecoder throughput against raw zlib.crc32 over the same bytes.
- service: through a real corrald (actors, ZeroMQ, warm pool): warm acquire
  (assignment to the agent's answer after the resume, from corrald's acquire
  histogram), tasks back to back and 0.1 s apart, against the same service
  resuming through libvirt and not settling VMs (vm.fast_resume = false,
  pool.settle_ms = 0); end-to-end latency of `true`
  p50/p99 with a pool of 2, one task at a time, against `true` over a bare
  GuestLink on a booted VM (what the actors and ZeroMQ add); throughput with pools of 1, 2 and 4 against booting a cold
  VM for every task.
- acquire: what a warm acquire is made of, on one bare VM paused 0.1 s:
  QMP `cont` on corral's own monitor socket (vm.fast_resume) then the agent's
  heartbeat answer, against libvirt's resume() then the same answer.
- scram: through a real corrald with a pool of 2, both VMs running a task:
  `corral admin scram` until every VM is paused (as the reply reports it and
  libvirt confirms), against one bare pause of a running VM (as a Supervisor
  pauses: QMP `stop`, or libvirt suspend() without vm.fast_resume).
- intake: what the admission check (identity, grants, budget) costs per
  request: sequential round trips through the real IntakeServer and client
  to an actor that answers at once (no VM), with the local identity and its
  budget and with CurveZMQ + ZAP, against the same server admitting
  everything unchecked.
- capabilities: through a real corrald with a default pool of 1 and the rare
  tiers booted on demand: `true` with net:egress, res:large_mem (the first
  one waits for its VM to boot, the rest find it warm) and res:high_cpu (CPU
  set live before the resume), against default `true` in the same run. Then
  egress (docs/egress.md): time to the first byte of an HTTPS GET of
  allowed.test from a net:egress task (--allow allowed.test, through the
  guest's relay and corrald's egress proxy), against the same GET from the
  host, one run each; allowed.test is a server in a network namespace on this
  machine (tests/support/internet.py), nothing leaves it.
- strict: through a real corrald in strict mode (pool.strict: one task per
  VM) with a pool of 2, N sequential `corral run -- true` through the real CLI
  (a process each): mean wall time per task, against a cold boot to the
  agent's Hello measured in the same run (median of --boots), and the CLI's
  own floor (`corral status`, a process each) beside it.
- steady: through a real corrald with the default pool config, `true` at a
  steady --rate tasks/s (open loop: each sent at its time, whatever the last
  one did) for --seconds through the Python client: end-to-end latency
  p50/p99 and p99/p50, with the VMs retired and booted meanwhile; time queued
  for a VM (the reply's queued_ms) says what of the tail the pool's refill is.
  Baseline: the same load on a pool whose VMs never retire (pool.max_uses and
  pool.max_age_s at their maximum), what the host does without any refill.
- refill: a clone of the snapshot template restored as a Supervisor makes
  it, timed to its agent's ready (restore, Resume answered: it could take a
  task) and to offered (after one warm-up `true`, which a Supervisor runs so
  that the first task does not pay for TCG's empty code cache), against a
  cold boot until the agent's Hello, interleaved over N rounds; then one
  clone's QEMU RSS beside one booted VM's.
- stream: through a real corrald with a pool of 2, `echo` streamed
  (Client.stream): time until its first output chunk is in the caller's
  hands, against the end-to-end time of the same `echo` unstreamed
  (Client.run: output in the reply), the two interleaved in one run; the
  streamed task's own end to end beside them. Then a slow reader: `yes`
  streamed for 20 s to a caller that reads none of it, while another caller
  runs `true` one after the other: corrald's RSS before and at its highest
  (the bench runs corrald in its own process), and `true`'s p50 meanwhile
  against its p50 on the same idle service just before.
- session: through a real corrald with a pool of 2, `true` as an exec in one
  open session (no acquire, no reset: the VM runs) against `true` as a
  one-shot task, interleaved, p50 and p99. Then session snapshots, over
  --boots rounds: a session that wrote a file is forked into 1 and into 3
  sessions (SessionFork until the reply: its VM saved, then restored once for
  itself and once per fork, side by side), paused to disk and resumed, each
  against opening a fresh session from the warm pool and against a cold boot
  to the agent's Hello (what a VM with none of the session's state costs),
  both in the same run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import config
from actors.vm.guest_link import booted_vm
from actors.vm.host import Hypervisor
from guest.image.build import Cpio
from protocol.bench import frame_decode_throughput

BUSYBOX_POWEROFF_INIT = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"
REPO = Path(__file__).resolve().parents[1]


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
    spec = dataclasses.replace(spec, initrd=initrd, disks=(), channel_socket=None, monitor_socket=None)
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
    hypervisor = Hypervisor.from_config(cfg)
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
    from protocol.client.api import Client

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


def acquire_total_s(service) -> float:
    """Every warm acquire so far, summed (the acquire histogram's sum): with one
    task at a time, the difference is that task's acquire, unrounded."""
    for metric in service.metrics.acquire_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                return sample.value
    raise RuntimeError("corral_vm_acquire_seconds has no _sum")


def sequential_true(client, service, runs: int, gap_s: float = 0.0) -> tuple[list[float], list[float]]:
    """`true` one task at a time, `gap_s` after the last answer: (end to end, acquire)."""
    end_to_end, acquire = [], []
    for _ in range(runs):
        time.sleep(gap_s)
        acquired_before = acquire_total_s(service)
        started = time.monotonic()
        reply = client.run(["true"], wait_s=60)
        end_to_end.append(time.monotonic() - started)
        if reply.error_code or reply.exit_code:
            raise RuntimeError(f"`true` failed: {reply.error_code} {reply.error_message}")
        acquire.append(acquire_total_s(service) - acquired_before)
    return end_to_end, acquire


def sequential_true_both_ways(client, service, runs: int) -> dict:
    """Back to back (the next task meets one VM paused, the other resetting), and
    0.1 s apart (every VM paused and idle, as between an agent's tool calls)."""
    return {"back to back": sequential_true(client, service, runs),
            "0.1 s apart": sequential_true(client, service, runs, gap_s=0.1)}


def throughput(client, tasks: int) -> float:
    started = time.monotonic()
    futures = [client.submit(["true"]) for _ in range(tasks)]
    for future in concurrent.futures.as_completed(futures, timeout=600):
        if future.result().error_code:
            raise RuntimeError(future.result().error_message)
    return tasks / (time.monotonic() - started)


def bench_service(cfg: config.Config, runs: int) -> None:
    hypervisor = Hypervisor.from_config(cfg)
    # The acquire's baseline: the same service resuming through libvirt, with no
    # settling after a release (vm.fast_resume = false, pool.settle_ms = 0).
    baseline_cfg = dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, fast_resume=False),
                                       pool=dataclasses.replace(cfg.pool, settle_ms=0))
    through_libvirt = Hypervisor.from_config(baseline_cfg)
    try:
        print(f"accelerator: {hypervisor.accelerator}; "
              f"pause/resume through {'QMP' if hypervisor.fast_resume else 'libvirt'}")
        bare = bare_link_true(hypervisor, cfg, runs)
        # A pool of 2: a task sent at once after the last finds a paused VM while the other resets.
        figures = run_service(cfg, hypervisor, 2, lambda c, s: sequential_true_both_ways(c, s, runs))
        baseline = run_service(baseline_cfg, through_libvirt, 2, lambda c, s: sequential_true_both_ways(c, s, runs))
        end_to_end = figures["back to back"][0]
        print(f"`true` end to end through ZeroMQ:  {latency(end_to_end)}")
        print(f"baseline, `true` over a GuestLink: {latency(bare)}")
        print(f"ratio (p50):                       {percentile(end_to_end, 50) / percentile(bare, 50):.2f}x")
        for spacing in figures:
            acquire, libvirt_acquire = figures[spacing][1], baseline[spacing][1]
            print(f"warm acquire, {spacing + ':':21}{latency(acquire)}")
            print(f"  baseline, libvirt, no settling:  {latency(libvirt_acquire)}  "
                  f"ratio (p50) {percentile(acquire, 50) / percentile(libvirt_acquire, 50):.2f}x")
        cold_rate = cold_vm_per_task(hypervisor, cfg, 3)
        print(f"baseline, cold VM per task:        {cold_rate:7.2f} tasks/s")
        for size in (1, 2, 4):
            rate = run_service(cfg, hypervisor, size, lambda c, _: throughput(c, runs))
            print(f"throughput, warm pool of {size}:       {rate:7.2f} tasks/s  "
                  f"({rate / cold_rate:.1f}x cold VM per task)")
    finally:
        hypervisor.close()
        through_libvirt.close()


def scram_rounds(service, client, rounds: int) -> list[float]:
    from protocol.client import admin

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
    hypervisor = Hypervisor.from_config(cfg)
    try:
        with booted_vm(hypervisor, cfg.vm.boot_timeout_s) as (handle, _, _):
            control = hypervisor.run_control(handle)  # as a Supervisor pauses its VM
            pauses = []
            for _ in range(rounds):
                started = time.monotonic()
                control.pause()
                pauses.append(time.monotonic() - started)
                control.resume()
            control.close()
        paused_in = run_service(cfg, hypervisor, 2, lambda client, service: scram_rounds(service, client, rounds))
        print(f"SCRAM until 2 busy VMs paused:     {latency(paused_in)}")
        print(f"baseline, one pause of a VM:        {latency(pauses)}")
        print(f"ratio (p50):                       {percentile(paused_in, 50) / percentile(pauses, 50):.2f}x")
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


# Time to the first byte of an HTTPS GET (connect, TLS, request, first byte of the
# answer), printed in ms by the same code on the host and in the guest.
TTFB = r"""
import socket, ssl, sys, time
context = ssl.create_default_context(cafile=sys.argv[1])
for _ in range(3):  # the first pays for cold code (TCG translates the relay's path anew after a restore)
    started = time.monotonic()
    if len(sys.argv) > 2:  # in the guest: through the proxy address
        raw = socket.create_connection(("127.0.0.1", 3128), timeout=30)
        raw.sendall(b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n")
        assert b" 200 " in raw.recv(4096)
    else:
        raw = socket.create_connection(("allowed.test", 443), timeout=30)
    connected = time.monotonic()
    tls = context.wrap_socket(raw, server_hostname="allowed.test")
    tls.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    tls.recv(1)
    print(f"{(time.monotonic() - started) * 1000:.1f} {(connected - started) * 1000:.1f}")
    tls.close()
"""


def egress_first_byte(client, ca_pem: bytes) -> float:
    reply = client.run(["python3", "-", "/tmp/ca.pem", "proxy"], stdin=TTFB.encode(),
                       capabilities=["net:egress", "dev:python"], egress_allow=["allowed.test"],
                       files_in=[("/tmp/ca.pem", ca_pem, 0o644)], wait_s=300)
    if reply.error_code or reply.exit_code:
        raise RuntimeError(f"the egress GET failed: {reply.error_code} {reply.error_message} {reply.stderr!r}")
    return [tuple(float(ms) / 1000 for ms in line.split()) for line in reply.stdout.decode().splitlines()]


def bench_capabilities(cfg: config.Config, runs: int) -> None:
    from tests.support import internet  # the test "internet": a namespace on this machine

    hypervisor = Hypervisor.from_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        net = internet.start(cfg.daemon.instance, Path(tmp))
        try:
            egress_cfg = dataclasses.replace(cfg, egress=dataclasses.replace(cfg.egress, resolver=internet.DNS_IP))

            def body(client, _):
                figures = capability_latencies(client, runs)
                client.run(["true"], capabilities=["net:egress"], wait_s=120)  # its VM warm, as for a caller
                return figures, egress_first_byte(client, net.ca_pem)

            figures, guest_s_runs = run_service(egress_cfg, hypervisor, 1, body, tier_max=1)
            # The host's GET goes to the address the proxy resolves allowed.test to.
            script = TTFB.replace('("allowed.test", 443)', f'("{internet.ALLOWED_IP}", 443)')
            host_ms = subprocess.run([sys.executable, "-c", script, str(net.ca)], capture_output=True, text=True,
                                     check=True).stdout
        finally:
            internet.stop(cfg.daemon.instance, net)
            hypervisor.close()
    base = percentile(figures["default"][1], 50)
    for name, (first, later) in figures.items():
        print(f"`true` with {name:14s} first {first * 1000:8.1f} ms, then {latency(later)}  "
              f"ratio (p50 / default p50) {percentile(later, 50) / base:.2f}x")
    host = [tuple(float(ms) / 1000 for ms in line.split()) for line in host_ms.splitlines()]
    for label, i in (("first", 0), ("third", 2)):
        (guest_s, guest_connect_s), (host_s, host_connect_s) = guest_s_runs[i], host[i]
        print(f"HTTPS GET allowed.test, time to first byte, {label} GET: net:egress task {guest_s * 1000:.1f} ms, "
              f"host {host_s * 1000:.1f} ms ({guest_s / host_s:.0f}x); of which the TCP connection "
              f"(in the guest: CONNECT through relay and proxy, DNS included) {guest_connect_s * 1000:.1f} ms, "
              f"host {host_connect_s * 1000:.1f} ms")


def intake_round_trips(admission, runs: int, **client_keys) -> list[float]:
    import pykka

    from actors.directory import Directory
    from actors.edge.intake_server import IntakeServer, TaskLimits
    from actors.messages import Submit
    from actors.edge.metrics import Metrics
    from protocol.client.api import Client
    from protocol.wire.tasks import error_reply

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
    from actors.edge.identity import Admission
    from actors.edge.intake_server import KNOWN_CAPABILITIES, OFFERED_CAPABILITIES
    from protocol.client.api import keygen

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


def bench_acquire(cfg: config.Config, rounds: int, idle_s: float = 0.1) -> None:
    from actors.vm.handle import LibvirtRunControl
    from protocol.channel import messages

    hypervisor = Hypervisor.from_config(cfg)
    try:
        if not hypervisor.fast_resume:
            print("acquire: vm.fast_resume is off on this host (see the log): nothing to compare")
            return
        with booted_vm(hypervisor, cfg.vm.boot_timeout_s) as (handle, link, _):
            ways = {"QMP cont": hypervisor.run_control(handle),
                    "libvirt resume()": LibvirtRunControl(hypervisor, handle.name)}
            resumes = {way: ([], []) for way in ways}
            for nonce in range(1, rounds + 1):
                for way, control in ways.items():
                    # Paused the same way, and only once libvirt has caught up with
                    # the last QMP `cont` (it learns of it from QEMU's RESUME event).
                    while hypervisor.domain_states().get(handle.name) != "running":
                        time.sleep(0.001)
                    control.pause()
                    time.sleep(idle_s)  # a pool VM waits paused for its task
                    link.send(messages.Heartbeat(nonce=nonce))
                    started = time.monotonic()
                    control.resume()
                    resumed = time.monotonic()
                    link.receive(frozenset({messages.HeartbeatAck}), resumed + 5)
                    resumes[way][0].append(resumed - started)
                    resumes[way][1].append(time.monotonic() - started)
            ways["QMP cont"].close()
        print(f"one VM, paused {idle_s * 1000:.0f} ms before each resume:")
        for way, (alone, answered) in resumes.items():
            print(f"{way + ' + heartbeat answer:':34} {latency(answered)}")
            print(f"{'  of which ' + way + ':':34} {latency(alone)}")
        ratio = percentile(resumes["QMP cont"][1], 50) / percentile(resumes["libvirt resume()"][1], 50)
        print(f"ratio (p50, QMP / libvirt):        {ratio:.2f}x")
    finally:
        hypervisor.close()


def histogram_count(histogram) -> float:
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    raise RuntimeError(f"{histogram} has no _count")


def cli_wall_times(endpoint: str, argv: list[str], runs: int) -> list[float]:
    """`corral ARGV...` (the real CLI, a process each) `runs` times, one after
    another: the wall time of each, failing on a non-zero exit."""
    samples = []
    for _ in range(runs):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "protocol.client", argv[0], "--endpoint", endpoint, *argv[1:]],
                              capture_output=True, timeout=300, cwd=REPO)
        samples.append(time.monotonic() - started)
        if done.returncode:
            raise RuntimeError(f"corral {' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return samples


def strict_tasks(client, service, runs: int) -> dict:
    endpoint = service.cfg.daemon.endpoint
    boots_before = histogram_count(service.metrics.boot_seconds)
    tasks = cli_wall_times(endpoint, ["run", "--", "true"], runs)
    booted = histogram_count(service.metrics.boot_seconds) - boots_before
    floor = cli_wall_times(endpoint, ["status"], 5)
    return {"tasks": tasks, "floor": floor, "booted": booted}


def bench_strict(cfg: config.Config, boots: int, runs: int) -> None:
    hypervisor = Hypervisor.from_config(cfg)
    strict_cfg = dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, strict=True))
    try:
        print(f"accelerator: {hypervisor.accelerator}")
        cold = [boot_to_hello(hypervisor, cfg.vm.boot_timeout_s) for _ in range(boots)]
        figures = run_service(strict_cfg, hypervisor, 2, lambda c, s: strict_tasks(c, s, runs))
    finally:
        hypervisor.close()
    mean = statistics.mean(figures["tasks"])
    print(f"strict, pool of 2, {runs} sequential `corral run -- true`, {figures['booted']:.0f} VMs booted:")
    print(f"  mean {mean:.2f} s per task; {summary(figures['tasks'])}")
    print(f"  of which the CLI process, `corral status`:  median {statistics.median(figures['floor']):.2f} s")
    print(f"baseline, cold boot to agent ready:           {summary(cold)}")
    print(f"ratio (mean per task / median cold boot):     {mean / statistics.median(cold):.2f}x")


def steady_load(client, service, rate: float, seconds: float) -> dict:
    """`true` sent every 1/rate s for `seconds`: (end-to-end latencies, queued_ms of each)."""
    done_at: dict[int, float] = {}
    lock = threading.Lock()

    def finished(i: int):
        def record(_future) -> None:
            with lock:
                done_at[i] = time.monotonic()
        return record

    boots_before = histogram_count(service.metrics.boot_seconds)
    count = int(rate * seconds)
    started = time.monotonic()
    sent_at, futures = [], []
    for i in range(count):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        sent_at.append(time.monotonic())
        future = client.submit(["true"])
        future.add_done_callback(finished(i))
        futures.append(future)
    replies = [future.result(timeout=600) for future in futures]
    for reply in replies:
        if reply.error_code or reply.exit_code:
            raise RuntimeError(f"`true` failed: {reply.error_code} {reply.error_message}")
    with lock:
        latencies = [done_at[i] - sent_at[i] for i in range(count)]
    return {"latencies": latencies, "queued": [reply.queued_ms / 1000 for reply in replies],
            "sent_over_s": sent_at[-1] - started,
            "booted": histogram_count(service.metrics.boot_seconds) - boots_before}


def bench_steady(cfg: config.Config, rate: float, seconds: float) -> None:
    hypervisor = Hypervisor.from_config(cfg)
    never_retire = dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, max_uses=1_000_000, max_age_s=86400))
    try:
        print(f"accelerator: {hypervisor.accelerator}")
        figures = run_service(cfg, hypervisor, cfg.pool.size, lambda c, s: steady_load(c, s, rate, seconds))
        baseline = run_service(never_retire, hypervisor, cfg.pool.size,
                               lambda c, s: steady_load(c, s, rate, seconds))["latencies"]
    finally:
        hypervisor.close()
    latencies, queued = figures["latencies"], figures["queued"]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    print(f"steady `true`, {rate:g} tasks/s for {seconds:g} s (sent over {figures['sent_over_s']:.1f} s), "
          f"pool.size {cfg.pool.size}, pool.max_uses {cfg.pool.max_uses}, {figures['booted']:.0f} VMs booted")
    print(f"end to end:             {latency(latencies)}  max {max(latencies) * 1000:.1f} ms")
    print(f"  of which queued:      {latency(queued)}  "
          f"{sum(1 for q in queued if q >= 0.5)} tasks queued 0.5 s or more")
    print(f"ratio (p99 / p50):      {p99 / p50:.1f}x")
    print(f"baseline, VMs never retired: {latency(baseline)}  ratio (p99 / p50) "
          f"{percentile(baseline, 99) / percentile(baseline, 50):.1f}x")
    print(f"ratio (p50 / baseline p50): {p50 / percentile(baseline, 50):.1f}x  "
          f"(p99 / baseline p99): {p99 / percentile(baseline, 99):.1f}x")


def qemu_rss_mib(name: str) -> float:
    """Resident memory of the VM's QEMU process (libvirtd's pid file names it)."""
    from actors.vm.faults import QEMU_PID_DIR

    pid = int((QEMU_PID_DIR / f"{name}.pid").read_text().strip())
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def clone_to_ready(hypervisor: Hypervisor, template, timeout_s: float):
    """A clone made ready as a Supervisor makes it (actors/supervisor.py):
    restore, connect, Resume, one warm-up `true`. (seconds until the agent
    answered the Resume: ready for a task; seconds until the warm-up `true`
    ended: as the pool offers it; handle, link)."""
    from actors.vm.guest_link import GuestLink

    started = time.monotonic()
    handle = hypervisor.restore(template)
    link = GuestLink(handle.socket, guest_first_seq=handle.guest_first_seq)
    try:
        deadline = time.monotonic() + timeout_s
        link.connect(deadline)
        link.resume(deadline)
        resumed = time.monotonic() - started
        link.run([b"true"], deadline)
    except BaseException:
        link.close()
        hypervisor.destroy(handle)
        raise
    return resumed, time.monotonic() - started, handle, link


def bench_refill(cfg: config.Config, rounds: int) -> None:
    """A refill by restoring a clone of the snapshot template until it is ready
    (restore, Resume, warm-up `true`) against a cold boot until the agent's
    Hello, interleaved in the same run; then one clone's QEMU RSS beside one
    booted VM's, each after one `true`."""
    hypervisor = Hypervisor.from_config(cfg)
    try:
        print(f"accelerator: {hypervisor.accelerator}")
        template = hypervisor.template()
        if template is None:
            started = time.monotonic()
            template = hypervisor.build_template(boot_timeout_s=max(60.0, cfg.vm.boot_timeout_s))
            print(f"snapshot template built in {time.monotonic() - started:.1f} s "
                  f"({template.image.stat().st_size >> 20} MiB)")
        resumed, restores, boots = [], [], []
        for _ in range(rounds):
            ready_s, warm_s, handle, link = clone_to_ready(hypervisor, template, cfg.vm.boot_timeout_s)
            link.close()
            hypervisor.destroy(handle)
            resumed.append(ready_s)
            restores.append(warm_s)
            boots.append(boot_to_hello(hypervisor, cfg.vm.boot_timeout_s))
        _, _, clone, clone_link = clone_to_ready(hypervisor, template, cfg.vm.boot_timeout_s)
        try:
            with booted_vm(hypervisor, cfg.vm.boot_timeout_s) as (booted, link, _):
                link.run([b"true"], time.monotonic() + 30)
                rss = {"clone": qemu_rss_mib(clone.name), "booted": qemu_rss_mib(booted.name)}
        finally:
            clone_link.close()
            hypervisor.destroy(clone)
    finally:
        hypervisor.close()
    boot = statistics.median(boots)
    print(f"restore to agent ready (its ResumeDone):         {summary(resumed)}")
    print(f"restore to offered (and its warm-up `true`):     {summary(restores)}")
    print(f"baseline, cold boot to agent Hello:              {summary(boots)}")
    print(f"ratio (median, agent ready / cold boot):         {statistics.median(resumed) / boot:.2f}x")
    print(f"ratio (median, offered / cold boot):             {statistics.median(restores) / boot:.2f}x")
    print(f"qemu RSS, one clone: {rss['clone']:.0f} MiB; one booted VM: {rss['booted']:.0f} MiB "
          f"(ratio {rss['clone'] / rss['booted']:.2f}x)")


def echo_streamed_and_not(client, runs: int) -> dict:
    """`echo` unstreamed then streamed, `runs` times each, interleaved so both
    meet the same pool (after 3 rounds of warm-up)."""
    figures = {"first byte": [], "streamed end to end": [], "unstreamed end to end": []}
    for round_no in range(runs + 3):
        started = time.monotonic()
        reply = client.run(["echo", "corral"], wait_s=60)
        unstreamed = time.monotonic() - started
        if reply.error_code or reply.stdout != b"corral\n":
            raise RuntimeError(f"unstreamed `echo` failed: {reply.error_code} {reply.error_message}")
        started = time.monotonic()
        task = client.stream(["echo", "corral"])
        chunks = task.chunks(wait_s=60)
        first = next(chunks, None)
        first_byte = time.monotonic() - started
        output = b"".join(chunk.data for chunk in chunks)
        reply = task.reply(60)
        streamed = time.monotonic() - started
        if first is None or reply.error_code or first.data + output != b"corral\n":
            raise RuntimeError(f"streamed `echo` failed: {reply.error_code} {reply.error_message}")
        if round_no >= 3:
            figures["first byte"].append(first_byte)
            figures["streamed end to end"].append(streamed)
            figures["unstreamed end to end"].append(unstreamed)
    return figures


def own_rss_mib() -> float:
    """This process's resident memory: corrald's, as the bench runs it in-process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def slow_reader(client, service, runs: int, seconds: float = 20.0) -> dict:
    """`true` p50 on an idle service, then again while another caller streams
    `yes` and reads none of it for `seconds`; corrald's RSS before and at its
    highest meanwhile (sampled every 0.2 s)."""
    from protocol.client.api import Client

    idle = [sequential_true(client, service, 1)[0][0] for _ in range(runs)]
    rss_before = own_rss_mib()
    with Client(service.cfg.daemon.endpoint) as absent_reader:
        task = absent_reader.stream(["yes"], output_cap=service.cfg.tasks.max_output_cap,
                                    timeout_s=seconds + 2)
        during, rss_max = [], rss_before
        ends = time.monotonic() + seconds
        while time.monotonic() < ends:
            during.append(sequential_true(client, service, 1)[0][0])
            rss_max = max(rss_max, own_rss_mib())
            time.sleep(0.2)
        drained = sum(len(chunk.data) for chunk in task.chunks(seconds + 60))  # now it reads: the rest, then the reply
        reply = task.reply(5)
    return {"idle": idle, "during": during, "rss_before": rss_before, "rss_max": rss_max,
            "yes_outcome": reply.outcome or reply.error_code, "yes_read": drained}


def bench_stream(cfg: config.Config, runs: int) -> None:
    hypervisor = Hypervisor.from_config(cfg)
    try:
        print(f"accelerator: {hypervisor.accelerator}")
        figures = run_service(cfg, hypervisor, 2, lambda client, _: echo_streamed_and_not(client, runs))
        slow = run_service(cfg, hypervisor, 2, lambda client, service: slow_reader(client, service, runs))
    finally:
        hypervisor.close()
    first_byte, baseline = figures["first byte"], figures["unstreamed end to end"]
    print(f"{'`echo` streamed, time to first byte:':42}{latency(first_byte)}")
    print(f"{'  the same, end to end (its reply):':42}{latency(figures['streamed end to end'])}")
    print(f"{'baseline, `echo` unstreamed, end to end:':42}{latency(baseline)}")
    print(f"{'ratio (p50, first byte / baseline):':42}{percentile(first_byte, 50) / percentile(baseline, 50):.2f}x")
    growth = (slow["rss_max"] - slow["rss_before"]) / slow["rss_before"] * 100
    print(f"`yes` streamed to a caller that reads nothing for 20 s (then reads {slow['yes_read']} bytes; "
          f"ended: {slow['yes_outcome']}):")
    print(f"{'  corrald RSS before, highest meanwhile:':42}{slow['rss_before']:.1f} MiB, {slow['rss_max']:.1f} MiB "
          f"(+{growth:.1f} %)")
    print(f"{'  `true` meanwhile, from another caller:':42}{latency(slow['during'])}")
    print(f"{'  baseline, `true` on the idle service:':42}{latency(slow['idle'])}")
    print(f"{'  ratio (p50, meanwhile / idle):':42}"
          f"{percentile(slow['during'], 50) / percentile(slow['idle'], 50):.2f}x")


def exec_and_task_true(client, runs: int) -> dict:
    """`true` as a one-shot task and as an exec in one session, interleaved."""
    figures = {"task": [], "exec": []}
    with client.session(idle_s=600) as session:
        for _ in range(runs):
            for kind, run in (("task", lambda: client.run(["true"], wait_s=60)),
                              ("exec", lambda: session.exec(["true"], wait_s=60))):
                started = time.monotonic()
                reply = run()
                figures[kind].append(time.monotonic() - started)
                if reply.error_code or reply.exit_code:
                    raise RuntimeError(f"`true` as {kind} failed: {reply.error_code} {reply.error_message}")
    return figures


def timed(action) -> tuple[float, object]:
    started = time.monotonic()
    result = action()
    return time.monotonic() - started, result


def session_snapshots(client, rounds: int) -> dict:
    """Fork into 1 and into 3, pause, resume, each round beside a fresh open.
    Every fork is checked to see the file its session wrote, then closed."""
    figures = {"open": [], "fork 1": [], "fork 3": [], "pause": [], "resume": []}
    for _ in range(rounds):
        open_s, session = timed(lambda: client.session(idle_s=600))
        figures["open"].append(open_s)
        with session:
            session.put("/tmp/state", b"forked\n")
            for count in (1, 3):
                fork_s, forks = timed(lambda: session.fork(count))
                figures[f"fork {count}"].append(fork_s)
                for fork in forks:
                    with fork:
                        if fork.get("/tmp/state") != b"forked\n":
                            raise RuntimeError(f"fork {fork.session_id} does not see its session's file")
            pause_s, _ = timed(session.pause)
            resume_s, _ = timed(session.resume)
            figures["pause"].append(pause_s)
            figures["resume"].append(resume_s)
            if session.get("/tmp/state") != b"forked\n":
                raise RuntimeError("the resumed session lost its file")
    return figures


def bench_session(cfg: config.Config, runs: int, rounds: int) -> None:
    hypervisor = Hypervisor.from_config(cfg)
    try:
        print(f"accelerator: {hypervisor.accelerator}")
        both = run_service(cfg, hypervisor, 2, lambda client, _: exec_and_task_true(client, runs))
        snapshots = run_service(cfg, hypervisor, 2, lambda client, _: session_snapshots(client, rounds))
        boots = [boot_to_hello(hypervisor, cfg.vm.boot_timeout_s) for _ in range(rounds)]
    finally:
        hypervisor.close()
    print(f"{'`true` as an exec in a session:':42}{latency(both['exec'])}")
    print(f"{'baseline, `true` as a one-shot task:':42}{latency(both['task'])}")
    print(f"{'ratio (exec / task):':42}p50 {percentile(both['exec'], 50) / percentile(both['task'], 50):.2f}x  "
          f"p99 {percentile(both['exec'], 99) / percentile(both['task'], 99):.2f}x")
    opened, booted = statistics.median(snapshots["open"]), statistics.median(boots)
    for what in ("fork 1", "fork 3", "pause", "resume"):
        median = statistics.median(snapshots[what])
        print(f"{'session ' + what + ':':42}{summary(snapshots[what])}  "
              f"({median / opened:.1f}x an open, {median / booted:.2f}x a cold boot)")
    print(f"{'baseline, opening a session (warm pool):':42}{summary(snapshots['open'])}")
    print(f"{'baseline, a cold boot to Hello:':42}{summary(boots)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description="corral benchmarks")
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--frames-mib", type=int, default=256)
    parser.add_argument("--tasks", type=int, default=50, help="tasks per service measurement")
    parser.add_argument("--only", choices=("boot", "frames", "service", "scram", "acquire", "intake", "capabilities",
                                           "strict", "steady", "refill", "stream", "session"))
    parser.add_argument("--strict-tasks", type=int, default=20, help="sequential tasks of the strict bench")
    parser.add_argument("--rate", type=float, default=4.0, help="tasks/s of the steady bench")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the steady bench")
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
    if args.only in (None, "strict"):
        bench_strict(cfg, args.boots, args.strict_tasks)
    if args.only in (None, "steady"):
        bench_steady(cfg, args.rate, args.seconds)
    if args.only in (None, "refill"):
        bench_refill(cfg, args.boots)
    if args.only in (None, "stream"):
        bench_stream(cfg, args.tasks)
    if args.only in (None, "session"):
        bench_session(cfg, args.tasks, args.boots)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
