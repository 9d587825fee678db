"""The Sessions actor alone, with recording actors as the Intake, the
Scheduler, the Root and the sessions' Supervisors: opening through a claiming
task, execs to the session's Supervisor and only its owner's, the limits,
ends by close, idle time, lifetime, operator and drain, SCRAM, and a crash
that hands the table to its successor."""

import threading
import time

import pykka
import pytest

from actors.directory import Directory
from actors.edge.metrics import Metrics
from actors.messages import (Answer, ChildFailed, CloseSession, CloseSessionAsOperator, Drain, EndSession,
                             InjectFault, ListSessions, OpenSession, ResumeService, RunTask, Scram, SessionClaim,
                             SessionEnded, SessionExec, SessionExecDone, SessionOpenFailed, SessionStarted, Submit,
                             Task)
from actors.root import Root
from actors.session_table import SessionLimits, SessionsView
from actors.sessions import Sessions
from actors.timers import Timers
from protocol.wire.tasks import SessionClose, SessionList, SessionOpen, SessionReply, TaskReply, TaskRequest
from tests.support.probe import Recorder, wait_for
from tests.support.waiting import wait_until

LIMITS = SessionLimits(max_per_identity=2, max_total=3, default_idle_s=300, max_idle_s=3600,
                       default_life_s=3600, max_life_s=86400, open_timeout_s=600)
TICK_S = 0.05


class World:
    """A Sessions actor and the recorders around it."""

    record = None  # the SessionRecord its Sessions actor keeps (a subclass's), or none

    def __init__(self, limits=LIMITS):
        self.directory = Directory()
        self.timers = Timers()
        self.metrics = Metrics()
        self.view = SessionsView()
        self.intake, self.scheduler, self.root = Recorder.start(), Recorder.start(), Recorder.start()
        self.pool = Recorder.start()
        self.directory["pool"] = self.pool
        self.directory["intake"] = self.intake
        self.directory["scheduler"] = self.scheduler
        self.directory["root"] = self.root
        self.limits = limits
        self.sessions = self.start()
        self.tickets = iter(range(1, 10_000))
        self.vms = iter(range(1, 10_000))

    def start(self, state=None, safe_mode=False):
        ref = Sessions.start(directory=self.directory, metrics=self.metrics, timers=self.timers,
                             limits=self.limits, view=self.view, state=state, safe_mode=safe_mode,
                             record=self.record, tick_s=TICK_S)
        self.directory["sessions"] = ref
        return ref

    def settled(self) -> None:
        """Every message told to the Sessions actor so far is handled, its view
        published and what it told its neighbours in their inboxes: this call
        queues behind them. What did not happen by now will not."""
        self.sessions.proxy().state.get(timeout=5)

    def answers(self, count=0, timeout_s=5):
        """The answers the Intake was told, {ticket: reply}, once there are `count`."""
        return {a.ticket: a.reply for a in wait_for(self.intake, count, timeout_s) if isinstance(a, Answer)}

    def answer(self, ticket, timeout_s=5):
        wait_until(lambda: ticket in self.answers(), timeout_s, f"the answer for ticket {ticket}")
        return self.answers()[ticket]

    def submits(self, count):
        return [m for m in wait_for(self.scheduler, count) if isinstance(m, Submit)]

    def open(self, owner="alice", **fields) -> int:
        """Tell an OpenSession; its ticket."""
        ticket = next(self.tickets)
        request = SessionOpen(**{**dict(request_id=f"open-{ticket}", capabilities=(), idle_s=0, max_life_s=0,
                                        labels=()), **fields})
        self.sessions.tell(OpenSession(ticket, request, owner))
        return ticket

    def opened(self, owner="alice", **fields):
        """An OPEN session: (its id, its Supervisor), the open answered."""
        ticket = self.open(owner, **fields)
        submit = wait_until(lambda: next((m for m in self.scheduler.proxy().seen.get()
                                          if isinstance(m, Submit) and m.task.ticket == ticket), None),
                            5, "the claiming task")
        supervisor = Recorder.start()
        session_id = submit.task.claim.session_id
        self.sessions.tell(SessionStarted(session_id, f"corral-test-{next(self.vms)}", supervisor))
        reply = self.answer(ticket)
        assert isinstance(reply, SessionReply) and reply.error_code == "" and reply.session_id == session_id
        return session_id, supervisor

    def exec(self, session_id, owner="alice") -> int:
        ticket = next(self.tickets)
        request = TaskRequest(task_id=f"exec-{ticket}", priority=2, argv=(b"echo", b"hi"), env=(), cwd=b"",
                              stdin=b"", timeout_ms=5000, output_cap=1000, capabilities=(), session_id=session_id)
        self.sessions.tell(SessionExec(Task(ticket, request, time.monotonic()), owner))
        return ticket

    def close(self, session_id, owner="alice") -> int:
        ticket = next(self.tickets)
        self.sessions.tell(CloseSession(ticket, SessionClose(request_id=f"close-{ticket}", session_id=session_id),
                                        owner))
        return ticket

    def listing(self, owner="alice"):
        ticket = next(self.tickets)
        self.sessions.tell(ListSessions(ticket, SessionList(request_id=f"list-{ticket}"), owner))
        return self.answer(ticket)

    def stop(self):
        pykka.ActorRegistry.stop_all()
        self.timers.stop()


