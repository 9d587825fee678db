"""A Supervisor's session phase (issue 15), without a VM: a real Supervisor
on a unix socket whose far end the test plays as the guest agent, as in
test_supervisor_streams.py, with recording actors as Intake, IOGuard, the
pool, the Scheduler and Sessions. A claim's `true` that exits 0 makes the VM
the session's; execs then run at once, several together, each answered once
and followed by one SessionExecDone; the session ends by EndSession or by
its VM's failure, with every running exec answered session_lost. What the
real agent does is tests/vm/test_session_vm.py's."""

from __future__ import annotations

import time

import pytest

from actors.messages import (Answer, ChannelFailed, ChannelHold, EndSession, Freeze, PoolVmState, ReaderHold,
                             RunTask, SessionClaim, SessionEnded, SessionExecDone, SessionStarted, StdinChunk, Task,
                             Thaw, VmState)
from actors.egress.proxy import PROXY_URL
from actors.supervisor import Supervisor, VmSettings
from actors.artifacts.files import FileSettings
from actors.vm.tiers import Tier
from protocol.channel import messages as guest
from protocol.channel.capabilities import soft_bits
from protocol.channel.constants import STDERR, STDOUT
from protocol.wire.tasks import TaskRequest
from tests.support.probe import Recorder
from tests.support.service import counter
from tests.support.waiting import wait_until
from tests.unit.test_supervisor_streams import VM, GuestEnd, World, exit_message, out

SESSION = "s-0123456789abcdef"
CAPS = (b"sys:ptrace",)


class Egress:
    """Stands in for the egress proxy: records what the Supervisor asks of it."""

    def __init__(self) -> None:
        self.calls: list = []

    def attach(self, vm_id, socket_path, on_violation) -> None:
        self.calls.append("attach")

    def begin_task(self, vm_id, task) -> None:
        self.calls.append(("begin", task.task_id))

    def end_task(self, vm_id) -> None:
        self.calls.append("end")

    def detach(self, vm_id) -> None:
        self.calls.append("detach")


class SessionWorld(World):
    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path)
        self.recorders["sessions"] = Recorder.start()
        self.directory["sessions"] = self.recorders["sessions"]
        self.egress: Egress | None = None

    def start(self, deadman_grace_s: float = 5.0, collect_timeout_s: float = 10, egress: bool = False) -> None:
        settings = VmSettings(boot_timeout_s=10, acquire_timeout_s=10, reset_timeout_s=10,
                              deadman_grace_s=deadman_grace_s, max_uses=10, max_age_s=300, strict=False,
                              files=FileSettings(max_put_bytes=1 << 20, max_collect_bytes=1 << 20,
                                                 collect_timeout_s=collect_timeout_s, signer=None))
        extra = {}
        if egress:
            self.egress = Egress()
            extra = {"tier": Tier(network=True), "egress": self.egress}
        self.supervisor = Supervisor.start(VM, directory=self.directory, hypervisor=self.hypervisor,
                                           refill=self.refill, timers=self.timers, metrics=self.metrics,
                                           settings=settings, **extra)
        self.guest = GuestEnd(self.server)
        self.say(guest.Hello(agent_version="t", boot_id="b", kernel="k"))
        wait_until(lambda: VmState(VM, PoolVmState.READY) in self.seen("pool"), 5, "the VM ready")

    def claim(self, exit_code: int = 0, **fields) -> Task:
        """Give the VM a session's claiming task (`true`) and play its run."""
        request = TaskRequest(**{"task_id": "open-1", "priority": 2, "argv": (b"true",), "env": (), "cwd": b"",
                                 "stdin": b"", "timeout_ms": 10_000, "output_cap": 4096, "capabilities": CAPS,
                                 **fields})
        task = Task(next(self.tickets), request, time.monotonic(), claim=SessionClaim(SESSION, "alice"))
        self.tell(RunTask(task, time.monotonic()))
        heartbeat = self.guest.receive()
        assert isinstance(heartbeat, guest.Heartbeat)
        self.say(guest.HeartbeatAck(nonce=heartbeat.nonce))
        exec_ = self.guest.receive()
        assert isinstance(exec_, guest.Exec) and exec_.argv == (b"true",)
        self.say(exit_message(exec_.exec_id, exit_code=exit_code))
        return task

    def open(self, **fields) -> Task:
        task = self.claim(**fields)
        wait_until(lambda: self.sessions_told(SessionStarted), 5, "SessionStarted")
        return task

    def exec(self, session_id: str = SESSION, **fields) -> tuple[Task, guest.Exec]:
        """An exec as Sessions hands it over; the Exec the guest gets for it."""
        task = self.send_exec(session_id, **fields)
        while isinstance(message := self.guest.receive(), guest.PutFile):
            pass
        assert isinstance(message, guest.Exec), message
        return task, message

    def send_exec(self, session_id: str = SESSION, **fields) -> Task:
        ticket = next(self.tickets)
        request = TaskRequest(**{"task_id": f"x{ticket}", "priority": 2, "argv": (b"cmd",), "env": (), "cwd": b"",
                                 "stdin": b"", "timeout_ms": 30_000, "output_cap": 1 << 20, "capabilities": (),
                                 "session_id": session_id, **fields})
        task = Task(ticket, request, time.monotonic())
        self.tell(RunTask(task, time.monotonic()))
        return task

    def sessions_told(self, kind=None) -> list:
        return [m for m in self.seen("sessions") if kind is None or isinstance(m, kind)]

    def answer_of(self, task: Task, timeout_s: float = 5) -> Answer:
        answer = wait_until(lambda: next((m for m in self.answers() if m.ticket == task.ticket), None),
                            timeout_s, f"the answer of ticket {task.ticket}")
        return answer

    def execs_done(self) -> int:
        return len(self.sessions_told(SessionExecDone))


