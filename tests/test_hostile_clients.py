"""Hostile callers against the real ROUTER (Intake) and the real Scheduler, no
VMs: malformed multipart messages, wrong schemas, messages over ZMQ_MAXMSGSIZE,
a burst of thousands of requests, a caller that never reads its replies, and
invalid UTF-8. The promise: every request gets exactly one answer (or, over
the size cap, the connection is cut before anything is allocated for it),
nothing malformed reaches the Scheduler, and other callers never notice.

(Invalid UTF-8 in argv/env reaching a real guest intact is in
tests/test_hostile_userland.py.)
"""

import collections
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pykka
import pytest
import zmq

import config
from actors.directory import Directory
from actors.edge.identity import Admission
from actors.edge.intake_server import KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, IntakeServer
from actors.intake import Intake
from actors.edge.metrics import Metrics
from actors.scheduler import QueueLimits, Scheduler
from actors.timers import Timers
from protocol.client import admin
from protocol.channel import messages
from protocol.client.api import Client
from protocol.wire.tasks import (DAEMON_TO_CLIENT, PROTOCOL_TAG, StatusReply, StatusRequest, TaskReply,
                            TaskRequest)
from tests.conftest import STATE_DIR, TEST_INSTANCE
from tests.test_intake import LIMITS
from tests.test_scheduler import Recorder, wait_for
from tests.test_operations import as_user, write_site_config
from tests.test_service import wait_until

QUEUE_DEPTH = 1000


def request(task_id: str = "t", **fields) -> TaskRequest:
    base = dict(task_id=task_id, priority=2, argv=(b"true",), env=(), cwd=b"", stdin=b"",
                timeout_ms=0, output_cap=0, capabilities=())
    return TaskRequest(**{**base, **fields})


@pytest.fixture
def world(tmp_path):
    """Intake (real ROUTER) in front of a real Scheduler that no VM ever serves."""
    directory = Directory()
    metrics = Metrics()
    timers = Timers()
    server = IntakeServer(f"ipc://{tmp_path}/intake.sock", LIMITS, metrics, directory)
    directory.answer_fallback = server.post
    server.start()
    directory["pool"] = Recorder.start()
    directory["scheduler"] = Scheduler.start(
        directory=directory, metrics=metrics, timers=timers,
        limits=QueueLimits(max_depth=QUEUE_DEPTH, max_queued_bytes=1 << 30, max_wait_s=3600.0))
    directory["intake"] = Intake.start(server, directory)
    yield directory, server, metrics
    pykka.ActorRegistry.stop_all()
    server.stop()
    timers.stop()


@pytest.fixture
def dealer(world):
    sockets = []

    def make(**options):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        sock.connect(world[1].endpoint)
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close()


def replies(sock, count: int, timeout_s: float = 10) -> list:
    """Exactly `count` replies, decoded; fails on fewer within the timeout."""
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        left = deadline - time.monotonic()
        assert left > 0 and sock.poll(int(left * 1000)), f"only {len(got)} of {count} replies"
        frames = sock.recv_multipart()
        assert frames[:2] == [b"", PROTOCOL_TAG]
        got.append(messages.decode(frames[2], DAEMON_TO_CLIENT))
    return got


def nothing_more(sock, wait_s: float = 0.3) -> bool:
    return not sock.poll(int(wait_s * 1000))