@pytest.fixture
def world():
    w = World()
    yield w
    w.stop()


def told(supervisor, kind=None):
    return [m for m in supervisor.proxy().seen.get() if kind is None or isinstance(m, kind)]


def wait_told(supervisor, kind, count=1, timeout_s=5):
    return wait_until(lambda: len(told(supervisor, kind)) >= count and told(supervisor, kind), timeout_s,
                      f"{count} {kind.__name__} told to the Supervisor")


# --- open -------------------------------------------------------------------------------

def test_an_open_claims_a_vm_through_the_scheduler_and_is_answered_once_the_vm_is_the_sessions(world):
    ticket = world.open(capabilities=(b"net:egress", b"dev:python"), egress_allow=(b"pypi.org",))
    (submit,) = world.submits(1)
    task = submit.task
    assert task.ticket == ticket and task.request.task_id == f"open-{ticket}"
    assert task.request.argv == (b"true",) and task.request.capabilities == (b"net:egress", b"dev:python")
    assert task.request.egress_allow == (b"pypi.org",) and task.request.timeout_ms == LIMITS.claim_timeout_ms
    assert task.request.output_cap > 0 and task.request.session_id == ""
    assert task.claim == SessionClaim(task.claim.session_id, "alice")
    world.settled()
    assert world.answers() == {}  # not answered before the session has its VM
    assert [s.state for s in world.view.sessions] == ["opening"]
    supervisor = Recorder.start()
    world.sessions.tell(SessionStarted(task.claim.session_id, "corral-test-1", supervisor))
    reply = world.answer(ticket)
    assert reply == SessionReply(request_id=f"open-{ticket}", error_code="", error_message="",
                                 session_id=task.claim.session_id, sessions=(), retry_after_ms=0)
    world.settled()
    assert [(s.state, s.vm_id) for s in world.view.sessions] == [("open", "corral-test-1")]
    assert world.metrics.sessions_open._value.get() == 1


def test_an_open_beyond_the_limits_is_refused_session_limit_and_claims_nothing(world):
    for _ in range(2):
        world.open("alice")
    mine = world.open("alice")
    assert world.answer(mine).error_code == "session_limit"
    assert "sessions.max_per_identity = 2" in world.answer(mine).error_message
    world.open("bob")
    total = world.open("carol")
    assert world.answer(total).error_code == "session_limit"
    assert "sessions.max_total = 3" in world.answer(total).error_message
    world.settled()
    assert len(world.submits(3)) == 3


