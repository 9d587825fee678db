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
import threading
import time

import pykka
import pytest
import zmq

from actors.directory import Directory
from actors.intake import Intake, IntakeServer
from actors.metrics import Metrics
from actors.scheduler import Scheduler
from actors.timers import Timers
from protocol import messages
from protocol.client import Client
from protocol.tasks import (DAEMON_TO_CLIENT, PROTOCOL_TAG, StatusReply, StatusRequest, TaskReply,
                            TaskRequest)
from tests.test_intake import LIMITS
from tests.test_scheduler import Recorder, wait_for

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
    directory["scheduler"] = Scheduler.start(directory, metrics, timers, QUEUE_DEPTH, 1 << 30, 3600.0)
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
