"""A Supervisor's side of live output and stdin (issue 14), without a VM: a
real Supervisor actor on a unix socket whose far end a test plays as the guest
agent (it reads the host's frames), with what the guest says told to the
Supervisor as IOGuard would (GuestSaid), and recording actors as Intake,
IOGuard, the pool and the Scheduler. The libvirt side is a stand-in that only
records. What the real agent and IOGuard do is tests/vm/test_streams.py's."""

from __future__ import annotations

import socket
import time
import zlib
from pathlib import Path

import pykka
import pytest

from actors.artifacts.files import FileSettings
from actors.directory import Directory
from actors.edge.metrics import Metrics
from actors.messages import (Answer, ChannelHold, Freeze, GuestSaid, OutputChunk, PoolVmState, ReaderHold, RunTask,
                             StdinChunk, Task, TaskStarted, Thaw, VmState, Watch)
from actors.refill import NewVm
from actors.supervisor import Supervisor, VmSettings
from actors.timers import Timers
from actors.vm.handle import VmHandle
from protocol.channel import codec, messages as guest
from protocol.channel.constants import MAX_STDIN, MAX_STDIN_CHUNK, STDERR, STDOUT
from protocol.channel.frame import FrameDecoder
from protocol.wire.tasks import TaskRequest
from tests.support.probe import Recorder
from tests.support.service import counter
from tests.support.waiting import wait_until

VM = "corral-test-streams"


class RunControl:
    def __init__(self, calls: list):
        self.calls = calls

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def close(self) -> None:
        pass


class Hypervisor:
    """Stands in for libvirt: records pauses, resumes and destroys."""

    def __init__(self) -> None:
        self.calls: list = []
        self.destroyed: list[str] = []

    def run_control(self, handle):
        return RunControl(self.calls)

    def set_cpu(self, name, shares, quota_pct) -> None:
        pass

    def destroy(self, handle) -> None:
        self.destroyed.append(handle.name)


class Refill:
    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def new_vm(self, name, network=False, memory_mib=None) -> NewVm:
        return NewVm(handle=VmHandle(name=name, overlay=Path("/nonexistent.qcow2"), socket=self.socket_path,
                                     console_log=None, spec=None), kind="boot")


class GuestEnd:
    """The guest side of the channel socket: reads what the host sends."""

    def __init__(self, server: socket.socket) -> None:
        self.conn, _ = server.accept()
        self.conn.settimeout(5)
        self.decoder = FrameDecoder(zlib.crc32)
        self.pending: list = []

    def receive(self, timeout: float = 5.0):
        self.conn.settimeout(timeout)
        while not self.pending:
            data = self.conn.recv(1 << 20)
            assert data, "the host closed the channel"
            self.pending += [codec.decode(p, guest.HOST_TO_GUEST) for p in self.decoder.feed(data)]
        return self.pending.pop(0)

    def nothing_more(self, seconds: float = 0.3) -> bool:
        try:
            message = self.receive(seconds)
        except socket.timeout:
            return True
        raise AssertionError(f"the host sent {message}")


def exit_message(exec_id: int, **changes) -> guest.Exit:
    fields = dict(exec_id=exec_id, exit_code=0, signal=0, timed_out=False, stdout_truncated=False,
                  stderr_truncated=False, wall_ms=5, user_cpu_ms=1, sys_cpu_ms=1, max_rss_kib=100)
    return guest.Exit(**{**fields, **changes})