def test_an_open_asking_past_the_maxima_is_invalid_and_claims_nothing(world):
    ticket = world.open(idle_s=LIMITS.max_idle_s + 1)
    reply = world.answer(ticket)
    assert isinstance(reply, SessionReply) and reply.error_code == "invalid_request"
    assert "idle time" in reply.error_message
    world.settled()
    assert world.scheduler.proxy().seen.get() == []


def test_an_open_that_failed_elsewhere_is_forgotten_and_frees_its_place(world):
    first = world.open()
    world.open()
    world.submits(2)
    world.sessions.tell(SessionOpenFailed(first))  # e.g. the Scheduler answered it busy
    wait_until(lambda: len(world.view.sessions) == 1, 5, "the failed open forgotten")
    third = world.open()
    world.settled()
    assert len(world.submits(3)) == 3 and third not in world.answers()


def test_an_open_whose_vm_never_comes_is_answered_unavailable_after_the_open_timeout():
    world = World(SessionLimits(**{**LIMITS.__dict__, "open_timeout_s": 0.3}))
    try:
        ticket = world.open()
        reply = world.answer(ticket)
        assert reply.error_code == "unavailable" and reply.retry_after_ms > 0
        world.settled()
        assert world.view.sessions == ()
        # Its VM comes after all: nobody's, so it is ended at once.
        late = world.submits(1)[0].task.claim.session_id
        supervisor = Recorder.start()
        world.sessions.tell(SessionStarted(late, "corral-test-9", supervisor))
        assert wait_told(supervisor, EndSession) == [EndSession("unknown")]
    finally:
        world.stop()


# --- exec -------------------------------------------------------------------------------

def test_an_exec_goes_straight_to_the_sessions_supervisor(world):
    session_id, supervisor = world.opened()
    ticket = world.exec(session_id)
    (run,) = wait_told(supervisor, RunTask)
    assert run.task.ticket == ticket and run.task.request.argv == (b"echo", b"hi")
    world.settled()
    assert world.scheduler.proxy().seen.get()[1:] == []  # no Scheduler, no acquire
    assert world.metrics.session_execs._value.get() == 1
    assert ticket not in world.answers()  # the Supervisor answers it


def test_another_identitys_exec_and_an_unknown_id_get_the_same_answer(world):
    session_id, supervisor = world.opened("alice")
    theirs = world.answer(world.exec(session_id, owner="mallory"))
    unknown_id = "s-" + "0" * 16 if session_id != "s-" + "0" * 16 else "s-" + "1" * 16
    unknown = world.answer(world.exec(unknown_id, owner="alice"))
    assert isinstance(theirs, TaskReply) and theirs.error_code == unknown.error_code == "session_not_found"
    assert theirs.error_message == f"no session {session_id}"
    assert unknown.error_message == f"no session {unknown_id}"
    world.settled()
    assert told(supervisor, RunTask) == []


def test_an_exec_in_a_session_whose_vm_went_silently_is_answered_session_lost(world):
    session_id, supervisor = world.opened()
    supervisor.stop()
    reply = world.answer(world.exec(session_id))
    assert reply.error_code == "session_lost"
    assert world.answer(world.exec(session_id)).error_code == "session_not_found"


# --- close ------------------------------------------------------------------------------

def test_a_close_is_answered_once_the_vm_is_gone_and_counted(world):
    session_id, supervisor = world.opened()
    ticket = world.close(session_id)
    assert wait_told(supervisor, EndSession) == [EndSession("closed")]
    world.settled()
    assert ticket not in world.answers()
    assert [s.state for s in world.view.sessions] == ["closing"]
    assert world.answer(world.exec(session_id)).error_code == "session_not_found"  # closing: no more execs
    again = world.close(session_id)  # a second close waits for the same end
    world.sessions.tell(SessionEnded(session_id, "closed"))
    for t in (ticket, again):
        reply = world.answer(t)
        assert reply.error_code == "" and reply.session_id == session_id
    world.settled()
    assert len(told(supervisor, EndSession)) == 1
    assert world.view.sessions == ()
    assert world.metrics.sessions_ended.labels("closed")._value.get() == 1
    assert world.metrics.session_lifetime_seconds._sum.get() > 0
    assert world.metrics.sessions_open._value.get() == 0


