"""Streaming tasks in the client library (Client.stream, Client.attach,
TaskStream) and in `corral run` (output as it comes, -i), against the fake
corrald of tests/support/fake_corrald.py: a real ROUTER the test scripts
frame by frame."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from protocol.channel.constants import MAX_STDIN, MAX_STDIN_CHUNK, STDERR, STDOUT
from protocol.client.api import MAX_STREAM_HELD, Client, StreamBroken, StreamChunk
from protocol.client.cli import main
from protocol.wire.tasks import (MAX_STREAM_CHUNK, StreamAck, TaskAttach, TaskOutput, TaskRequest, TaskStdin,
                                 error_reply)
from tests.support.fake_corrald import FakeDaemon, framed, ok_reply
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_client_thread_left_behind():
    yield
    assert [t.name for t in threading.enumerate() if t.name.startswith("corral-client")] == []


def output(task_id: str, stream: int, offset: int, data: bytes) -> TaskOutput:
    return TaskOutput(task_id=task_id, stream=stream, offset=offset, data=data)


def first_request(daemon) -> tuple[bytes, TaskRequest | TaskAttach]:
    """(the client's identity, its first message), once it arrived."""
    wait_until(lambda: daemon.requests, 5, "the client's first message")
    return daemon.senders[0], daemon.requests[0]


# --- the client library ----------------------------------------------------------

def test_chunks_come_in_order_then_the_reply(daemon, client):
    def stream_then_answer(identity, request):
        if not isinstance(request, TaskRequest):
            return []
        chunks = [output(request.task_id, STDOUT, 0, b"one\n"), output(request.task_id, STDERR, 0, b"warn\n"),
                  output(request.task_id, STDOUT, 4, b"two\n")]
        return [framed(identity, c) for c in chunks] + [framed(identity, ok_reply(request.task_id, exit_code=4))]

    daemon.answer = stream_then_answer
    task = client.stream(["sh", "-c", "x"], task_id="ordered", timeout_s=3)
    assert list(task) == [StreamChunk(STDOUT, 0, b"one\n"), StreamChunk(STDERR, 0, b"warn\n"),
                          StreamChunk(STDOUT, 4, b"two\n")]
    reply = task.reply(5)
    assert (reply.task_id, reply.exit_code) == ("ordered", 4)
    [request] = daemon.of_type(TaskRequest)
    assert (request.stream, request.stdin_open, request.timeout_ms) == (True, False, 3000)
    assert task.dropped == {STDOUT: 0, STDERR: 0}


def test_a_chunk_reaches_the_caller_before_the_task_ends(daemon, client):
    task = client.stream(["slow"], task_id="live")
    identity, _ = first_request(daemon)
    daemon.push(framed(identity, output("live", STDOUT, 0, b"first\n")))
    chunks = task.chunks(wait_s=5)
    assert next(chunks) == StreamChunk(STDOUT, 0, b"first\n")
    assert not task.done()
    daemon.push(framed(identity, output("live", STDOUT, 6, b"second\n")), framed(identity, ok_reply("live")))
    assert list(chunks) == [StreamChunk(STDOUT, 6, b"second\n")]
    assert task.reply(5).exit_code == 0


def test_consumed_output_is_acked_a_quarter_window_at_a_time_and_when_drained(daemon):
    # A window of 40 bytes: an ack once 10 consumed bytes are unacked, or when
    # the caller comes back for more and nothing is waiting.
    with Client(daemon.endpoint, stream_window_bytes=40) as client:
        task = client.stream(["x"], task_id="acks")
        identity, _ = first_request(daemon)
        daemon.push(framed(identity, output("acks", STDOUT, 0, b"a" * 10)),
                    framed(identity, output("acks", STDERR, 0, b"b" * 5)),
                    framed(identity, output("acks", STDOUT, 10, b"c" * 3)))
        wait_until(lambda: task.buffered == 18, 5, "three chunks in the handle")
        chunks = iter(task)
        assert next(chunks).data == b"a" * 10
        time.sleep(0.2)
        assert daemon.of_type(StreamAck) == []  # handed out is not consumed yet
        assert next(chunks).data == b"b" * 5  # the a's consumed: 10 bytes, a quarter window
        wait_until(lambda: daemon.of_type(StreamAck), 5, "the first ack")
        assert next(chunks).data == b"c" * 3  # 5 unacked, more waiting: no ack
        with pytest.raises(TimeoutError):  # back for more, nothing waiting: ack all consumed
            next(task.chunks(wait_s=0.3))
        wait_until(lambda: len(daemon.of_type(StreamAck)) == 2, 5, "the second ack")
        assert daemon.of_type(StreamAck) == [
            StreamAck(task_id="acks", stdout_offset=10, stderr_offset=0),
            StreamAck(task_id="acks", stdout_offset=13, stderr_offset=5)]
        daemon.push(framed(identity, ok_reply("acks")))
        assert list(chunks) == []
        assert task.reply(5).task_id == "acks"
        time.sleep(0.1)
        assert len(daemon.of_type(StreamAck)) == 2  # nothing acked after the reply


def test_the_reply_comes_after_chunks_sent_before_it_even_unread(daemon, client):
    task = client.stream(["x"], task_id="late-reader")
    identity, _ = first_request(daemon)
    daemon.push(*(framed(identity, output("late-reader", STDOUT, i * 3, b"%03d" % i)) for i in range(50)),
                framed(identity, ok_reply("late-reader", exit_code=2)))
    assert task.reply(5).exit_code == 2
    assert b"".join(chunk.data for chunk in task) == b"".join(b"%03d" % i for i in range(50))


def test_write_and_close_stdin_send_task_stdin_frames_in_order(daemon, client):
    task = client.stream(["cat"], stdin=b"first ", stdin_open=True, task_id="in")
    task.write(b"x" * (MAX_STDIN_CHUNK + 10))
    task.write(b"")  # nothing to send
    task.close_stdin()
    task.close_stdin()  # once only
    with pytest.raises(ValueError, match="already closed"):
        task.write(b"more")
    wait_until(lambda: len(daemon.requests) == 4, 5, "the request and three stdin frames")
    request, *stdin = daemon.requests
    assert (request.stdin, request.stdin_open, request.stream) == (b"first ", True, True)
    assert stdin == [TaskStdin(task_id="in", data=b"x" * MAX_STDIN_CHUNK, eof=False),
                     TaskStdin(task_id="in", data=b"x" * 10, eof=False),
                     TaskStdin(task_id="in", data=b"", eof=True)]
    assert task.stdin_sent == len(b"first ") + MAX_STDIN_CHUNK + 10


def test_stdin_is_bounded_per_task_and_needs_stdin_open(daemon, client):
    closed = client.stream(["true"], task_id="no-stdin")
    with pytest.raises(ValueError, match="stdin_open"):
        closed.write(b"x")
    task = client.stream(["cat"], stdin=b"12345", stdin_open=True, task_id="capped")
    with pytest.raises(ValueError, match=f"limit of {MAX_STDIN} bytes"):
        task.write(bytes(MAX_STDIN - 4))
    task.write(bytes(MAX_STDIN - 5))  # exactly the limit, the request's stdin included
    wait_until(lambda: sum(len(m.data) for m in daemon.of_type(TaskStdin)) == MAX_STDIN - 5, 10,
               "every stdin byte within the limit")


def test_stdin_after_the_reply_is_dropped(daemon, client):
    daemon.answer = lambda identity, request: (
        [framed(identity, ok_reply(request.task_id))] if isinstance(request, TaskRequest) else [])
    task = client.stream(["true"], stdin_open=True, task_id="over")
    assert task.reply(5).exit_code == 0
    task.write(b"too late")
    task.close_stdin()
    time.sleep(0.2)
    assert daemon.of_type(TaskStdin) == []


def test_attach_asks_from_offsets_and_trims_or_counts_what_corrald_no_longer_matches(daemon, client):
    def resend(identity, request):
        if isinstance(request, StreamAck):
            return []
        assert request == TaskAttach(task_id="old", stdout_offset=100, stderr_offset=7)
        # stdout resent from 90 (10 bytes we have), stderr from 20 (13 bytes gone).
        return [framed(identity, output("old", STDOUT, 90, b"0123456789abc")),
                framed(identity, output("old", STDOUT, 80, b"seen before")),  # wholly before: dropped
                framed(identity, output("old", STDERR, 20, b"err")),
                framed(identity, output("old", STDOUT, 103, b"def")),
                framed(identity, ok_reply("old", exit_code=1))]

    daemon.answer = resend
    task = client.attach("old", stdout_offset=100, stderr_offset=7)
    assert list(task.chunks(wait_s=5)) == [StreamChunk(STDOUT, 100, b"abc"), StreamChunk(STDERR, 20, b"err"),
                                           StreamChunk(STDOUT, 103, b"def")]
    assert task.dropped == {STDOUT: 0, STDERR: 13}
    assert task.reply(5).exit_code == 1


def test_attach_to_an_unknown_task_ends_with_its_error(daemon, client):
    daemon.answer = lambda identity, request: [framed(identity, error_reply(
        request.task_id, "unknown_task", "no task 'gone' in flight for this identity"))]
    task = client.attach("gone")
    assert list(task.chunks(wait_s=5)) == []
    assert task.reply(5).error_code == "unknown_task"


def test_a_dropped_connection_ends_the_stream_and_attach_takes_it_up_again(tmp_path):
    fake = FakeDaemon(f"ipc://{tmp_path}/d.sock")
    with Client(fake.endpoint) as client:
        task = client.stream(["sleep", "60"], task_id="cut")
        identity, _ = first_request(fake)
        fake.push(framed(identity, output("cut", STDOUT, 0, b"before ")),
                  framed(identity, output("cut", STDOUT, 7, b"the cut")))
        wait_until(lambda: task.buffered == 14, 5, "both chunks")
        fake.stop()  # as a crash would
        assert b"".join(chunk.data for chunk in task.chunks(wait_s=5)) == b"before the cut"
        reply = task.reply(5)
        assert (reply.error_code, reply.outcome) == ("connection_lost", "unknown")
        assert task.offsets == (14, 0)
        # corrald is back: the same client takes the task up from there on its new connection.
        again = FakeDaemon(fake.endpoint)
        try:
            again.answer = lambda identity, request: [framed(identity, output("cut", STDOUT, 14, b"!")),
                                                      framed(identity, ok_reply("cut"))]
            resumed = client.attach("cut", *task.offsets)
            assert list(resumed.chunks(wait_s=10)) == [StreamChunk(STDOUT, 14, b"!")]
            assert resumed.reply(5).error_code == ""
            assert again.of_type(TaskAttach) == [TaskAttach(task_id="cut", stdout_offset=14, stderr_offset=0)]
        finally:
            again.stop()


def test_a_stopping_corrald_may_send_past_the_window_but_a_flood_breaks_the_stream(daemon):
    # A stopping corrald sends all it holds whatever the window: a handle takes
    # up to MAX_STREAM_HELD per stream unacked; past it the server is broken.
    with Client(daemon.endpoint, stream_window_bytes=1024) as client:
        task = client.stream(["yes"], task_id="flood")
        identity, _ = first_request(daemon)
        big = b"y" * MAX_STREAM_CHUNK
        count = MAX_STREAM_HELD // MAX_STREAM_CHUNK
        daemon.push(*(framed(identity, output("flood", STDOUT, i * len(big), big)) for i in range(count)),
                    framed(identity, output("flood", STDERR, 0, big)),  # the other stream has its own room
                    framed(identity, output("flood", STDOUT, count * len(big), b"!")),  # one byte too many
                    framed(identity, ok_reply("flood")))
        assert task.reply(10).exit_code == 0
        chunks = task.chunks(wait_s=5)
        assert [len(next(chunks).data) for _ in range(count + 1)] == [MAX_STREAM_CHUNK] * (count + 1)
        with pytest.raises(StreamBroken, match=f"stdout more than {MAX_STREAM_HELD} bytes beyond what"):
            next(chunks)
        daemon.answer = lambda identity, request: [framed(identity, ok_reply(request.task_id, exit_code=3))]
        assert client.run(["true"], wait_s=5).exit_code == 3  # the client lives on


def test_output_for_a_task_nobody_streams_is_ignored(daemon, client):
    daemon.answer = lambda identity, request: [framed(identity, output("stranger", STDOUT, 0, b"??")),
                                               framed(identity, ok_reply(request.task_id, stdout=b"plain"))]
    assert client.run(["true"], wait_s=5).stdout == b"plain"
    assert daemon.requests[0].stream is False  # submit()/run() do not stream


def test_a_deadline_on_the_chunks_then_abandon(daemon, client):
    task = client.stream(["sleep", "9"], task_id="slow")
    with pytest.raises(TimeoutError, match=f"no answer from corrald at {daemon.endpoint} within 0.2 s"):
        list(task.chunks(wait_s=0.2))
    task.abandon()
    assert list(task) == []
    with pytest.raises(TimeoutError, match="abandoned"):
        task.reply(1)
    identity, _ = first_request(daemon)
    daemon.push(framed(identity, output("slow", STDOUT, 0, b"late")), framed(identity, ok_reply("slow")))
    daemon.answer = lambda identity, request: [framed(identity, ok_reply(request.task_id, exit_code=5))]
    assert client.run(["true"], task_id="slow", wait_s=5).exit_code == 5  # the id is free again


def test_an_unreachable_corrald_ends_the_stream_at_once(tmp_path):
    with Client(f"ipc://{tmp_path}/nobody.sock") as client:
        task = client.stream(["true"])
        assert list(task.chunks(wait_s=5)) == []
        with pytest.raises(Exception, match="not running"):
            task.reply(5)


# --- the command line ------------------------------------------------------------

def cli(daemon, *args: str) -> int:
    return main(["run", "--endpoint", daemon.endpoint, "--wait", "5", *args])


def test_cli_streams_each_stream_to_its_own_byte_for_byte(daemon, capsysbinary):
    def answer(identity, request):
        if not isinstance(request, TaskRequest):
            return []
        t = request.task_id
        return [framed(identity, output(t, STDOUT, 0, b"out\xff\x00")), framed(identity, output(t, STDERR, 0, b"e1 ")),
                framed(identity, output(t, STDOUT, 5, b"\n")), framed(identity, output(t, STDERR, 3, b"e2\n")),
                framed(identity, ok_reply(t, exit_code=3))]

    daemon.answer = answer
    assert cli(daemon, "--", "sh", "-c", "x") == 3
    assert capsysbinary.readouterr() == (b"out\xff\x00\n", b"e1 e2\n")
    assert daemon.requests[0].stream is True and daemon.requests[0].stdin_open is False


def test_cli_notes_truncation_and_timeout_after_streamed_output(daemon, capsysbinary):
    daemon.answer = lambda identity, request: [] if not isinstance(request, TaskRequest) else [
        framed(identity, output(request.task_id, STDOUT, 0, b"partial")),
        framed(identity, error_reply(request.task_id, "timeout", "killed at its deadline", outcome="timed_out"))]
    assert cli(daemon, "--timeout", "2", "--", "sleep", "9") == 124
    assert capsysbinary.readouterr() == (b"partial", b"corral: timed out after 2.0 s\n")


def test_cli_writes_output_while_the_command_runs(daemon):
    """The real CLI process: its first line is on its stdout while the task
    is still in flight (the fake holds the reply until the test read it)."""
    cli_process = subprocess.Popen([sys.executable, "-m", "protocol.client", "run", "--endpoint", daemon.endpoint,
                                    "--", "sh", "-c", "echo first; sleep 4; echo second"],
                                   cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    try:
        identity, request = first_request(daemon)
        daemon.push(framed(identity, output(request.task_id, STDOUT, 0, b"first\n")))
        assert cli_process.stdout.readline() == b"first\n"
        assert cli_process.poll() is None
        daemon.push(framed(identity, output(request.task_id, STDOUT, 6, b"second\n")),
                    framed(identity, ok_reply(request.task_id)))
        out, err = cli_process.communicate(timeout=30)
    finally:
        cli_process.kill()
    assert (out, err, cli_process.returncode) == (b"second\n", b"", 0)


def echo_stdin_back(identity, request):
    """cat: the stdin frames' data as output, the reply after the EOF."""
    if isinstance(request, TaskRequest):
        echo_stdin_back.offset = 0
        return []
    if not isinstance(request, TaskStdin):
        return []
    messages = []
    if request.data:
        messages.append(framed(identity, output(request.task_id, STDOUT, echo_stdin_back.offset, request.data)))
        echo_stdin_back.offset += len(request.data)
    if request.eof:
        messages.append(framed(identity, ok_reply(request.task_id)))
    return messages


def test_cli_interactive_forwards_stdin_and_its_eof(daemon):
    daemon.answer = echo_stdin_back
    cli_process = subprocess.Popen([sys.executable, "-m", "protocol.client", "run", "-i", "--endpoint",
                                    daemon.endpoint, "--", "cat"], cwd=REPO, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cli_process.stdin.write(b"hello\n")
        cli_process.stdin.flush()
        assert cli_process.stdout.readline() == b"hello\n"  # forwarded as it came, not at EOF
        out, err = cli_process.communicate(b"world\n", timeout=30)
    finally:
        cli_process.kill()
    assert (out, err, cli_process.returncode) == (b"world\n", b"", 0)
    [request], stdin = daemon.of_type(TaskRequest), daemon.of_type(TaskStdin)
    assert (request.stdin_open, request.stdin) == (True, b"")
    assert b"".join(m.data for m in stdin) == b"hello\nworld\n" and stdin[-1].eof


def test_cli_interactive_stops_at_the_stdin_cap(daemon, monkeypatch, capsysbinary):
    daemon.answer = lambda identity, request: (
        [framed(identity, ok_reply(request.task_id))] if isinstance(request, TaskStdin) and request.eof else [])
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(bytes(MAX_STDIN + 100)))))
    assert main(["run", "-i", "--endpoint", daemon.endpoint, "--wait", "30", "--", "cat"]) == 0
    stdin = daemon.of_type(TaskStdin)
    assert sum(len(m.data) for m in stdin) == MAX_STDIN
    assert all(len(m.data) <= MAX_STDIN_CHUNK for m in stdin) and stdin[-1].eof
    assert capsysbinary.readouterr().err == (f"corral: stdin is over the limit of {MAX_STDIN} bytes per task: "
                                             "the command's stdin was closed there\n").encode()


