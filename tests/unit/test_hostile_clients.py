"""Hostile callers against the real ROUTER (Intake) and the real Scheduler, no
VMs: malformed multipart messages, wrong schemas, messages over ZMQ_MAXMSGSIZE,
a burst of thousands of requests, a caller that never reads its replies, and
invalid UTF-8. The promise: every request gets exactly one answer (or, over
the size cap, the connection is cut before anything is allocated for it),
nothing malformed reaches the Scheduler, and other callers never notice.

(Connection floods against the ROUTER: tests/load/test_connection_floods.py;
against a real corrald with a VM, and a routing id taken over:
tests/vm/test_hostile_clients.py. Invalid UTF-8 in argv/env reaching a
real guest intact is in tests/vm/test_hostile_userland.py.)
"""

import collections
import resource
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zmq

from actors.edge.metrics import Metrics
from protocol.channel import codec, messages
from protocol.client.api import Client
from protocol.wire import envelope
from protocol.wire.tasks import DAEMON_TO_CLIENT, PROTOCOL_TAG, StatusReply, StatusRequest, TaskReply
from tests.support.intake import LIMITS, intake_world, request
from tests.support.waiting import wait_until

QUEUE_DEPTH = 1000


@pytest.fixture
def world(tmp_path):
    with intake_world(tmp_path, QUEUE_DEPTH) as world:
        yield world


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
        got.append(codec.decode(envelope.parse(PROTOCOL_TAG, frames), DAEMON_TO_CLIENT))
    return got


def nothing_more(sock, wait_s: float = 0.3) -> bool:
    return not sock.poll(int(wait_s * 1000))


GOOD = codec.encode(request())
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
    "daemon-only message": [b"", PROTOCOL_TAG, codec.encode(StatusReply("x", (), (), 0, 0))],
    "guest message": [b"", PROTOCOL_TAG, codec.encode(messages.Heartbeat(nonce=1))],
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
    sock.send_multipart(envelope.build(PROTOCOL_TAG, codec.encode(StatusRequest("after"))))
    assert replies(sock, 1)[0].request_id == "after"


def test_a_message_over_maxmsgsize_cuts_that_connection_only(world, dealer):
    directory, server, metrics = world
    huge = codec.encode(request("huge", stdin=b"x" * (LIMITS.max_request_bytes + 1)))
    bystander = Client(server.endpoint)
    try:
        sock = dealer()
        sock.send_multipart(envelope.build(PROTOCOL_TAG, huge))
        time.sleep(0.3)
        # The ROUTER dropped the peer before reading the message: no reply, nothing accepted.
        assert nothing_more(sock) and metrics.counter_total(metrics.accepted) == 0
        assert bystander.status(wait_s=5).request_id
        # The DEALER reconnects by itself; its next, normal request is answered.
        sock.send_multipart(envelope.build(PROTOCOL_TAG, codec.encode(StatusRequest("again"))))
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
        sock.send_multipart(envelope.build(PROTOCOL_TAG, codec.encode(request(f"b{i}"))))
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
        status = codec.encode(StatusRequest("deaf"))
        while not stop.is_set():
            deaf.send_multipart(envelope.build(PROTOCOL_TAG, status))
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
    sock.send_multipart(envelope.build(PROTOCOL_TAG, codec.encode(request(capabilities=(b"dev:\xff\xfe",)))))
    (reply,) = replies(sock, 1)
    assert reply.error_code == "unknown_capability" and "dev:" in reply.error_message
    assert server.unanswered() == 0

# --- the open-file budget (issue 16, section 1) ---------------------------------------------------------

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
                          preexec_fn=limits, cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.startswith(outcome), done.stdout + done.stderr
    if "CorralError" not in outcome:
        assert f"nofile {nofile}" in done.stdout  # raised from 256 to the hard limit
    assert ("fits" in done.stderr) == (nofile == 3000), done.stderr


# --- answers follow the connection, not the routing id (issue 16, section 4) ------------------------------

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
