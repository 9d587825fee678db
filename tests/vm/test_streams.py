"""Live output and stdin (issue 14) through real VMs, the real agent, IOGuard
and Supervisors, without the caller's edge: tasks go straight to the
Scheduler, and a recording actor stands in as "intake" in the service's
Directory, so it sees what a Supervisor tells Intake (TaskStarted, each
OutputChunk, the Answer) with arrival times, and the test plays the edge's
part (StdinChunk, ReaderHold) on the Supervisor ref TaskStarted carries. The
edge and the client are tested on their own, and end to end by the CLI's
tests."""

from __future__ import annotations

import itertools
import threading
import time

import pykka
import pytest

from actors.messages import Answer, OutputChunk, ReaderHold, StdinChunk, Submit, Task, TaskStarted
from protocol.channel.constants import MAX_STDIN_CHUNK, STDERR, STDOUT
from protocol.wire.tasks import TaskRequest
from tests.support.service import wait_ready
from tests.support.waiting import wait_until

TICKETS = itertools.count(10**9)  # far from the real Intake's


class Arrivals:
    """Every message the stand-in Intake was told, with its arrival time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[float, object]] = []


class TimedRecorder(pykka.ThreadingActor):
    def __init__(self, arrivals: Arrivals) -> None:
        super().__init__()
        self.arrivals = arrivals

    def on_receive(self, message) -> None:
        with self.arrivals.lock:
            self.arrivals.items.append((time.monotonic(), message))


class Stream:
    """One task submitted to the Scheduler, as the recorder sees it."""

    def __init__(self, service, recorded: Arrivals, request: TaskRequest) -> None:
        self.recorded = recorded
        self.ticket = next(TICKETS)
        self.submitted = time.monotonic()
        assert service.directory.tell("scheduler", Submit(Task(self.ticket, request, time.monotonic())))

    def arrivals(self) -> list[tuple[float, object]]:
        with self.recorded.lock:
            return [(t, m) for t, m in self.recorded.items if getattr(m, "ticket", None) == self.ticket]

    def messages(self) -> list:
        return [m for _, m in self.arrivals()]

    def supervisor(self, timeout_s: float = 60) -> pykka.ActorRef:
        started = wait_until(lambda: next((m for m in self.messages() if isinstance(m, TaskStarted)), None),
                             timeout_s, "TaskStarted")
        return started.supervisor

    def chunks(self, stream: int = STDOUT) -> list[OutputChunk]:
        return [m for m in self.messages() if isinstance(m, OutputChunk) and m.stream == stream]

    def output(self, stream: int = STDOUT) -> bytes:
        data = b""
        for chunk in self.chunks(stream):
            assert chunk.offset == len(data), "a chunk out of order"
            data += chunk.data
        return data

    def answer(self, timeout_s: float = 60) -> Answer:
        answer = wait_until(lambda: next((m for m in self.messages() if isinstance(m, Answer)), None),
                            timeout_s, "the answer")
        messages = self.messages()
        assert messages.count(answer) == 1 and messages[-1] == answer, "the answer is not last, or not once"
        return answer


def request(argv: list[bytes], **fields) -> TaskRequest:
    return TaskRequest(**{"task_id": "s", "priority": 2, "argv": tuple(argv), "env": (), "cwd": b"", "stdin": b"",
                          "timeout_ms": 60_000, "output_cap": 16 << 20, "capabilities": (), **fields})


@pytest.fixture
def intake(service):
    """The recorder as the service's "intake" for one test (the real one back after)."""
    wait_ready(service)
    real = service.directory.get("intake")
    recorded = Arrivals()
    recorder = TimedRecorder.start(recorded)
    service.directory["intake"] = recorder
    try:
        yield recorded
    finally:
        service.directory["intake"] = real
        recorder.stop()


def test_stdin_in_two_chunks_then_eof_reaches_cat_in_the_guest(service, intake):
    stream = Stream(service, intake, request([b"cat"], stream=True, stdin_open=True, stdin=b"from the request\n"))
    supervisor = stream.supervisor()
    supervisor.tell(StdinChunk(stream.ticket, b"first chunk\n", False))
    # cat echoes it while its stdin stays open: the pipe is not closed between chunks.
    wait_until(lambda: stream.output() == b"from the request\nfirst chunk\n", 30, "the first chunk echoed")
    supervisor.tell(StdinChunk(stream.ticket, b"second chunk\n", False))
    supervisor.tell(StdinChunk(stream.ticket, b"", True))
    reply = stream.answer().reply
    assert (reply.error_code, reply.exit_code, reply.stdout, reply.stderr) == ("", 0, b"", b"")
    assert stream.output() == b"from the request\nfirst chunk\nsecond chunk\n"