def test_cli_without_i_never_reads_its_stdin(daemon):
    daemon.answer = lambda identity, request: [framed(identity, ok_reply(request.task_id))]
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"not for corral\n")
        done = subprocess.run([sys.executable, "-m", "protocol.client", "run", "--endpoint", daemon.endpoint,
                               "--", "true"], cwd=REPO, stdin=read_end, capture_output=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
        os.set_blocking(read_end, False)
        assert os.read(read_end, 100) == b"not for corral\n"  # still there: nobody read it
    finally:
        os.close(read_end)
        os.close(write_end)
    assert daemon.requests[0].stdin_open is False


def test_cli_interactive_and_stdin_file_are_one_or_the_other(capsys):
    assert main(["run", "-i", "--stdin-file", "-", "--endpoint", "ipc:///nonexistent/x.sock", "--", "cat"]) == 2
    assert "-i and --stdin-file" in capsys.readouterr().err


def test_cli_whose_reader_goes_away_ends_as_a_shell_would(daemon):
    """`corral run -- yes | head -1`: a closed stdout ends corral with 128 +
    SIGPIPE, quietly, not with a traceback."""
    cli_process = subprocess.Popen([sys.executable, "-m", "protocol.client", "run", "--endpoint", daemon.endpoint,
                                    "--", "yes"], cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
    try:
        identity, request = first_request(daemon)
        daemon.push(framed(identity, output(request.task_id, STDOUT, 0, b"y\n")))
        assert cli_process.stdout.readline() == b"y\n"
        cli_process.stdout.close()
        daemon.push(*(framed(identity, output(request.task_id, STDOUT, 2 + 2 * i, b"y\n")) for i in range(100)))
        assert cli_process.wait(timeout=30) == 128 + 13
        assert cli_process.stderr.read() == b""
    finally:
        cli_process.kill()
        cli_process.stderr.close()


def test_cli_interactive_ends_with_the_task_while_its_stdin_stays_open(daemon):
    """The command ended without reading: corral exits with it, cleanly, though
    its stdin never reached EOF (its reader thread is still blocked in a read)."""
    daemon.answer = lambda identity, request: (
        [framed(identity, ok_reply(request.task_id, exit_code=0))] if isinstance(request, TaskRequest) else [])
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"never read\n")
        done = subprocess.run([sys.executable, "-m", "protocol.client", "run", "-i", "--endpoint", daemon.endpoint,
                               "--", "true"], cwd=REPO, stdin=read_end, capture_output=True, timeout=60)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
