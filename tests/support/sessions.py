"""Sessions' VM side driven without the Sessions actor or the caller's edge:
one recording actor stands in as "sessions" and "intake" in a running
service's Directory, a session's claim goes to the real Scheduler, and the
test plays Sessions' part on the Supervisor ref its SessionStarted carries
(RunTask for each exec, EndSession). What the Supervisor tells Sessions and
Intake (SessionStarted, SessionExecDone, SessionEnded, TaskStarted, chunks,
answers) is on the Board."""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
import time

import pykka

from actors.messages import (Answer, EndSession, RunTask, SessionClaim, SessionEnded, SessionExecDone,
                             SessionStarted, Submit, Task)
from protocol.wire.tasks import TaskReply, TaskRequest
from tests.support.waiting import wait_until

TICKETS = itertools.count(2 * 10**9)  # far from the real Intake's


class Board:
    """Every message the stand-in was told, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list = []

    def all(self, kind=None) -> list:
        with self.lock:
            return [m for m in self.items if kind is None or isinstance(m, kind)]


class StandIn(pykka.ThreadingActor):
    def __init__(self, board: Board) -> None:
        super().__init__()
        self.board = board

    def on_receive(self, message) -> None:
        with self.board.lock:
            self.board.items.append(message)


@contextlib.contextmanager
def standing_in(service, names=("sessions", "intake")):
    """A Board whose recorder is the service's `names` for the block (the real ones back after)."""
    board = Board()
    recorder = StandIn.start(board)
    real = {name: service.directory.get(name) for name in names}
    for name in names:
        service.directory[name] = recorder
    try:
        yield board
    finally:
        for name, ref in real.items():
            service.directory[name] = ref
        recorder.stop()


class Session:
    """One session opened through the real Scheduler, its execs told to its Supervisor."""

    def __init__(self, service, board: Board, capabilities: tuple = (), timeout_s: float = 120) -> None:
        self.board = board
        self.session_id = "s-" + secrets.token_hex(8)
        self.open_ticket = next(TICKETS)
        request = TaskRequest(task_id=f"open-{self.open_ticket}", priority=2, argv=(b"true",), env=(), cwd=b"",
                              stdin=b"", timeout_ms=10_000, output_cap=4096, capabilities=capabilities)
        task = Task(self.open_ticket, request, time.monotonic(), claim=SessionClaim(self.session_id, "tester"))
        assert service.directory.tell("scheduler", Submit(task))
        started = wait_until(lambda: next((m for m in board.all(SessionStarted)
                                           if m.session_id == self.session_id), None), timeout_s, "SessionStarted")
        self.vm_id = started.vm_id
        self.supervisor = started.supervisor

    def exec(self, argv: list[bytes], **fields) -> int:
        """Hand an exec to the session's Supervisor as Sessions does; its ticket."""
        ticket = next(TICKETS)
        request = TaskRequest(**{"task_id": f"x{ticket}", "priority": 2, "argv": tuple(argv), "env": (),
                                 "cwd": b"", "stdin": b"", "timeout_ms": 60_000, "output_cap": 1 << 20,
                                 "capabilities": (), "session_id": self.session_id, **fields})
        self.supervisor.tell(RunTask(Task(ticket, request, time.monotonic()), time.monotonic()))
        return ticket

    def answer(self, ticket: int, timeout_s: float = 60) -> TaskReply:
        """The ticket's one answer (a second one fails the test)."""
        answer = wait_until(lambda: next((m for m in self.board.all(Answer) if m.ticket == ticket), None),
                            timeout_s, f"the answer of ticket {ticket}")
        assert [m.ticket for m in self.board.all(Answer)].count(ticket) == 1
        return answer.reply

    def run(self, argv: list[bytes], timeout_s: float = 60, **fields) -> TaskReply:
        return self.answer(self.exec(argv, **fields), timeout_s)

    def execs_done(self) -> int:
        return sum(1 for m in self.board.all(SessionExecDone) if m.session_id == self.session_id)

    def ended(self, timeout_s: float = 60) -> SessionEnded:
        return wait_until(lambda: next((m for m in self.board.all(SessionEnded)
                                        if m.session_id == self.session_id), None), timeout_s, "SessionEnded")

    def end(self, reason: str = "closed") -> None:
        if self.supervisor.is_alive():
            self.supervisor.tell(EndSession(reason))