def out(exec_id: int, offset: int, data: bytes, stream: int = STDOUT) -> guest.Output:
    return guest.Output(exec_id=exec_id, stream=stream, offset=offset, data=data)


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.directory = Directory()
        self.recorders = {name: Recorder.start() for name in ("intake", "ioguard", "pool", "scheduler")}
        for name, ref in self.recorders.items():
            self.directory[name] = ref
        self.metrics = Metrics()
        self.timers = Timers()
        self.hypervisor = Hypervisor()
        path = tmp_path / "vm.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.refill = Refill(path)
        self.tickets = iter(range(1, 1000))
        self.supervisor = None
        self.guest: GuestEnd | None = None

    def seen(self, name: str) -> list:
        return self.recorders[name].proxy().seen.get()

    def start(self, deadman_grace_s: float = 5.0) -> None:
        settings = VmSettings(boot_timeout_s=10, acquire_timeout_s=10, reset_timeout_s=10,
                              deadman_grace_s=deadman_grace_s, max_uses=10, max_age_s=300, strict=False,
                              files=FileSettings(max_put_bytes=1 << 20, max_collect_bytes=1 << 20,
                                                 collect_timeout_s=10, signer=None))
        self.supervisor = Supervisor.start(VM, directory=self.directory, hypervisor=self.hypervisor,
                                           refill=self.refill, timers=self.timers, metrics=self.metrics,
                                           settings=settings)
        self.guest = GuestEnd(self.server)
        wait_until(lambda: any(isinstance(m, Watch) for m in self.seen("ioguard")), 5, "the Watch")
        self.say(guest.Hello(agent_version="t", boot_id="b", kernel="k"))
        wait_until(lambda: VmState(VM, PoolVmState.READY) in self.seen("pool"), 5, "the VM ready")

    def say(self, *said) -> None:
        """What the guest says, as IOGuard delivers it."""
        for message in said:
            self.supervisor.tell(GuestSaid(VM, message))

    def tell(self, message) -> None:
        self.supervisor.tell(message)

    def run(self, **fields) -> tuple[Task, guest.Exec]:
        """Give the VM a task; answer its heartbeat; return the task and its Exec."""
        request = TaskRequest(**{"task_id": "t", "priority": 2, "argv": (b"cmd",), "env": (), "cwd": b"",
                                 "stdin": b"", "timeout_ms": 30_000, "output_cap": 1 << 20,
                                 "capabilities": (), **fields})
        task = Task(next(self.tickets), request, time.monotonic())
        self.tell(RunTask(task, time.monotonic()))
        heartbeat = self.guest.receive()
        assert isinstance(heartbeat, guest.Heartbeat)
        self.say(guest.HeartbeatAck(nonce=heartbeat.nonce))
        while isinstance(message := self.guest.receive(), guest.PutFile):
            pass
        assert isinstance(message, guest.Exec), message
        return task, message

    def intake_after(self, count: int, timeout_s: float = 5) -> list:
        """What Intake was told, once it holds at least `count` messages."""
        wait_until(lambda: len(self.seen("intake")) >= count, timeout_s, f"{count} messages to intake")
        return self.seen("intake")

    def answers(self) -> list:
        return [m for m in self.seen("intake") if isinstance(m, Answer)]

    def gone(self, reason: str) -> None:
        wait_until(lambda: VmState(VM, PoolVmState.GONE, reason) in self.seen("pool"), 5, f"the VM gone: {reason}")
        assert self.hypervisor.destroyed == [VM]

    def close(self) -> None:
        pykka.ActorRegistry.stop_all()
        self.timers.stop()
        if self.guest is not None:
            self.guest.conn.close()
        self.server.close()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


# --- streaming output -----------------------------------------------------------------

def test_a_streaming_task_forwards_each_chunk_keeps_none_and_is_answered_after_the_last(world):
    world.start()
    task, exec_ = world.run(stream=True)
    assert not exec_.stdin_open
    world.say(out(exec_.exec_id, 0, b"ab"), out(exec_.exec_id, 0, b"E", STDERR), out(exec_.exec_id, 2, b"cd"),
              exit_message(exec_.exec_id, exit_code=3))
    seen = world.intake_after(5)
    assert seen[0] == TaskStarted(task.ticket, world.supervisor)
    assert seen[1:4] == [OutputChunk(task.ticket, STDOUT, 0, b"ab"), OutputChunk(task.ticket, STDERR, 0, b"E"),
                         OutputChunk(task.ticket, STDOUT, 2, b"cd")]
    (answer,) = seen[4:]
    assert answer.ticket == task.ticket
    reply = answer.reply
    assert (reply.error_code, reply.exit_code, reply.stdout, reply.stderr) == ("", 3, b"", b"")
    assert not reply.stdout_truncated and not reply.stderr_truncated
    assert isinstance(world.guest.receive(), guest.Reset)  # and the VM lives on


def test_a_streaming_task_gets_no_byte_past_its_cap_and_its_answer_says_so(world):
    world.start()
    task, exec_ = world.run(stream=True, output_cap=3)
    world.say(out(exec_.exec_id, 0, b"ab"), out(exec_.exec_id, 2, b"cd"), out(exec_.exec_id, 4, b"ef"),
              exit_message(exec_.exec_id))
    seen = world.intake_after(4)
    assert seen[1:3] == [OutputChunk(task.ticket, STDOUT, 0, b"ab"), OutputChunk(task.ticket, STDOUT, 2, b"c")]
    assert isinstance(seen[3], Answer) and len(seen) == 4
    assert seen[3].reply.stdout_truncated and not seen[3].reply.stderr_truncated