def test_stdin_open_without_a_stream_collects_the_output_into_the_reply(service, intake):
    stream = Stream(service, intake, request([b"sh", b"-c", b"cat; echo end >&2"], stdin_open=True))
    supervisor = stream.supervisor()
    supervisor.tell(StdinChunk(stream.ticket, b"a\n", False))
    supervisor.tell(StdinChunk(stream.ticket, b"b\n", True))
    reply = stream.answer().reply
    assert (reply.exit_code, reply.stdout, reply.stderr) == (0, b"a\nb\n", b"end\n")
    assert not stream.chunks(STDOUT) and not stream.chunks(STDERR)


def test_the_first_line_arrives_while_the_command_still_runs(service, intake):
    stream = Stream(service, intake, request([b"sh", b"-c", b"echo first; sleep 3; echo second >&2"],
                                             stream=True))
    reply = stream.answer().reply
    assert reply.exit_code == 0 and reply.stdout == b"" and reply.stderr == b""
    arrivals = stream.arrivals()
    first_at = next(t for t, m in arrivals if isinstance(m, OutputChunk))
    answered_at = arrivals[-1][0]
    assert stream.output(STDOUT) == b"first\n" and stream.output(STDERR) == b"second\n"
    assert answered_at - first_at > 2.0, answered_at - first_at
    print(f"FIGURE streamed `echo first; sleep 3; echo second`: first chunk {answered_at - first_at:.2f} s "
          f"before the answer ({first_at - stream.submitted:.3f} s after submit)")


def test_a_command_that_never_reads_its_stdin_blocks_nothing(service, intake):
    stream = Stream(service, intake, request([b"sh", b"-c", b"sleep 2; echo done"], stream=True,
                                             stdin_open=True, timeout_ms=30_000))
    supervisor = stream.supervisor()
    for _ in range(48):  # 3 MiB: far over any pipe, socket and virtio buffer
        supervisor.tell(StdinChunk(stream.ticket, b"x" * MAX_STDIN_CHUNK, False))
    supervisor.tell(StdinChunk(stream.ticket, b"", True))
    reply = stream.answer(timeout_s=30).reply
    answered = time.monotonic() - stream.submitted
    assert (reply.error_code, reply.exit_code) == ("", 0) and stream.output() == b"done\n"
    assert answered < 15, answered
    # The VM lives on, reset as usual.
    wait_ready(service)


def test_a_reader_hold_stops_the_vms_output_without_ending_it_and_the_rest_follows_the_release(service, intake):
    size = 4_000_000  # ~4 s at IOGuard's 1 MiB/s
    stream = Stream(service, intake, request([b"head", b"-c", str(size).encode(), b"/dev/zero"], stream=True))
    supervisor = stream.supervisor()
    wait_until(lambda: stream.chunks(), 30, "the first chunk")
    supervisor.tell(ReaderHold(stream.ticket, True))
    ioguard = service.directory.get("ioguard").proxy()

    def vm_held():
        return [vm for vm, s in ioguard.stats().get(timeout=5)["vms"].items() if s["held_by"] == ["reader"]]

    (vm,) = wait_until(vm_held, 10, "the channel held for the reader")
    time.sleep(0.5)  # what was on its way when the hold came
    during = len(stream.output())
    time.sleep(3)  # longer than any frame's stall deadline (1 s + 64 KiB at 1 MiB/s)
    assert len(stream.output()) == during < size, "output came through the hold"
    assert not any(isinstance(m, Answer) for m in stream.messages())
    supervisor.tell(ReaderHold(stream.ticket, False))
    reply = stream.answer(timeout_s=60).reply
    assert (reply.error_code, reply.exit_code, reply.stdout_truncated) == ("", 0, False), reply
    assert stream.output() == bytes(size)
    assert ioguard.stats().get(timeout=5)["vms"].get(vm, {}).get("held_by", []) == []
    print(f"FIGURE reader hold: {during} of {size} bytes through when held; held 3.5 s, no violation; "
          f"the rest after the release")