GOOD = messages.encode(request())
MALFORMED = {
    "no delimiter": [PROTOCOL_TAG, GOOD],
    "wrong tag": [b"", b"corral/9", GOOD],
    "extra frame": [b"", PROTOCOL_TAG, GOOD, b"more"],
    "tag only": [b"", PROTOCOL_TAG],
    "one empty frame": [b""],
    "empty payload": [b"", PROTOCOL_TAG, b""],
    "truncated payload": [b"", PROTOCOL_TAG, GOOD[:-3]],
    "trailing bytes": [b"", PROTOCOL_TAG, GOOD + b"\0"],
    "unknown type id": [b"", PROTOCOL_TAG, b"\xc8" + GOOD[1:]],
    "daemon-only message": [b"", PROTOCOL_TAG, messages.encode(StatusReply("x", (), (), 0, 0))],
    "guest message": [b"", PROTOCOL_TAG, messages.encode(messages.Heartbeat(nonce=1))],
    "priority 9": [b"", PROTOCOL_TAG, GOOD.replace(b"\x00\x01t\x02", b"\x00\x01t\x09", 1)],
    "argv count lies": [b"", PROTOCOL_TAG, GOOD.replace(b"\x02\x00\x01", b"\x02\xff\xff", 1)],
    "task id not UTF-8": [b"", PROTOCOL_TAG, GOOD.replace(b"\x00\x01t", b"\x00\x01\xff", 1)],
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_get_one_invalid_request_and_reach_nothing(world, dealer, frames):
    directory, server, metrics = world
    sock = dealer()
    sock.send_multipart(frames)
    (reply,) = replies(sock, 1)
    assert isinstance(reply, TaskReply) and reply.error_code == "invalid_request", reply
    assert nothing_more(sock)
    assert server.unanswered() == 0 and metrics.counter_total(metrics.accepted) == 0
    # The same connection still works afterwards.
    sock.send_multipart([b"", PROTOCOL_TAG, messages.encode(StatusRequest("after"))])
    assert replies(sock, 1)[0].request_id == "after"


def test_a_message_over_maxmsgsize_cuts_that_connection_only(world, dealer):
    directory, server, metrics = world
    huge = messages.encode(request("huge", stdin=b"x" * (LIMITS.max_request_bytes + 1)))
    bystander = Client(server.endpoint)
    try:
        sock = dealer()
        sock.send_multipart([b"", PROTOCOL_TAG, huge])
        time.sleep(0.3)
        # The ROUTER dropped the peer before reading the message: no reply, nothing accepted.
        assert nothing_more(sock) and metrics.counter_total(metrics.accepted) == 0
        assert bystander.status(wait_s=5).request_id
        # The DEALER reconnects by itself; its next, normal request is answered.
        sock.send_multipart([b"", PROTOCOL_TAG, messages.encode(StatusRequest("again"))])
        assert replies(sock, 1)[0].request_id == "again"
    finally:
        bystander.close()


def test_a_burst_of_3000_requests_each_answered_exactly_once(world, dealer):
    """1000 queue (no VM serves them), 2000 are refused busy at once; stopping
    the Scheduler answers the queued 1000 cancelled. 3000 answers, no repeats."""
    directory, server, metrics = world
    sock = dealer(SNDHWM=0, RCVHWM=0)
    started = time.monotonic()
    for i in range(3000):
        sock.send_multipart([b"", PROTOCOL_TAG, messages.encode(request(f"b{i}"))])
    busy = replies(sock, 2000, timeout_s=60)
    refused_in = time.monotonic() - started
    assert {r.error_code for r in busy} == {"busy"} and all(r.retry_after_ms > 0 for r in busy)
    assert nothing_more(sock)
    assert server.unanswered() == QUEUE_DEPTH
    directory.get("scheduler").stop()
    cancelled = replies(sock, 1000, timeout_s=60)
    assert {r.error_code for r in cancelled} == {"cancelled"}
    counts = collections.Counter(r.task_id for r in busy + cancelled)
    assert len(counts) == 3000 and set(counts.values()) == {1}
    assert nothing_more(sock) and server.unanswered() == 0
    assert metrics.counter_total(metrics.duplicate_answers) == 0
    print(f"FIGURE burst: 3000 requests sent and 2000 busy answers back in {refused_in:.2f} s")


def test_a_caller_that_never_reads_does_not_slow_the_others(world, dealer):
    directory, server, metrics = world
    deaf = dealer(RCVHWM=1)
    stop = threading.Event()
    sent = [0]

    def flood():
        status = messages.encode(StatusRequest("deaf"))
        while not stop.is_set():
            deaf.send_multipart([b"", PROTOCOL_TAG, status])
            sent[0] += 1
            if sent[0] % 1000 == 0:
                time.sleep(0.001)

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        # The premise first: thousands of replies the deaf caller never reads.
        deadline = time.monotonic() + 30
        while sent[0] < 5000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sent[0] >= 5000, f"the deaf caller sent only {sent[0]} requests in 30 s"
        with Client(server.endpoint) as other:
            worst = 0.0
            for _ in range(20):
                t0 = time.monotonic()
                other.status(wait_s=5)
                worst = max(worst, time.monotonic() - t0)
        assert worst < 1.0, f"a status round trip took {worst:.2f} s behind the deaf caller"
    finally:
        stop.set()
        thread.join()
    print(f"FIGURE deaf caller: {sent[0]} unread requests, slowest other round trip {worst * 1000:.0f} ms")


def test_invalid_utf8_capability_is_refused_by_name(world, dealer):
    directory, server, metrics = world
    sock = dealer()
    sock.send_multipart([b"", PROTOCOL_TAG, messages.encode(request(capabilities=(b"dev:\xff\xfe",)))])
    (reply,) = replies(sock, 1)
    assert reply.error_code == "unknown_capability" and "dev:" in reply.error_message
    assert server.unanswered() == 0


# --- connection floods against a real corrald (issue 16, section 1) ------------------------------------

FLOOD_NOFILE = 4096  # corrald's open-file limit in these tests: cheap to reach
FLOOD_SECONDS = 12.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def metric_samples(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def limit_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD_NOFILE, FLOOD_NOFILE))