def test_another_identity_cannot_close_a_session(world):
    session_id, supervisor = world.opened("alice")
    reply = world.answer(world.close(session_id, owner="mallory"))
    assert reply.error_code == "session_not_found" and reply.error_message == f"no session {session_id}"
    world.settled()
    assert told(supervisor, EndSession) == []


def test_a_session_whose_vm_ends_by_itself_is_gone(world):
    session_id, supervisor = world.opened()
    world.sessions.tell(SessionEnded(session_id, "deadman"))
    wait_until(lambda: world.view.sessions == (), 5, "the session gone")
    assert world.metrics.sessions_ended.labels("deadman")._value.get() == 1
    assert world.answer(world.exec(session_id)).error_code == "session_not_found"
    assert world.answer(world.close(session_id)).error_code == "session_not_found"


def test_a_session_whose_supervisor_died_without_a_word_is_ended_as_vm_lost(world):
    session_id, supervisor = world.opened()
    ticket = world.close(session_id)
    wait_told(supervisor, EndSession)
    supervisor.stop()  # crashed before saying SessionEnded
    assert world.answer(ticket).error_code == ""  # its VM went with it: the close is done
    wait_until(lambda: world.view.sessions == (), 5, "the session gone")
    assert world.metrics.sessions_ended.labels("closed")._value.get() == 1


def test_an_operator_ends_any_session(world):
    session_id, supervisor = world.opened("bob")
    world.sessions.tell(CloseSessionAsOperator(session_id))
    assert wait_told(supervisor, EndSession) == [EndSession("operator")]
    world.sessions.tell(SessionEnded(session_id, "operator"))
    wait_until(lambda: world.metrics.sessions_ended.labels("operator")._value.get() == 1, 5, "counted")


# --- idle time and lifetime ----------------------------------------------------------------

def test_an_idle_session_is_ended_idle_time_after_its_last_exec_never_while_one_runs(world):
    session_id, supervisor = world.opened(idle_s=1)
    world.exec(session_id)
    wait_told(supervisor, RunTask)
    time.sleep(1.3)  # past the idle time, with an exec running
    assert told(supervisor, EndSession) == []
    world.sessions.tell(SessionExecDone(session_id))
    done = time.monotonic()
    assert wait_told(supervisor, EndSession, timeout_s=3) == [EndSession("idle")]
    assert time.monotonic() - done >= 0.9


def test_a_session_ends_at_its_lifetime_even_while_execs_run(world):
    session_id, supervisor = world.opened(max_life_s=1)
    world.exec(session_id)
    assert wait_told(supervisor, EndSession, timeout_s=3) == [EndSession("lifetime")]


# --- listing ----------------------------------------------------------------------------

def test_an_owner_lists_its_own_sessions_only(world):
    mine, _ = world.opened("alice", labels=((b"job", b"build"),))
    world.opened("bob")
    reply = world.listing("alice")
    assert reply.error_code == "" and [(r[0], r[1], r[5]) for r in reply.sessions] == [(mine, b"job=build", "open")]
    assert world.listing("carol").sessions == ()


# --- modes ------------------------------------------------------------------------------

def test_a_drain_ends_idle_sessions_now_and_busy_ones_once_their_execs_are_answered(world):
    idle_id, idle_vm = world.opened()
    busy_id, busy_vm = world.opened()
    world.exec(busy_id)
    wait_told(busy_vm, RunTask)
    world.sessions.tell(Drain())
    assert wait_told(idle_vm, EndSession) == [EndSession("draining")]
    assert world.answer(world.exec(busy_id)).error_code == "draining"  # no new execs; the running one goes on
    world.settled()
    assert told(busy_vm, EndSession) == []
    world.sessions.tell(SessionExecDone(busy_id))
    assert wait_told(busy_vm, EndSession) == [EndSession("draining")]
    refused = world.answer(world.open("carol"))
    assert refused.error_code == "draining"