@pytest.fixture
def world(tmp_path):
    w = SessionWorld(tmp_path)
    yield w
    w.close()


# --- the claim ------------------------------------------------------------------------------

def test_a_claim_that_exits_0_makes_the_vm_the_sessions_and_leaves_its_ticket_to_sessions(world):
    world.start()
    world.open()
    (started,) = world.sessions_told()
    assert started == SessionStarted(SESSION, VM, world.supervisor)
    wait_until(lambda: VmState(VM, PoolVmState.SESSION) in world.seen("pool"), 5, "the pool told")
    assert world.guest.nothing_more()  # no Reset: the VM keeps its state
    assert world.answers() == [] and world.hypervisor.destroyed == []
    assert world.hypervisor.calls.count("pause") == 1  # paused once, when ready; it runs on


def test_a_claim_whose_true_fails_is_answered_guest_error_and_the_vm_ends(world):
    world.start()
    task = world.claim(exit_code=1)
    world.gone("claim_failed")
    (answer,) = world.answers()
    assert answer.ticket == task.ticket and answer.reply.error_code == "guest_error"
    assert "exit 1" in answer.reply.error_message
    assert world.sessions_told() == []


# --- execs ------------------------------------------------------------------------------------

def test_an_exec_starts_at_once_without_heartbeat_or_resume_with_the_sessions_capabilities(world):
    world.start()
    world.open()
    resumes = world.hypervisor.calls.count("resume")
    task, exec_ = world.exec(capabilities=(), files_in=((b"/tmp/in", 0o644, b"data"),))
    assert exec_.capabilities & soft_bits(CAPS) == soft_bits(CAPS)
    world.say(out(exec_.exec_id, 0, b"hi"), exit_message(exec_.exec_id, exit_code=4))
    reply = world.answer_of(task).reply
    assert (reply.error_code, reply.exit_code, reply.stdout) == ("", 4, b"hi")
    wait_until(lambda: world.execs_done() == 1, 5, "SessionExecDone")
    assert world.sessions_told(SessionExecDone) == [SessionExecDone(SESSION)]
    assert world.hypervisor.calls.count("resume") == resumes
    assert world.guest.nothing_more()  # no Reset after it


def test_two_execs_at_once_are_each_answered_once_with_their_own_output(world):
    world.start()
    world.open()
    first, exec1 = world.exec()
    second, exec2 = world.exec(stream=True)
    assert exec1.exec_id != exec2.exec_id
    world.say(out(exec1.exec_id, 0, b"one"), out(exec2.exec_id, 0, b"two"), out(exec1.exec_id, 3, b"!"),
              out(exec2.exec_id, 0, b"err", STDERR), exit_message(exec2.exec_id, exit_code=2))
    reply2 = world.answer_of(second).reply
    assert (reply2.exit_code, reply2.stdout) == (2, b"")  # streamed: the chunks went to Intake
    world.say(exit_message(exec1.exec_id))
    reply1 = world.answer_of(first).reply
    assert (reply1.exit_code, reply1.stdout) == (0, b"one!")
    wait_until(lambda: world.execs_done() == 2, 5, "two SessionExecDone")
    time.sleep(0.2)
    assert len(world.answers()) == 2 and world.execs_done() == 2
    chunks = [(m.stream, m.data) for m in world.seen("intake") if getattr(m, "ticket", None) == second.ticket
              and not isinstance(m, Answer) and hasattr(m, "data")]
    assert chunks == [(STDOUT, b"two"), (STDERR, b"err")]