def process_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def start_flooders(targets: list[tuple[str, str, int]], seconds: float) -> list[subprocess.Popen]:
    # Niced: on two cores, three busy flooders would otherwise starve the VM's
    # TCG thread, and the figure would measure the machine, not corrald.
    return [subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "tests.flood", endpoint, mode, str(hold),
                              str(seconds)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
            for endpoint, mode, hold in targets]


def flood_results(flooders: list[subprocess.Popen]) -> list[dict]:
    return [json.loads(f.communicate(timeout=120)[0]) for f in flooders]


def true_p50_ms(client: Client, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        reply = client.run(["true"], wait_s=60)
        assert reply.error_code == "" and reply.exit_code == 0, reply
        times.append((time.monotonic() - t0) * 1000)
    return statistics.median(times)


@pytest.mark.vm
def test_a_connection_flood_on_both_endpoints_is_shed_and_callers_are_still_served(tmp_path):
    """corrald under `ulimit -n 4096` with 64 client and 8 control connections
    allowed; three processes keep thousands of connections coming at its two
    sockets (idle ones, finished NULL handshakes, and on the control socket
    both) for 12 s, each one shed replaced at once."""
    instance = (TEST_INSTANCE + "f")[:16]
    metrics_port = free_port()
    site = write_site_config(tmp_path, instance, daemon={"max_connections": 64}, control={"max_connections": 8},
                             pool={"max_uses": 1000},  # no retirement and cold boot in the middle of the figures
                             metrics={"port": metrics_port})
    cfg = config.load(site)
    log = tmp_path / "corrald.log"
    with open(log, "wb") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "actors.daemon", "--config", str(site)],
                                  stdout=subprocess.DEVNULL, stderr=log_file, preexec_fn=limit_nofile,
                                  cwd=Path(__file__).parent.parent)
    try:
        socket_path = Path(cfg.daemon.endpoint[len("ipc://"):])
        wait_until(lambda: socket_path.exists() or daemon.poll() is not None, 120, "corrald's socket")
        with Client(cfg.daemon.endpoint) as caller:
            deadline = time.monotonic() + 180
            while dict(caller.status(wait_s=10).pool).get(b"ready") != b"1":
                assert daemon.poll() is None and time.monotonic() < deadline, "corrald's VM never got ready"
                time.sleep(0.2)
            idle_ms = true_p50_ms(caller, 30)
            fds_before, rss_before = process_fds(daemon.pid), process_rss_mib(daemon.pid)
            flooders = start_flooders([(cfg.daemon.endpoint, "idle", 3000), (cfg.daemon.endpoint, "null", 3000),
                                       (cfg.control.endpoint, "null", 1500)], FLOOD_SECONDS)
            time.sleep(2)  # the flood is under way
            most_fds, most_rss = 0, 0.0
            during = []
            slow = caller.submit(["sh", "-c", "sleep 1; echo survived"], timeout_s=30)
            while any(f.poll() is None for f in flooders):
                assert daemon.poll() is None, "corrald died under the flood: " + log.read_text()[-2000:]
                most_fds = max(most_fds, process_fds(daemon.pid))
                most_rss = max(most_rss, process_rss_mib(daemon.pid))
                during.append(true_p50_ms(caller, 1))
            counts = flood_results(flooders)
            assert slow.result(timeout=60).stdout == b"survived\n"
            assert daemon.poll() is None
            flood_ms = statistics.median(during)
            samples = metric_samples(metrics_port)
            refused = {e: samples.get(f'corral_connections_refused_total{{endpoint="{e}"}}', 0)
                       for e in ("client", "control")}
            # A new caller and an operator are served once the flood is over.
            with Client(cfg.daemon.endpoint) as newcomer:
                assert newcomer.run(["echo", "after"], wait_s=60).stdout == b"after\n"
            assert admin.request(cfg.control.endpoint, "status", []).error_code == ""
            time.sleep(2)
            fds_after, rss_after = process_fds(daemon.pid), process_rss_mib(daemon.pid)
    except BaseException:
        print(log.read_text()[-5000:])
        raise
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
    opened = sum(c["opened"] for c in counts)
    print(f"FIGURE connection flood: {opened} connections opened in {FLOOD_SECONDS:g} s "
          f"({[c['opened'] for c in counts]} client idle/NULL, control), refused {refused['client']:.0f} client "
          f"{refused['control']:.0f} control; corrald fds {fds_before} before, at most {most_fds} during "
          f"(limit {FLOOD_NOFILE}), {fds_after} after")
    print(f"FIGURE connection flood: `true` p50 {idle_ms:.0f} ms idle, {flood_ms:.0f} ms during the flood "
          f"({len(during)} runs, slowest {max(during):.0f} ms)")
    print(f"FIGURE connection flood: corrald RSS {rss_before:.0f} MiB before, at most {most_rss:.0f} MiB "
          f"during, {rss_after:.0f} MiB after")
    assert opened > FLOOD_NOFILE, "the flood must open more connections than corrald has fds"
    assert refused["client"] > 0 and refused["control"] > 0
    assert most_fds < FLOOD_NOFILE - 256
    assert flood_ms <= 2 * idle_ms + 50, f"`true` p50 {flood_ms:.0f} ms under the flood vs {idle_ms:.0f} ms idle"
    assert daemon.returncode == 0