def test_a_session_opening_when_a_drain_comes_is_ended_as_its_vm_comes(world):
    ticket = world.open()
    claim = world.submits(1)[0].task.claim
    world.sessions.tell(Drain())
    supervisor = Recorder.start()
    world.sessions.tell(SessionStarted(claim.session_id, "corral-test-1", supervisor))
    assert world.answer(ticket).error_code == "draining"
    assert wait_told(supervisor, EndSession) == [EndSession("draining")]


def test_scram_refuses_execs_that_still_arrive_and_stops_idle_clocks_until_resume(world):
    session_id, supervisor = world.opened(idle_s=1)
    world.sessions.tell(Scram("drill"))
    reply = world.answer(world.exec(session_id))
    assert reply.error_code == "cancelled_scram"
    time.sleep(1.5)  # past the idle time, frozen
    assert told(supervisor, EndSession) == []
    world.sessions.tell(ResumeService())
    time.sleep(0.3)
    assert told(supervisor, EndSession) == []  # the frozen time was not idle time
    ticket = world.exec(session_id)
    assert wait_told(supervisor, RunTask)[0].task.ticket == ticket


# --- crash ------------------------------------------------------------------------------

class HeldCounter:
    """A counter whose inc() waits for `release`: holds the actor that counts."""

    def __init__(self, release):
        self.release = release

    def inc(self):
        self.release.wait(5)


def test_a_crash_hands_the_table_and_the_inbox_to_the_successor(world):
    world.sessions.stop()
    root = Root.start(directory=world.directory, factories={"sessions": lambda salvage: world.start(state=salvage)},
                      metrics=world.metrics, max_restarts=5, window_s=60, give_up=lambda reason: None)
    root.proxy().started().get(timeout=5)  # the Root started its own Sessions actor
    first = world.sessions = world.directory.get("sessions")
    session_id, supervisor = world.opened()
    opening = world.open()
    # Hold the actor inside its first exec, so the crash and the second exec queue behind it.
    counted, release = world.metrics.session_execs, threading.Event()
    world.metrics.session_execs = HeldCounter(release)
    held_ticket = world.exec(session_id)
    wait_told(supervisor, RunTask)
    first.tell(InjectFault("crash"))
    queued_ticket = world.exec(session_id)
    release.set()
    wait_until(lambda: world.directory.get("sessions") is not first, 5, "a successor")
    runs = wait_told(supervisor, RunTask, count=2)
    assert [r.task.ticket for r in runs] == [held_ticket, queued_ticket]  # the queued exec was carried over
    world.metrics.session_execs = counted
    assert world.metrics.actor_restarts.labels("sessions")._value.get() == 1
    # The opening session too: its VM still becomes its.
    claim = next(m.task.claim for m in world.submits(2) if m.task.ticket == opening)
    world.sessions = world.directory.get("sessions")
    world.sessions.tell(SessionStarted(claim.session_id, "corral-test-7", Recorder.start()))
    assert world.answer(opening).session_id == claim.session_id


def test_a_request_that_crashes_the_actor_is_answered_not_tried_again(world):
    root = world.root
    bad = SessionOpen(request_id="bad", capabilities=(), idle_s=0, max_life_s=0, labels=(("k", "v"),))  # str, not bytes
    world.sessions.tell(OpenSession(99, bad, "alice"))
    reply = world.answer(99)
    assert reply.error_code == "unavailable" and "retry" in reply.error_message
    (failure,) = [m for m in wait_for(root, 1) if isinstance(m, ChildFailed)]
    assert failure.name == "sessions" and failure.salvage.inbox == []