def test_an_exec_past_its_timeout_is_answered_timeout_and_the_session_lives_on(world):
    world.start()
    world.open()
    task, exec_ = world.exec(timeout_ms=100)
    world.say(exit_message(exec_.exec_id, timed_out=True, exit_code=-1, signal=9))
    assert world.answer_of(task).reply.error_code == "timeout"
    after, exec2 = world.exec()
    world.say(exit_message(exec2.exec_id))
    assert world.answer_of(after).reply.error_code == ""
    assert world.hypervisor.destroyed == [] and world.sessions_told(SessionEnded) == []


def test_an_exec_refused_in_the_guest_is_answered_so_and_the_other_runs_on(world):
    world.start()
    world.open()
    first, exec1 = world.exec()
    second, exec2 = world.exec(files_in=((b"/etc/passwd", 0o644, b"x"),))
    world.say(guest.Error(code="put_failed", message="/etc/passwd: exists", exec_id=exec2.exec_id))
    assert world.answer_of(second).reply.error_code == "put_failed"
    world.say(exit_message(exec1.exec_id))
    assert world.answer_of(first).reply.error_code == ""
    wait_until(lambda: world.execs_done() == 2, 5, "two SessionExecDone")


def test_stdin_and_reader_holds_go_to_the_exec_of_their_ticket(world):
    world.start()
    world.open()
    first, exec1 = world.exec(stdin_open=True)
    second, exec2 = world.exec(stdin_open=True, stream=True)
    world.tell(StdinChunk(second.ticket, b"to two", True))
    world.tell(StdinChunk(first.ticket, b"to one", False))
    assert world.guest.receive() == guest.Stdin(exec_id=exec2.exec_id, data=b"to two", eof=True)
    assert world.guest.receive() == guest.Stdin(exec_id=exec1.exec_id, data=b"to one", eof=False)
    world.tell(ReaderHold(second.ticket, True))
    world.tell(ReaderHold(first.ticket, True))  # held already: told once
    world.tell(ReaderHold(second.ticket, False))  # the first's caller still holds it
    world.say(exit_message(exec1.exec_id))  # its hold ends with its command
    world.answer_of(first)
    holds = lambda: [m.held for m in world.seen("ioguard") if isinstance(m, ChannelHold) and m.reason == "reader"]
    wait_until(lambda: holds() == [True, False], 5, "the channel held, then released")


def test_files_are_collected_after_an_execs_exit_while_another_runs(world):
    world.start()
    world.open()
    first, exec1 = world.exec()
    second, exec2 = world.exec(collect=(b"/home/task/out",))
    world.say(exit_message(exec2.exec_id))
    collect = world.guest.receive()
    assert isinstance(collect, guest.Collect)
    world.say(out(exec1.exec_id, 0, b"still running"),
              guest.Collected(collect_id=collect.collect_id, index=0, data=b"result", last=True, error=""))
    ((path, error, data, _),) = world.answer_of(second).reply.files_out
    assert (path, error, data) == (b"/home/task/out", "", b"result")
    world.say(exit_message(exec1.exec_id))
    assert world.answer_of(first).reply.stdout == b"still running"


# --- how a session ends -------------------------------------------------------------------------

def lost(world, tasks, reason: str, pool_reason: str | None = None, answered_before: int = 0,
         done_before: int = 0) -> None:
    """Every task answered session_lost once, the VM destroyed, the pool told
    gone and Sessions told SessionEnded(reason), no SessionExecDone for them
    (`answered_before`, `done_before`: answers and SessionExecDone before the end)."""
    world.gone(pool_reason or reason)
    wait_until(lambda: world.sessions_told(SessionEnded), 5, "SessionEnded")
    for task in tasks:
        reply = world.answer_of(task).reply
        assert reply.error_code == "session_lost" and SESSION in reply.error_message
        assert reply.outcome == "vm_crashed"
    time.sleep(0.2)
    assert len(world.answers()) == answered_before + len(tasks)
    assert world.sessions_told(SessionEnded) == [SessionEnded(SESSION, reason)]
    assert world.execs_done() == done_before


def test_end_session_answers_running_execs_session_lost_and_destroys_the_vm(world):
    world.start()
    world.open()
    running = [world.exec()[0], world.exec()[0]]
    world.tell(EndSession("closed"))
    lost(world, running, "closed", "session_closed")


def test_an_exec_past_its_timeout_and_grace_ends_the_session_as_deadman(world):
    world.start(deadman_grace_s=0.3)
    world.open()
    long_one = world.exec(timeout_ms=60_000)[0]
    hung = world.exec(timeout_ms=200)[0]
    kills = counter(world.metrics.deadman_kills)
    lost(world, [long_one, hung], "deadman")
    assert counter(world.metrics.deadman_kills) == kills + 1