# --- answers follow the connection, not the routing id (issue 16, section 4) ------------------------------

NOBODY = 65534


def listen(endpoint: str, routing_id: bytes, first: bytes, listen_s: float) -> str:
    """Connect with `routing_id`, send `first`; every message received within
    `listen_s`, as JSON (run in a child as another user by as_user)."""
    sock = zmq.Context().socket(zmq.DEALER)  # a new context: this is a forked child
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(endpoint)
    sock.send_multipart([b"", PROTOCOL_TAG, first])
    got = []
    deadline = time.monotonic() + listen_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            got.append([frame.hex() for frame in sock.recv_multipart()])
    sock.close()
    return json.dumps(got)


@pytest.mark.vm
@pytest.mark.parametrize("attacker_uid, identity", [(NOBODY, "other"), (0, "same")])
def test_a_routing_id_taken_over_after_its_caller_left_gets_none_of_its_answers(hypervisor, attacker_uid,
                                                                                 identity):
    """A victim submits `sleep 3; echo secret` with a known routing id and
    disconnects; then a caller (another local user, or the same one) connects
    with that routing id while the task runs. It gets its own status reply and
    nothing else; the victim's answer is dropped, once, and counted."""
    from actors.service import Corral

    run_dir = Path(tempfile.mkdtemp(prefix=f"corral-{TEST_INSTANCE}-"))
    run_dir.chmod(0o755)  # another local user may reach the socket: the case under test
    cfg = config.load(overrides={
        "state_dir": str(STATE_DIR),
        "daemon": {"endpoint": f"ipc://{run_dir}/corrald.sock", "instance": TEST_INSTANCE},
        "control": {"endpoint": f"ipc://{run_dir}/control/control.sock"},
        "pool": {"size": 1}, "metrics": {"port": 0}})
    svc = Corral(cfg, hypervisor)
    svc.start()
    try:
        (run_dir / "corrald.sock").chmod(0o777)
        with Client(cfg.daemon.endpoint) as c:
            deadline = time.monotonic() + 180
            while dict(c.status(wait_s=10).pool).get(b"ready") != b"1":
                assert time.monotonic() < deadline, "the VM never got ready"
                time.sleep(0.2)
        routing_id = b"victim-" + identity.encode()
        victim = zmq.Context.instance().socket(zmq.DEALER)
        victim.setsockopt(zmq.LINGER, 0)
        victim.setsockopt(zmq.ROUTING_ID, routing_id)
        victim.connect(cfg.daemon.endpoint)
        secret = request("victim", argv=(b"sh", b"-c", b"sleep 3; echo secret"), timeout_ms=30_000)
        victim.send_multipart([b"", PROTOCOL_TAG, messages.encode(secret)])
        wait_until(lambda: svc.server.unanswered() == 1, 10, "the victim's task accepted")
        victim.close()
        time.sleep(0.3)
        text = as_user(attacker_uid, listen, cfg.daemon.endpoint, routing_id,
                       messages.encode(StatusRequest("attacker")), 8.0)
        got = [[bytes.fromhex(frame) for frame in message] for message in json.loads(text)]
        wait_until(lambda: svc.server.unanswered() == 0, 30, "the victim's task answered")
        metrics = svc.metrics
        undeliverable = metrics.counter_total(metrics.answers_undeliverable)
        reuse = {s.labels["identity"]: s.value for m in metrics.routing_id_reuse.collect() for s in m.samples
                 if s.name.endswith("_total")}
        completed = metrics.counter_total(metrics.tasks)
    finally:
        svc.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    replies_got = [messages.decode(m[2], DAEMON_TO_CLIENT) for m in got if len(m) == 3]
    assert len(got) == 1 and len(replies_got) == 1, f"the attacker received {got}"
    assert isinstance(replies_got[0], StatusReply) and replies_got[0].request_id == "attacker"
    assert undeliverable == 1 and completed >= 1
    assert reuse.get(identity) == 1, reuse
    print(f"FIGURE routing id takeover ({identity} identity): the attacker got 1 message (its own status), "
          f"0 of the victim's; answers undeliverable {undeliverable:.0f}, reuse attempts counted {reuse}")