def test_a_task_that_does_not_stream_gets_its_output_in_the_reply_as_before(world):
    world.start()
    task, exec_ = world.run()
    world.say(out(exec_.exec_id, 0, b"ab"), out(exec_.exec_id, 2, b"cd"), exit_message(exec_.exec_id))
    (answer,) = world.intake_after(1)  # no TaskStarted, no chunks
    assert answer.reply.stdout == b"abcd"


def test_stdin_open_alone_starts_the_stream_of_stdin_but_output_comes_in_the_reply(world):
    world.start()
    task, exec_ = world.run(stdin_open=True)
    assert exec_.stdin_open
    world.say(out(exec_.exec_id, 0, b"ab"), exit_message(exec_.exec_id))
    started, answer = world.intake_after(2)
    assert started == TaskStarted(task.ticket, world.supervisor)
    assert answer.reply.stdout == b"ab"


# --- violations ---------------------------------------------------------------------------

def ends_as_violation(world, kind: str, task: Task | None, *said) -> None:
    before = counter(world.metrics.violations, kind=kind)
    world.say(*said)
    world.gone("protocol_violation")
    assert counter(world.metrics.violations, kind=kind) == before + 1
    time.sleep(0.2)  # nothing more is answered
    answers = world.answers()
    if task is not None:
        (answer,) = answers
        assert answer.ticket == task.ticket and answer.reply.error_code == "protocol_violation"
        assert kind in answer.reply.error_message


@pytest.mark.parametrize("offsets", [(1,), (0, 1), (0, 0), (0, 3)], ids=["gap first", "overlap", "repeat", "gap"])
@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "collected"])
def test_a_chunk_out_of_order_ends_the_vm_and_answers_protocol_violation_once(world, offsets, stream):
    world.start()
    task, exec_ = world.run(stream=stream)
    chunks = [out(exec_.exec_id, offset, b"ab") for offset in offsets]
    ends_as_violation(world, "output_out_of_order", task, *chunks, exit_message(exec_.exec_id))
    forwarded = [m for m in world.seen("intake") if isinstance(m, OutputChunk)]
    assert len(forwarded) == (len(offsets) - 1 if stream else 0)  # those before the bad one


def test_output_for_another_exec_is_a_violation(world):
    world.start()
    task, exec_ = world.run(stream=True)
    ends_as_violation(world, "wrong_exec", task, out(exec_.exec_id + 1, 0, b"x"))


def test_an_exit_for_another_exec_is_a_violation(world):
    world.start()
    task, exec_ = world.run()
    ends_as_violation(world, "wrong_exec", task, exit_message(exec_.exec_id + 1))


def test_output_after_the_exit_while_files_are_collected_is_answered_protocol_violation(world):
    world.start()
    task, exec_ = world.run(stream=True, collect=(b"/tmp/f",))
    world.say(out(exec_.exec_id, 0, b"ab"), exit_message(exec_.exec_id))
    assert isinstance(world.guest.receive(), guest.Collect)
    ends_as_violation(world, "output_after_exit", task, out(exec_.exec_id, 2, b"cd"))


def test_output_after_the_exit_of_an_answered_task_ends_the_vm_without_a_second_answer(world):
    world.start()
    task, exec_ = world.run(stream=True)
    world.say(out(exec_.exec_id, 0, b"ab"), exit_message(exec_.exec_id))
    assert isinstance(world.guest.receive(), guest.Reset)
    ends_as_violation(world, "output_after_exit", None, out(exec_.exec_id, 2, b"cd"))
    (answer,) = world.answers()
    assert answer.ticket == task.ticket and answer.reply.error_code == ""


def test_a_second_exit_during_the_reset_is_a_violation(world):
    world.start()
    task, exec_ = world.run()
    world.say(exit_message(exec_.exec_id))
    assert isinstance(world.guest.receive(), guest.Reset)
    ends_as_violation(world, "unexpected_message", None, exit_message(exec_.exec_id))


# --- stdin -------------------------------------------------------------------------------