def test_a_lost_channel_ends_the_session_as_vm_lost(world):
    world.start()
    world.open()
    task = world.exec()[0]
    world.tell(ChannelFailed(VM, "vm_lost", "EOF", violation=False))
    lost(world, [task], "vm_lost")


def test_a_guest_error_about_no_exec_ends_the_session(world):
    world.start()
    world.open()
    task = world.exec()[0]
    world.say(guest.Error(code="unexpected", message="Reset"))
    lost(world, [task], "guest_error")


def test_a_scram_stops_an_execs_deadman_clock_and_an_exec_that_comes_while_frozen_is_refused(world):
    world.start(deadman_grace_s=0.3)
    world.open()
    task, exec_ = world.exec(timeout_ms=300)
    world.tell(Freeze())
    late = world.send_exec()
    assert world.answer_of(late).reply.error_code == "cancelled_scram"
    wait_until(lambda: world.execs_done() == 1, 5, "SessionExecDone of the refused exec")
    time.sleep(1.0)  # past its deadline, but frozen
    assert world.hypervisor.destroyed == [] and not world.sessions_told(SessionEnded)
    world.tell(Thaw())
    world.say(exit_message(exec_.exec_id, timed_out=True, exit_code=-1, signal=9))
    assert world.answer_of(task).reply.error_code == "timeout"
    time.sleep(0.8)  # and its re-armed switch was stopped by its answer
    assert world.hypervisor.destroyed == []


# --- a hostile guest's exec ids -------------------------------------------------------------------

@pytest.mark.parametrize("said, kind", [
    (lambda done, running: out(running + 1, 0, b"x"), "wrong_exec"),  # an exec never started
    (lambda done, running: out(done, 0, b"x"), "output_after_exit"),  # the exec that ended last
    (lambda done, running: exit_message(done), "wrong_exec"),  # its Exit twice
    (lambda done, running: guest.Error(code="put_failed", message="x", exec_id=done), "wrong_exec"),
    (lambda done, running: guest.HeartbeatAck(nonce=1), "unexpected_message"),
], ids=["output of no exec", "output after exit", "exit twice", "error of an ended exec", "heartbeat ack"])
def test_a_message_about_an_exec_that_does_not_run_is_a_violation_that_ends_the_session(world, said, kind):
    world.start()
    world.open()
    done, exec1 = world.exec()
    world.say(exit_message(exec1.exec_id))
    world.answer_of(done)
    running, exec2 = world.exec()
    before = counter(world.metrics.violations, kind=kind)
    world.say(said(exec1.exec_id, exec2.exec_id))
    lost(world, [running], "protocol_violation", answered_before=1, done_before=1)
    assert counter(world.metrics.violations, kind=kind) == before + 1


def test_files_for_a_collect_not_in_progress_are_a_violation(world):
    world.start()
    world.open()
    task = world.exec()[0]
    world.say(guest.Collected(collect_id=999, index=0, data=b"x", last=True, error=""))
    lost(world, [task], "protocol_violation")


# --- execs that cannot run here ---------------------------------------------------------------------

def test_an_exec_for_a_vm_that_is_no_session_is_answered_not_requeued(world):
    world.start()
    task = world.send_exec()
    reply = world.answer_of(task).reply
    assert reply.error_code == "session_lost"
    assert world.sessions_told(SessionExecDone) == [SessionExecDone(SESSION)]
    assert world.seen("scheduler") == []


def test_an_exec_that_comes_as_the_session_ends_is_answered_session_lost_not_requeued(world):
    world.start()
    world.open()
    world.tell(EndSession("idle"))
    task = world.send_exec()  # in the inbox behind the EndSession
    world.gone("session_idle")
    assert world.answer_of(task).reply.error_code == "session_lost"
    assert world.seen("scheduler") == [] and world.execs_done() == 0
    assert world.sessions_told(SessionEnded) == [SessionEnded(SESSION, "idle")]


# --- egress -----------------------------------------------------------------------------------

def test_a_net_egress_session_keeps_the_claims_rules_for_its_life(world):
    world.start(egress=True)
    world.open(capabilities=(b"net:egress",), egress_allow=(b"example.org",))
    task, exec_ = world.exec()
    assert (b"https_proxy", PROXY_URL) in exec_.env
    world.say(exit_message(exec_.exec_id))
    world.answer_of(task)
    assert world.egress.calls == ["attach", ("begin", "open-1")]  # not ended by the claim, nor an exec
    world.tell(EndSession("closed"))
    world.gone("session_closed")
    assert world.egress.calls == ["attach", ("begin", "open-1"), "detach"]