@pytest.mark.parametrize("mode", ["curve", "idle"])
def test_a_tcp_flood_of_stalled_curve_handshakes_is_shed_and_a_key_holder_is_served(tmp_path, mode):
    """CurveZMQ over tcp: connections that offer CURVE and stall (or say
    nothing) count against daemon.max_connections from their accept on, are
    shed past it, and an allowed key holder is still answered."""
    from tests.test_identity import curve_config, keygen

    keys_dir = tmp_path / "keys"
    keygen("corrald", keys_dir / "server")
    keygen("alice", keys_dir / "alice")
    (keys_dir / "clients").mkdir()
    (keys_dir / "clients" / "alice.key").write_bytes((keys_dir / "alice" / "alice.key").read_bytes())
    cfg = curve_config({"server_secret": str(keys_dir / "server" / "corrald.key_secret"),
                        "clients": str(keys_dir / "clients")})
    metrics = Metrics()
    directory = Directory()
    admission = Admission.from_config(cfg, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, metrics)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = IntakeServer(endpoint, LIMITS, metrics, directory, admission, max_connections=32)
    server.start()
    alice = Client(endpoint, server_key=str(keys_dir / "server" / "corrald.key"),
                   client_key=str(keys_dir / "alice" / "alice.key_secret"))
    try:
        assert alice.status(wait_s=10).request_id
        fds_before = process_fds(os.getpid())
        (flooder,) = start_flooders([(endpoint, mode, 2000)], 6.0)
        most_fds, answered = 0, 0
        while flooder.poll() is None:
            most_fds = max(most_fds, process_fds(os.getpid()))
            assert alice.status(wait_s=10).request_id
            answered += 1
        (counts,) = flood_results([flooder])
        assert alice.status(wait_s=10).request_id  # and after it
        refused = metrics.counter_total(metrics.connections_refused)
    finally:
        alice.close()
        server.stop()
    print(f"FIGURE tcp {mode} flood: {counts['opened']} connections in 6 s, {refused} shed, "
          f"this process's fds {fds_before} -> at most {most_fds}; {answered} status round trips answered meanwhile")
    assert counts["opened"] > 4 * 32 and refused > 0 and answered > 0
    assert most_fds < fds_before + 32 + 1200  # the limit, plus what the monitor may hold unread


