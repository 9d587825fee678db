"""Soak: a random mix of good and hostile tasks against a real corrald for a set
time, then the tally. Not run in CI:

    scripts/soak --seconds 600               # the 10-minute soak
    scripts/soak --seconds 180 --workers 6   # a short one

Starts corrald (.venv/bin/corrald) as a child with its own endpoint, instance
and metrics port, waits for its pool, then `--workers` callers (raw DEALER
sockets, one request in flight each, so a stray or second answer is seen as
such) send requests drawn from MIX until the time is up. Prints:
sent / answered / lost / duplicated, outcomes per kind (and any outcome a kind
must not have), corrald's RSS and open fds at start and end, and
corral_duplicate_answers_total from its metrics. Exit status 0 only with no
lost, duplicated or wrong answer and no corral domain left behind.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import zmq

from protocol.channel import codec
from protocol.wire import envelope
from protocol.wire.tasks import DAEMON_TO_CLIENT, PROTOCOL_TAG, StatusRequest, TaskRequest

REPO = Path(__file__).resolve().parents[2]
# corrald's contract bounds every answer: a task no VM took within
# tasks.max_queue_wait_s is answered `unavailable`, one that ran is answered by
# its timeout + the dead-man's grace. An answer later than that bound (plus
# acquire deadlines and a margin) counts as lost; if it still comes, as late.
MAX_QUEUE_WAIT_S = 120.0
DEADMAN_GRACE_S = 5.0
ACQUIRE_AND_MARGIN_S = 30.0
FLOOD_CAP = 64 << 10

# kind: (weight, argv, extra request fields, error codes it may end with, check of a good reply)
MIX = {
    "echo": (20, ["echo", "soak"], {}, {""}, lambda r: r.stdout == b"soak\n"),
    "python": (8, ["python3", "-c", "print(6 * 7)"], {"capabilities": (b"dev:python",)}, {""},
               lambda r: r.stdout == b"42\n"),
    "exit3": (6, ["sh", "-c", "echo err >&2; exit 3"], {}, {""}, lambda r: r.exit_code == 3),
    "stdin": (6, ["cat"], {"stdin": b"x" * 100_000}, {""}, lambda r: r.stdout == b"x" * 100_000),
    "sleep_past_timeout": (4, ["sleep", "600"], {"timeout_ms": 2000}, {"timeout"}, None),
    "busy_loop": (3, ["sh", "-c", "while :; do :; done"], {"timeout_ms": 2000}, {"timeout"}, None),
    "flood": (4, ["yes"], {"timeout_ms": 3000, "output_cap": FLOOD_CAP}, {"timeout"},
              lambda r: len(r.stdout) == FLOOD_CAP and r.stdout_truncated),
    "fork_bomb": (2, ["sh", "-c", "b() { b | b & }; b; sleep 100"], {"timeout_ms": 3000}, {"timeout"}, None),
    "memory_hog": (2, ["python3", "-c", "a = []\nwhile True: a.append(bytearray(1 << 20))"],
                   {"capabilities": (b"dev:python",), "timeout_ms": 60000}, {""},
                   lambda r: r.signal == 9 or r.exit_code == 1),
    "disk_fill": (2, ["sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1M 2>/dev/null; echo $?"],
                  {"timeout_ms": 60000}, {""}, lambda r: r.stdout == b"1\n"),
    # kill(-1) spares its caller on Linux: the shell lives on unless a task
    # process it spawned did the killing; either way the agent (root) answers.
    "kill_all": (3, ["sh", "-c", "kill -KILL -1"], {}, {""}, lambda r: r.signal == 9 or r.exit_code == 0),
    "bad_capability": (4, ["true"], {"capabilities": (b"net:everything",)}, {"unknown_capability"}, None),
    "nul_in_argv": (3, ["a\0b"], {}, {"invalid_request"}, None),
    "malformed_frames": (3, None, {}, {"invalid_request"}, None),  # an envelope with a wrong tag
    "garbage_payload": (3, b"\x20\xff\xff\xff\xff", {}, {"invalid_request"}, None),
    "status": (4, "status", {}, {""}, None),
}


def rss_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode_request(kind: str, task_id: str) -> list[bytes]:
    _, argv, fields, _, _ = MIX[kind]
    if argv == "status":
        return envelope.build(PROTOCOL_TAG, codec.encode(StatusRequest(task_id)))
    if argv is None:
        return [b"", b"corral/0", b"whatever"]
    if isinstance(argv, bytes):
        return envelope.build(PROTOCOL_TAG, argv)
    request = TaskRequest(**{"task_id": task_id, "priority": 2, "argv": tuple(a.encode() for a in argv),
                             "env": (), "cwd": b"", "stdin": b"", "timeout_ms": 20000, "output_cap": 0,
                             "capabilities": (), **fields})
    return envelope.build(PROTOCOL_TAG, codec.encode(request))


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = self.answered = self.lost = self.duplicated = self.late = 0
        self.outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.wrong: list[str] = []


def worker(endpoint: str, n: int, until: float, tally: Tally, rng: random.Random) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    kinds = list(MIX)
    weights = [MIX[k][0] for k in kinds]
    lost_ids: set[str] = set()
    try:
        for i in range(1 << 30):
            if time.monotonic() >= until:
                return
            kind = rng.choices(kinds, weights)[0]
            task_id = f"w{n}-{i}"
            fields = MIX[kind][2]
            wait_s = (MAX_QUEUE_WAIT_S + fields.get("timeout_ms", 20000) / 1000 + DEADMAN_GRACE_S
                      + ACQUIRE_AND_MARGIN_S)
            sock.send_multipart(encode_request(kind, task_id))
            with tally.lock:
                tally.sent += 1
            expected_id = "" if kind in ("malformed_frames", "garbage_payload") else task_id
            reply = None
            deadline = time.monotonic() + wait_s
            while reply is None:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(left * 1000)):
                    with tally.lock:
                        tally.lost += 1
                        lost_ids.add(task_id)
                        tally.wrong.append(f"{task_id} ({kind}): no answer in {wait_s:.0f} s")
                    break
                frames = sock.recv_multipart()
                got = codec.decode(envelope.parse(PROTOCOL_TAG, frames), DAEMON_TO_CLIENT)
                got_id = getattr(got, "task_id", None) or getattr(got, "request_id", "")
                if got_id != expected_id:
                    with tally.lock:
                        if got_id in lost_ids:  # past its bound: already counted lost
                            lost_ids.discard(got_id)
                            tally.late += 1
                            tally.wrong.append(f"late answer {got_id!r} while waiting for {task_id}")
                        else:  # a second answer, or one for a task never sent
                            tally.duplicated += 1
                            tally.wrong.append(f"stray answer {got_id!r} while waiting for {task_id}")
                    continue
                reply = got
            if reply is None:
                continue
            _, _, _, allowed, check = MIX[kind]
            code = getattr(reply, "error_code", "")
            with tally.lock:
                tally.answered += 1
                tally.outcomes[kind][code or "ok"] += 1
                # `unavailable`: no VM free within tasks.max_queue_wait_s, an answer the
                # contract allows any accepted task when boots lag (counted per kind).
                if code not in allowed | {"unavailable"} or (check is not None and not code and not check(reply)):
                    tally.wrong.append(f"{task_id} ({kind}): {code or 'ok'} {getattr(reply, 'error_message', '')!r:.120}")
        # Catch answers that come after the last one (a second answer would show here).
    finally:
        if sock.poll(1000):
            with tally.lock:
                tally.duplicated += 1
                tally.wrong.append(f"worker {n}: an answer after the last")
        sock.close()


def wait_ready(endpoint: str, pool_size: int, timeout_s: float) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            sock.send_multipart(envelope.build(PROTOCOL_TAG, codec.encode(StatusRequest("ready?"))))
            if sock.poll(2000):
                status = codec.decode(envelope.parse(PROTOCOL_TAG, sock.recv_multipart()), DAEMON_TO_CLIENT)
                if int(dict(status.pool).get(b"ready", b"0")) >= pool_size:
                    return
            time.sleep(1)
    finally:
        sock.close()
    raise SystemExit(f"soak: corrald's pool not ready within {timeout_s:.0f} s")


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def leftover_domains(instance: str) -> list[str]:
    import libvirt
    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains() if d.name().startswith(f"corral-{instance}-")]
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Soak corrald with good and hostile tasks.")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--instance", default="soak")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    work = Path(tempfile.mkdtemp(prefix="corral-soak-"))
    endpoint = f"ipc://{work}/corrald.sock"
    metrics_port = free_port()
    (work / "site.toml").write_text(
        f'[daemon]\nendpoint = "{endpoint}"\ninstance = "{args.instance}"\nlog_level = "warning"\n'
        f'[control]\nendpoint = "ipc://{work}/control.sock"\n'
        f'[metrics]\nport = {metrics_port}\n[pool]\nsize = {args.pool_size}\n'
        f'[tasks]\nmax_queue_wait_s = {MAX_QUEUE_WAIT_S}\n')
    log = open(work / "corrald.log", "wb")
    daemon = subprocess.Popen([str(REPO / ".venv/bin/corrald"), "--config", str(work / "site.toml")],
                              stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    print(f"soak: corrald pid {daemon.pid}, log {work / 'corrald.log'}, seed {seed}", flush=True)
    try:
        wait_ready(endpoint, args.pool_size, 300)
        rss0, fds0 = rss_and_fds(daemon.pid)
        tally = Tally()
        started = time.monotonic()
        until = started + args.seconds
        threads = [threading.Thread(target=worker, args=(endpoint, n, until, tally, random.Random(seed + n)))
                   for n in range(args.workers)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(10)
            with tally.lock:
                print(f"soak: {time.monotonic() - started:5.0f} s  sent {tally.sent}  "
                      f"answered {tally.answered}  lost {tally.lost}  duplicated {tally.duplicated}", flush=True)
        took = time.monotonic() - started
        time.sleep(5)  # let VMs replaced at the end settle before measuring
        rss1, fds1 = rss_and_fds(daemon.pid)
        metrics = scrape(metrics_port)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(120)
        except subprocess.TimeoutExpired:
            daemon.kill()
    left = leftover_domains(args.instance)
    print(f"\nsoak: {took:.0f} s, {args.workers} workers, pool {args.pool_size}, seed {seed}")
    print(f"sent {tally.sent}  answered {tally.answered}  lost {tally.lost}  duplicated {tally.duplicated}  "
          f"late {tally.late}  ({tally.answered / took:.2f} answers/s)")
    print(f"corral_duplicate_answers_total {metrics.get('corral_duplicate_answers_total', 0):.0f}; "
          f"corrald exit status {daemon.returncode}; domains left behind: {left or 'none'}")
    print(f"corrald RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB ({(rss1 - rss0) / 1024:+.1f}); "
          f"open fds {fds0} -> {fds1} ({fds1 - fds0:+d})")
    print("outcomes by kind:")
    for kind in MIX:
        if tally.outcomes[kind]:
            print(f"  {kind:20} " + ", ".join(f"{c} {n}" for c, n in sorted(tally.outcomes[kind].items())))
    vms = {k.split('"')[1]: v for k, v in metrics.items() if k.startswith("corral_vms_destroyed_total{")}
    print("VMs destroyed by reason: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(vms.items())))
    for line in tally.wrong[:30]:
        print("  WRONG " + line)
    ok = not (tally.lost or tally.duplicated or tally.wrong or left or daemon.returncode)
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