def test_stdin_goes_to_the_guest_while_the_command_runs_then_eof_then_nothing(world):
    world.start()
    task, exec_ = world.run(stdin_open=True, stdin=b"first ")
    assert exec_.stdin == b"first " and exec_.stdin_open
    world.tell(StdinChunk(task.ticket, b"second", False))
    world.tell(StdinChunk(task.ticket + 1, b"not ours", False))
    world.tell(StdinChunk(task.ticket, b"", True))
    assert world.guest.receive() == guest.Stdin(exec_id=exec_.exec_id, data=b"second", eof=False)
    assert world.guest.receive() == guest.Stdin(exec_id=exec_.exec_id, data=b"", eof=True)
    world.tell(StdinChunk(task.ticket, b"after eof", False))
    assert world.guest.nothing_more()
    world.say(exit_message(exec_.exec_id))
    assert isinstance(world.guest.receive(), guest.Reset)
    world.tell(StdinChunk(task.ticket, b"after the exit", True))
    assert world.guest.nothing_more()


def test_stdin_for_a_task_without_stdin_open_is_dropped(world):
    world.start()
    task, exec_ = world.run(stream=True)
    world.tell(StdinChunk(task.ticket, b"x", True))
    assert world.guest.nothing_more()


def test_a_large_stdin_chunk_goes_as_several_and_stdin_stops_at_its_bound(world):
    world.start()
    task, exec_ = world.run(stdin_open=True, stdin=b"s" * (MAX_STDIN - MAX_STDIN_CHUNK - 10))
    world.tell(StdinChunk(task.ticket, b"a" * (MAX_STDIN_CHUNK + 1), False))
    assert world.guest.receive(10) == guest.Stdin(exec_id=exec_.exec_id, data=b"a" * MAX_STDIN_CHUNK, eof=False)
    assert world.guest.receive() == guest.Stdin(exec_id=exec_.exec_id, data=b"a", eof=False)
    world.tell(StdinChunk(task.ticket, b"b" * 20, False))  # 9 bytes fit: they go, and stdin closes
    assert world.guest.receive() == guest.Stdin(exec_id=exec_.exec_id, data=b"b" * 9, eof=True)
    world.tell(StdinChunk(task.ticket, b"c", False))
    assert world.guest.nothing_more()


def test_stdin_that_comes_while_the_vm_is_frozen_goes_at_the_thaw(world):
    world.start()
    task, exec_ = world.run(stdin_open=True)
    world.tell(Freeze())
    world.tell(StdinChunk(task.ticket, b"held", True))
    assert world.guest.nothing_more()
    world.tell(Thaw())
    assert world.guest.receive() == guest.Stdin(exec_id=exec_.exec_id, data=b"held", eof=True)


# --- the reader's hold -----------------------------------------------------------------------

def reader_holds(world) -> list[bool]:
    return [m.held for m in world.seen("ioguard") if isinstance(m, ChannelHold) and m.reason == "reader"]


def test_a_reader_hold_holds_the_channel_until_released_or_the_exit(world):
    world.start()
    task, exec_ = world.run(stream=True)
    world.tell(ReaderHold(task.ticket, True))
    world.tell(ReaderHold(task.ticket, True))  # told once to IOGuard
    world.tell(ReaderHold(task.ticket + 1, False))  # another ticket's: ignored
    world.tell(ReaderHold(task.ticket, False))
    world.tell(ReaderHold(task.ticket, True))
    wait_until(lambda: len(reader_holds(world)) == 3, 5, "three holds")
    world.say(exit_message(exec_.exec_id))
    wait_until(lambda: len(reader_holds(world)) == 4, 5, "the hold released at the exit")
    world.tell(ReaderHold(task.ticket, True))  # the command is over: nothing to hold
    assert isinstance(world.guest.receive(), guest.Reset)
    time.sleep(0.2)
    assert reader_holds(world) == [True, False, True, False]


def test_a_task_whose_reader_never_reads_past_its_timeout_meets_the_deadman_switch_which_says_so(world):
    world.start(deadman_grace_s=0.3)
    task, exec_ = world.run(stream=True, timeout_ms=200)
    world.tell(ReaderHold(task.ticket, True))
    world.gone("deadman")
    (answer,) = world.answers()
    assert answer.reply.error_code == "timeout" and "not reading" in answer.reply.error_message
    assert reader_holds(world) == [True, False]
