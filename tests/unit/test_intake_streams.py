"""Streaming tasks through a real IntakeServer (real ROUTER, Intake actor,
CurveZMQ for identities) with raw DEALER callers; the test tells Intake what
a Supervisor would (TaskStarted, OutputChunk, the Answer) and a recording
actor stands in for the Supervisor to see ReaderHold and StdinChunk."""

import time

import pytest
from prometheus_client import generate_latest

from actors.edge.intake_server import TaskLimits
from actors.edge.streams import StreamLimits
from protocol.channel.constants import STDERR, STDOUT
from protocol.wire.tasks import StreamAck
from tests.support.intake import LIMITS, curve_config, curve_keys
from tests.support.streams import Producer, accepted, started, stream_world
from tests.support.waiting import wait_until

KiB = 1024
WINDOW, BUFFER = 16 * KiB, 64 * KiB
SMALL = TaskLimits(**{**LIMITS.__dict__, "streams": StreamLimits(window_bytes=WINDOW, buffer_bytes=BUFFER,
                                                                 linger_s=30.0, max_stdin_bytes=1000)})


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes whose every position differs from its neighbours', so a lost or repeated run shows."""
    return bytes((seed + i * 7 + i // 251) & 0xFF for i in range(size))


@pytest.fixture
def world(tmp_path):
    with stream_world(tmp_path, SMALL) as w:
        yield w.directory, w.server, w.scheduler, w.metrics, w.caller


def test_chunks_arrive_in_order_and_the_reply_after_them(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t")
    task = started(directory, scheduler, "t")
    for i in range(40):
        task.out(b"out %d\n" % i, STDOUT)
        task.out(b"err %d\n" % i, STDERR)
    task.answer("t")
    reply = alice.read_to_reply("t", ack=False)
    assert alice.stream(STDOUT) == task.written[STDOUT] and alice.stream(STDERR) == task.written[STDERR]
    assert alice.order[-1] == ("reply", "t") and reply.exit_code == 0 and reply.stdout == b""
    # Each stream in order (checked as received), and the two in the order they were told
    # (chunks of one stream in a row may be merged; these alternate, so none is).
    assert [(stream, offset) for _, _, stream, offset in alice.order[:-1]] == task.chunks
    assert alice.read() == [] and server.unanswered() == 0 and not server.streams


def test_a_task_that_does_not_stream_gets_its_reply_alone(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("plain", stream=False)
    (ticket,) = accepted(scheduler)
    task = Producer(directory, ticket)
    task.out(b"nobody asked for this")  # a Supervisor never does this; if it did, it goes nowhere
    task.answer("plain", stdout=b"all of it")
    assert alice.read_to_reply("plain", ack=False).stdout == b"all of it"
    assert [kind for kind, *_ in alice.order] == ["reply"]
    assert server.stream_totals.dropped["late"] == len(b"nobody asked for this")


def test_the_window_is_respected_until_stream_ack(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t")
    task = started(directory, scheduler, "t")
    data = pattern(40 * KiB)
    for i in range(0, len(data), 4 * KiB):
        task.out(data[i:i + 4 * KiB])
    task.answer("t")
    alice.read()
    assert alice.offsets() == (WINDOW, 0) and "t" not in alice.replies
    alice.send(StreamAck("t", 8 * KiB, 0))  # half the window consumed
    alice.read()
    assert alice.offsets() == (WINDOW + 8 * KiB, 0) and "t" not in alice.replies
    reply = alice.read_to_reply("t")
    assert alice.stream(STDOUT) == data and reply.exit_code == 0


def test_a_full_buffer_holds_the_reader_and_acks_release_it(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t")
    task = started(directory, scheduler, "t")
    data = pattern(BUFFER + 8 * KiB, seed=3)
    for i in range(0, len(data), 8 * KiB):
        task.out(data[i:i + 8 * KiB])
    wait_until(lambda: task.holds() == [True], 5, "ReaderHold(True) once the buffer is full")
    alice.read()
    assert alice.offsets() == (WINDOW, 0)  # the window, not the buffer, reached the caller
    while task.holds() == [True]:  # the caller catches up
        alice.ack()
        assert alice.recv(5) is not None
    assert task.holds() == [True, False]
    assert server.streams[task.ticket].buffered < BUFFER // 2
    task.answer("t")
    alice.read_to_reply("t")
    assert alice.stream(STDOUT) == data
    assert 'corral_stream_reader_holds_total 1.0' in generate_latest(metrics.registry).decode()


def test_a_caller_gone_while_held_releases_its_vm_and_the_buffer_becomes_a_ring(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t")
    task = started(directory, scheduler, "t")
    for _ in range(10):
        task.out(pattern(8 * KiB))
    wait_until(lambda: task.holds() == [True], 5, "held")
    alice.close()
    wait_until(lambda: task.holds() == [True, False], 5, "released once the caller is gone")
    for _ in range(40):  # the command runs on: 320 KiB more
        task.out(pattern(8 * KiB))
    wait_until(lambda: server.stream_totals.dropped["absent_reader"] == 80 * KiB + 320 * KiB - BUFFER, 5,
               "the oldest output dropped")
    assert server.streams[task.ticket].buffered == BUFFER == server.stream_totals.buffered
    assert task.holds() == [True, False]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """corrald's key pair and two allowed callers, alice and carol."""
    return curve_keys(tmp_path_factory.mktemp("keys"), allowed=("alice", "carol"))


@pytest.fixture
def curve_world(tmp_path, keys):
    with stream_world(tmp_path, SMALL, curve_config(keys), keys) as w:
        yield w.directory, w.server, w.scheduler, w.metrics, w.caller


def test_attach_on_a_new_connection_resumes_with_no_byte_lost_or_repeated(curve_world):
    directory, server, scheduler, metrics, caller = curve_world
    first = caller("alice")
    first.submit("job")
    task = started(directory, scheduler, "job")
    for i in range(6):  # 30 KiB on each stream: more than the window, less than the buffer
        task.out(pattern(5 * KiB, seed=i), STDOUT)
        task.out(pattern(5 * KiB, seed=100 + i), STDERR)
    for _ in range(3):  # it reads a little, acknowledges some of it, and its connection goes
        first.recv(5)
    first.ack("job")
    first.recv(5)
    have = first.offsets("job")
    assert 0 < sum(have) < 60 * KiB
    first.close()
    for i in range(6):  # the command runs on meanwhile
        task.out(pattern(3 * KiB, seed=200 + i), STDOUT)
    task.answer("job")

    # Another identity asking for it, and anyone asking for a task that does not exist: the same answer.
    carol = caller("carol")
    carol.attach("job", (0, 0))
    carol.attach("nope", (0, 0))
    theirs, unknown = carol.recv(5), carol.recv(5)
    assert theirs.error_code == unknown.error_code == "unknown_task"
    assert theirs.error_message == unknown.error_message
    assert carol.read() == []

    second = caller("alice")
    second.got["job"] = {s: bytearray(first.stream(s, "job")) for s in (STDOUT, STDERR)}
    second.attach("job", have)
    reply = second.read_to_reply("job")
    assert reply.exit_code == 0
    assert second.stream(STDOUT, "job") == task.written[STDOUT]
    assert second.stream(STDERR, "job") == task.written[STDERR]
    wait_until(lambda: server.unanswered() == 0, 5, "the ticket released")
    assert server.stream_totals.attaches == {"unknown_task": 2, "resumed": 1}


def test_attach_after_the_buffer_dropped_shows_the_gap(world):
    directory, server, scheduler, metrics, caller = world
    first = caller()
    first.submit("t")
    task = started(directory, scheduler, "t")
    first.close()
    wait_until(lambda: server.ledger[task.ticket].conn.closed, 5, "the server saw the connection go")
    data = pattern(BUFFER + 20 * KiB)
    for i in range(0, len(data), 4 * KiB):
        task.out(data[i:i + 4 * KiB])
    task.answer("t")
    wait_until(lambda: task.ticket in server.lingering, 5, "the answer waiting for the caller")
    second = caller()
    second.attach("t", (0, 0))
    second.read_to_reply("t", allow_gaps=True)
    assert second.gaps["t"][STDOUT] == 20 * KiB and second.stream(STDOUT) == data[20 * KiB:]


def test_stdin_before_the_command_starts_is_held_then_forwarded(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t", stream=False, stdin_open=True, stdin=b"first\n")
    (ticket,) = accepted(scheduler)
    alice.stdin(b"a\n")
    alice.stdin(b"b\n", eof=True)
    task = Producer(directory, ticket)
    wait_until(lambda: server.streams[ticket].stdin_closed, 5, "the stdin taken")
    time.sleep(0.1)
    assert task.stdin() == []  # nobody to give it to yet
    task.start()
    wait_until(lambda: task.stdin() == [(b"a\n", False), (b"b\n", True)], 5, "held stdin forwarded in order")
    alice.stdin(b"after eof")
    wait_until(lambda: server.stream_totals.stdin_refused["closed"] == 1, 5, "stdin after eof ignored")
    task.answer("t")
    alice.read_to_reply("t", ack=False)
    assert task.stdin() == [(b"a\n", False), (b"b\n", True)]


def test_stdin_past_the_cap_is_cut_there_with_eof(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t", stdin_open=True, stdin=b"r" * 100)  # the cap is 1000 with the request's own
    task = started(directory, scheduler, "t")
    alice.stdin(b"x" * 600)
    alice.stdin(b"y" * 600)
    alice.stdin(b"z" * 10, eof=True)
    wait_until(lambda: len(task.stdin()) == 2, 5, "two chunks forwarded")
    time.sleep(0.1)
    assert task.stdin() == [(b"x" * 600, False), (b"y" * 300, True)]
    assert server.stream_totals.stdin_refused == {"over_cap": 1, "closed": 1}
    assert alice.read() == []  # no TaskReply for a live task
    task.answer("t")
    alice.read_to_reply("t")


def test_a_request_with_more_stdin_than_the_cap_is_refused(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t", stdin=b"s" * 1001)
    (reply,) = alice.read()
    assert reply.error_code == "invalid_request" and "stdin of 1001 bytes" in reply.error_message


def test_stdin_and_acks_for_no_task_of_the_connection(world):
    """TaskStdin for an unknown task: unknown_task. For a live task without
    stdin_open, and any StreamAck: nothing, ever (a TaskReply with a live
    task's id would be taken for its answer)."""
    directory, server, scheduler, metrics, caller = world
    alice, bob = caller(), caller()
    alice.submit("live", stream=False)
    (ticket,) = accepted(scheduler)
    alice.stdin(b"x", task_id="live")
    alice.ack("live")
    alice.ack("nope")
    assert alice.read() == []
    alice.stdin(b"x", task_id="nope")
    bob.stdin(b"x", task_id="live")  # another connection's
    (mine,), (theirs,) = alice.read(), bob.read()
    assert mine.task_id == "nope" and mine.error_code == theirs.error_code == "unknown_task"
    assert mine.error_message == theirs.error_message
    assert server.stream_totals.stdin_refused == {"not_open": 1, "unknown_task": 2}
    assert server.stream_totals.acks_ignored == 2
    Producer(directory, ticket).answer("live")
    assert alice.read_to_reply("live", ack=False).exit_code == 0


def test_a_second_answer_for_a_streaming_task_is_dropped(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t")
    task = started(directory, scheduler, "t")
    task.out(pattern(WINDOW + 1))  # the reply must wait for an ack
    task.answer("t")
    task.answer("t", exit_code=9)
    wait_until(lambda: metrics.counter_total(metrics.duplicate_answers) == 1, 5, "the second answer counted")
    assert alice.read_to_reply("t").exit_code == 0 and alice.read() == []


def test_an_answered_stream_lingers_for_its_caller_then_is_dropped(tmp_path):
    limits = TaskLimits(**{**SMALL.__dict__, "streams": StreamLimits(
        window_bytes=WINDOW, buffer_bytes=BUFFER, linger_s=0.5, max_stdin_bytes=1000)})
    with stream_world(tmp_path, limits) as w:
        directory, server, scheduler, metrics = w.directory, w.server, w.scheduler, w.metrics
        late, never = w.caller(), w.caller()
        late.submit("a")
        never.submit("b")
        tickets = accepted(scheduler, 2)
        for name, ticket, sock in (("a", tickets[0], late), ("b", tickets[1], never)):
            task = Producer(directory, ticket)
            task.start()
            task.out(b"output of " + name.encode())
            wait_until(lambda: sock.recv(0.1) is not None, 5, "the output arrived")
            sock.close()
            wait_until(lambda: server.ledger[ticket].conn.closed, 5, "the caller gone")
            task.answer(name)
        back = w.caller()
        back.attach("a", (0, 0))  # within the linger: everything held, then the reply
        assert back.read_to_reply("a").exit_code == 0 and back.stream(STDOUT, "a") == b"output of a"
        wait_until(lambda: server.unanswered() == 0, 5, "b's reply dropped after the linger")
        assert server.stream_totals.replies_expired == 1 and server.stream_totals.buffered == 0
        assert metrics.counter_total(metrics.answers_undeliverable) == 1
        back.attach("b", (0, 0))
        (reply,) = back.read()
        assert reply.error_code == "unknown_task"


def test_stopping_sends_what_is_held_then_the_reply(world):
    directory, server, scheduler, metrics, caller = world
    alice = caller()
    alice.submit("t")
    task = started(directory, scheduler, "t")
    data = pattern(WINDOW * 2)
    task.out(data)
    wait_until(lambda: server.stream_totals.chunks_sent >= 1, 5, "the window sent")
    server.stop()
    reply = alice.read_to_reply("t", ack=False)
    assert reply.error_code == "cancelled" and alice.stream(STDOUT) == data


def test_stream_metrics_are_exported(world):
    directory, server, scheduler, metrics, caller = world
    text = generate_latest(metrics.registry).decode()
    for name in ("corral_stream_buffered_bytes 0.0", "corral_stream_chunks_sent_total 0.0",
                 'corral_stream_dropped_bytes_total{reason="absent_reader"} 0.0',
                 'corral_stream_attaches_total{result="resumed"} 0.0',
                 'corral_stream_stdin_refused_total{reason="over_cap"} 0.0'):
        assert name in text