@pytest.mark.parametrize("nofile, outcome", [
    (20000, "client 1024 control 16"),
    (3000, "client 686 control 16"),  # 3000 - 2 x 1001 (accept bursts) - 5 VMs x 8 - 256 = 702 for both
    (2200, "CorralError: the open-file limit (2200) leaves no room for callers"),
])
def test_the_connection_limits_are_fitted_into_the_open_file_limit(nofile, outcome):
    """At start-up the soft limit is raised to the hard one, and limits that
    do not fit beside the VMs and the accept bursts are lowered, or refused."""
    script = textwrap.dedent("""\
        import logging, resource
        from actors.edge.connections import plan_fd_budget
        from actors.errors import CorralError
        logging.basicConfig(level="WARNING", format="%(message)s")
        try:
            budget = plan_fd_budget(1024, 16, 5)
            print(f"client {budget.client} control {budget.control} nofile {budget.nofile}")
        except CorralError as e:
            print(f"CorralError: {e}")
        """)

    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, nofile))

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          preexec_fn=limits, cwd=Path(__file__).parent.parent)
    assert done.stdout.startswith(outcome), done.stdout + done.stderr
    if "CorralError" not in outcome:
        assert f"nofile {nofile}" in done.stdout  # raised from 256 to the hard limit
    assert ("fits" in done.stderr) == (nofile == 3000), done.stderr


def test_memory_of_connection_bursts_is_given_back(world):
    """Three bursts of 4000 idle callers (finished NULL handshakes) against the
    real ROUTER with no limit in the way: RSS grows by the connections held
    and returns near where it was once they leave (glibc alone would keep it)."""
    directory, server, metrics = world
    server.guard.limit = 100_000
    rss = [process_rss_mib(os.getpid())]
    held = []
    for _ in range(3):
        (flooder,) = start_flooders([(server.endpoint, "null", 4000)], 4.0)
        peak = 0.0
        while flooder.poll() is None:
            peak = max(peak, process_rss_mib(os.getpid()))
            time.sleep(0.1)
        (counts,) = flood_results([flooder])
        assert counts["most_held"] == 4000 and counts["cut"] == 0, counts
        time.sleep(2.5)  # the disconnects read, and the trim they owe done
        held.append(peak)
        rss.append(process_rss_mib(os.getpid()))
    print(f"FIGURE connection bursts: 3 x 4000 connections; RSS {rss[0]:.0f} MiB before, peaks "
          f"{', '.join(f'{p:.0f}' for p in held)} MiB, after each {', '.join(f'{r:.0f}' for r in rss[1:])} MiB")
    assert held[0] - rss[0] > 50, "the premise: 4000 connections cost memory"
    assert rss[-1] < rss[0] + 40, f"RSS did not come back: {rss}"


def test_the_guard_sends_nothing_to_a_routing_id_whose_connection_left(tmp_path):
    """The rule corral admin replies follow too (ControlServer uses the same
    ConnectionGuard.send): a reply for a connection that is gone is not sent
    to the newcomer holding its routing id, who did get it without the guard."""
    from actors.edge.connections import ConnectionGuard

    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    guard = ConnectionGuard(router, "control", 8, Metrics())
    endpoint = f"ipc://{tmp_path}/guarded.sock"
    router.bind(endpoint)
    guard.bound(endpoint)
    received = []

    def read() -> bool:
        while router.poll(0):
            parts = router.recv_multipart(copy=False)
            received.append((guard.connection_of(parts[-1], parts[0].bytes), [p.bytes for p in parts]))
        return True

    def dealer():
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"operator")
        sock.connect(endpoint)
        return sock

    def next_message(sock) -> None:
        sock.send(b"hello")
        deadline = time.monotonic() + 5
        count = len(received)
        while len(received) == count:
            assert time.monotonic() < deadline
            router.poll(100)
            guard.pump(read)

    try:
        victim = dealer()
        next_message(victim)
        victim_conn, frames = received[-1]
        assert frames[0] == b"operator" and not victim_conn.closed
        victim.close()
        wait_until(lambda: guard.read_events() or victim_conn.closed, 5, "the victim's disconnect seen")
        newcomer = dealer()
        next_message(newcomer)
        newcomer_conn, _ = received[-1]
        assert newcomer_conn is not victim_conn
        assert guard.send(victim_conn, [b"operator", b"the victim's reply"]) is False
        assert not newcomer.poll(500), "the newcomer got the victim's reply"
        # The premise: a plain ROUTER send by routing id would have reached it.
        router.send_multipart([b"operator", b"by routing id"])
        assert newcomer.poll(2000) and newcomer.recv() == b"by routing id"
        assert guard.send(newcomer_conn, [b"operator", b"its own reply"]) is True
        assert newcomer.poll(2000) and newcomer.recv() == b"its own reply"
        newcomer.close()
    finally:
        guard.close(lambda: router.close(0))
