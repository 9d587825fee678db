"""Session requests through a real IntakeServer (real ROUTER, Intake actor,
CurveZMQ for identities) with raw DEALER callers. A recording actor stands
in for "sessions" to see what the server hands over (OpenSession,
CloseSession, ListSessions, SessionExec, SessionOpenFailed, PauseSession,
ResumeSession, ForkSession) and the test answers as Sessions, the
Scheduler or a Supervisor would; the ownership
tests put the real Sessions actor there, with a recording Scheduler."""

import itertools
from contextlib import contextmanager

import pytest

from actors.directory import Directory
from actors.edge.intake_server import TaskLimits
from actors.edge.metrics import Metrics
from actors.messages import (CloseSession, ForkSession, ListSessions, OpenSession, PauseSession, ResumeSession,
                             RunTask, SaveSession, SessionExec, SessionOpenFailed, SessionStarted)
from actors.session_table import SessionLimits, SessionsView
from actors.sessions import Sessions
from actors.timers import Timers
from protocol.channel.constants import STDOUT
from protocol.wire import outcomes
from protocol.wire.tasks import (MAX_FORKS, ErrorCode, SessionFork, SessionPause, SessionReply, SessionResume,
                                 TaskReply, error_reply, session_reply)
from tests.support.intake import LIMITS, curve_config, curve_keys
from tests.support.probe import Recorder, wait_for
from tests.support.streams import Caller, Producer, StreamWorld, stream_world, submitted
from tests.support.waiting import wait_until

SESSION_LIMITS = SessionLimits(max_per_identity=4, max_total=16, default_idle_s=300, max_idle_s=3600,
                               default_life_s=3600, max_life_s=86400)
WITH_SESSIONS = TaskLimits(**{**LIMITS.__dict__, "sessions": SESSION_LIMITS})


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """corrald's key pair and two allowed callers: alice (base:execute, dev:python; a budget of 3) and carol."""
    return curve_keys(tmp_path_factory.mktemp("keys"), allowed=("alice", "carol"))


@contextmanager
def world_of(tmp_path, keys, curve: bool, sessions=None):
    """A server with `sessions(directory, metrics)` (default: a Recorder) as "sessions"."""
    with stream_world(tmp_path, WITH_SESSIONS, curve_config(keys) if curve else None, keys) as w:
        w.directory["sessions"] = sessions(w.directory, w.metrics) if sessions else Recorder.start()
        yield w


@pytest.fixture
def world(tmp_path, keys):
    with world_of(tmp_path, keys, curve=False) as w:
        yield w


@pytest.fixture
def curve(tmp_path, keys):
    with world_of(tmp_path, keys, curve=True) as w:
        yield w


def handed(w: StreamWorld, count: int = 1) -> list:
    return wait_for(w.directory.get("sessions"), count)


def quiet(caller: Caller) -> None:
    """Nothing more comes for this caller: every request was answered once."""
    assert caller.read(0.3) == []


# --- opens ----------------------------------------------------------------------------

def test_an_open_is_handed_to_sessions_with_its_owner_and_answered_once(world):
    alice = world.caller()
    alice.open("o1", capabilities=(b"net:egress",), labels=((b"job", b"build"),))
    (open_,) = handed(world)
    assert isinstance(open_, OpenSession) and open_.owner == "local" and open_.request.request_id == "o1"
    assert open_.request.labels == ((b"job", b"build"),)
    assert open_.request.capabilities == (b"net:egress",)
    assert world.server.unanswered() == 1
    world.directory.answer(open_.ticket, session_reply("o1", session_id="s-0123456789abcdef"))
    world.directory.answer(open_.ticket, session_reply("o1", error_code=ErrorCode.SESSION_LOST,
                                                       error_message="too late"))
    reply = alice.session_reply("o1")
    assert (reply.error_code, reply.session_id) == ("", "s-0123456789abcdef")
    quiet(alice)
    wait_until(lambda: world.metrics.counter_total(world.metrics.duplicate_answers) == 1, 5, "the second dropped")
    assert world.server.unanswered() == 0
    assert world.metrics.session_requests.labels("open", "ok")._value.get() == 1
    assert world.metrics.counter_total(world.metrics.tasks) == 0  # an open is no task
    assert wait_for(world.scheduler, 0) == []


@pytest.mark.parametrize("fields, code, text", [
    (dict(capabilities=(b"dev:warp",)), ErrorCode.UNKNOWN_CAPABILITY, "unknown capability 'dev:warp'"),
    (dict(capabilities=(b"dev:gpu",)), ErrorCode.CAPABILITY_UNAVAILABLE, "no GPU passthrough"),
    (dict(capabilities=(b"dev:python", b"dev:python")), ErrorCode.DUPLICATE_CAPABILITY, "asked for twice"),
    (dict(egress_allow=(b"pypi.org",)), ErrorCode.INVALID_REQUEST, "need capability net:egress"),
    (dict(capabilities=(b"net:egress",), egress_allow=(b"not a rule",)), ErrorCode.INVALID_REQUEST, "not a rule"),
    (dict(idle_s=3601), ErrorCode.INVALID_REQUEST, "idle time 3601 s is over the maximum of 3600 s"),
    (dict(max_life_s=86401), ErrorCode.INVALID_REQUEST, "lifetime 86401 s is over the maximum"),
    (dict(labels=((b"a=b", b"c"),)), ErrorCode.INVALID_REQUEST, "label name"),
])
def test_a_bad_open_is_refused_at_once_and_never_reaches_sessions(world, fields, code, text):
    alice = world.caller()
    alice.open("bad", **fields)
    reply = alice.session_reply("bad")
    assert reply.error_code == code and text in reply.error_message, reply
    quiet(alice)
    assert wait_for(world.directory.get("sessions"), 0) == [] and world.server.unanswered() == 0


def test_an_empty_request_id_and_one_in_flight_are_refused(world):
    alice = world.caller()
    alice.open("")
    assert alice.session_reply("").error_code == ErrorCode.INVALID_REQUEST
    alice.open("twice")
    handed(world)
    alice.list_sessions("twice")
    reply = alice.recv()
    assert isinstance(reply, SessionReply) and reply.error_code == ErrorCode.DUPLICATE_TASK
    assert "'twice' is already in flight" in reply.error_message


def test_opens_and_execs_are_refused_in_corralds_modes_closes_and_lists_are_not(world):
    alice = world.caller()
    for code in ("draining", "safe_mode", "shutting_down"):
        world.server.refusal = (code, f"corrald is {code}")
        alice.open(f"open-{code}")
        assert alice.session_reply(f"open-{code}").error_code == code
        alice.submit(f"exec-{code}", stream=False, session_id="s-0123456789abcdef")
        assert alice.read_to_reply(f"exec-{code}", ack=False).error_code == code
    alice.list_sessions("l")
    alice.close_session("s-0123456789abcdef", "c")
    kinds = [type(m) for m in handed(world, 2)]
    assert kinds == [ListSessions, CloseSession]


def test_an_error_task_reply_for_an_open_goes_out_as_a_session_reply_and_sessions_forgets_it(world):
    alice = world.caller()
    cases = [(ErrorCode.UNAVAILABLE, "no VM became free in 60 s", 1000),
             (ErrorCode.CANCELLED_SCRAM, "an operator stopped corral (SCRAM)", 0),
             (ErrorCode.VM_LOST, "the VM died under the claim", 0)]
    for i, (code, text, retry) in enumerate(cases):
        alice.open(f"o{i}")
        open_ = handed(world, 2 * i + 1)[-1]
        world.directory.answer(open_.ticket, error_reply(f"o{i}", code, text, retry))
        reply = alice.session_reply(f"o{i}")
        assert (reply.error_code, reply.error_message, reply.retry_after_ms, reply.session_id) == \
            (code, text, retry, "")
        told = handed(world, 2 * i + 2)[-1]
        assert told == SessionOpenFailed(open_.ticket)
    quiet(alice)
    assert world.server.unanswered() == 0


def test_a_claim_answered_as_a_plain_task_fails_the_open(world):
    alice = world.caller()
    alice.open("o")
    (open_,) = handed(world)
    Producer(world.directory, open_.ticket).answer("o")  # exit 0, as a task's: no session phase ran
    reply = alice.session_reply("o")
    assert reply.error_code == ErrorCode.SESSION_LOST and reply.session_id == ""
    assert handed(world, 2)[-1] == SessionOpenFailed(open_.ticket)


def test_an_error_task_reply_for_a_close_or_list_is_converted_and_sessions_is_told_nothing(world):
    alice = world.caller()
    alice.close_session("s-0123456789abcdef", "c")
    alice.list_sessions("l")
    close, listing = handed(world, 2)
    world.directory.answer(close.ticket, error_reply("c", ErrorCode.CANCELLED, "corrald stopped"))
    world.directory.answer(listing.ticket, session_reply("l", sessions=(
        ("s-0123456789abcdef", b"job=build", 5000, 1000, 3, "open"),)))
    assert alice.session_reply("c").error_code == ErrorCode.CANCELLED
    assert alice.session_reply("l").sessions == (("s-0123456789abcdef", b"job=build", 5000, 1000, 3, "open"),)
    quiet(alice)
    assert len(handed(world, 2)) == 2  # an open's failure is told to Sessions before its reply goes out


def test_requests_still_unanswered_at_shutdown_get_one_reply_each_of_their_kind(world):
    alice = world.caller()
    alice.open("o")
    alice.list_sessions("l")
    alice.submit("x", stream=False, session_id="s-0123456789abcdef")
    handed(world, 3)
    world.server.stop()
    assert alice.session_reply("o").error_code == ErrorCode.CANCELLED
    assert alice.session_reply("l").error_code == ErrorCode.CANCELLED
    assert alice.read_to_reply("x", ack=False).error_code == ErrorCode.CANCELLED
    quiet(alice)


def test_without_a_sessions_actor_every_request_is_answered_unavailable(world):
    world.directory.get("sessions").stop()
    alice = world.caller()
    alice.open("o")
    alice.close_session("s-0123456789abcdef", "c")
    alice.list_sessions("l")
    alice.submit("x", stream=False, session_id="s-0123456789abcdef")
    for rid in ("o", "c", "l"):
        reply = alice.session_reply(rid)
        assert reply.error_code == ErrorCode.UNAVAILABLE and reply.retry_after_ms == 1000
    assert alice.read_to_reply("x", ack=False).error_code == ErrorCode.UNAVAILABLE
    quiet(alice)
    assert world.server.unanswered() == 0


# --- execs ----------------------------------------------------------------------------

def test_an_exec_goes_to_sessions_not_the_scheduler_and_streams_like_a_task(world):
    alice = world.caller()
    alice.submit("e", stream=True, session_id="s-0123456789abcdef", stdin=b"in", stdin_open=True)
    (exec_,) = handed(world)
    assert isinstance(exec_, SessionExec) and exec_.owner == "local"
    assert exec_.task.request.session_id == "s-0123456789abcdef" and exec_.task.identity == "local"
    assert wait_for(world.scheduler, 0) == []
    task = Producer(world.directory, exec_.task.ticket)
    task.start()
    alice.stdin(b" more", eof=True, task_id="e")
    assert exec_.task.request.stdin == b"in"  # goes with the request; the rest as it comes
    wait_until(lambda: task.stdin() == [(b" more", True)], 5, "stdin forwarded")
    task.out(b"hello\n")
    task.answer("e")
    reply = alice.read_to_reply("e")
    assert reply.exit_code == 0 and alice.stream(STDOUT, "e") == b"hello\n"
    assert world.metrics.counter_total(world.metrics.accepted) == 1


def test_an_exec_asking_for_capabilities_or_egress_rules_is_refused(world):
    alice = world.caller()
    alice.submit("caps", stream=False, session_id="s-0123456789abcdef", capabilities=(b"dev:python",))
    alice.submit("rules", stream=False, session_id="s-0123456789abcdef", egress_allow=(b"pypi.org",))
    for task_id in ("caps", "rules"):
        reply = alice.read_to_reply(task_id, ack=False)
        assert reply.error_code == ErrorCode.INVALID_REQUEST and "the session's" in reply.error_message
    assert wait_for(world.directory.get("sessions"), 0) == []


def test_a_session_reply_for_an_exec_goes_out_as_a_task_reply(world):
    alice = world.caller()
    alice.submit("e", stream=False, session_id="s-0123456789abcdef")
    (exec_,) = handed(world)
    world.directory.answer(exec_.task.ticket, session_reply("e", error_code=ErrorCode.SESSION_NOT_FOUND,
                                                            error_message="no session s-0123456789abcdef"))
    reply = alice.read_to_reply("e", ack=False)
    assert isinstance(reply, TaskReply) and reply.error_code == ErrorCode.SESSION_NOT_FOUND
    quiet(alice)


# --- identities and budgets ---------------------------------------------------------------

def test_an_open_is_checked_against_the_identitys_grants_and_charged_like_a_task(curve):
    ledger = curve.server.admission.ledger
    alice = curve.caller("alice")
    alice.open("denied", capabilities=(b"net:egress",))
    reply = alice.session_reply("denied")
    assert reply.error_code == ErrorCode.CAPABILITY_DENIED and "'net:egress'" in reply.error_message
    for i in range(3):  # a budget of 3, a normal task costs 1
        alice.open(f"o{i}", capabilities=(b"dev:python",))
    opens = handed(curve, 3)
    assert {o.owner for o in opens} == {"alice"}
    assert ledger.remaining("alice") < 1
    alice.open("poor")
    reply = alice.session_reply("poor")
    assert reply.error_code == ErrorCode.BUDGET_EXHAUSTED and reply.retry_after_ms > 0
    # Opens that never reached a VM are refunded; one that got its session is not.
    curve.directory.answer(opens[0].ticket, error_reply("o0", ErrorCode.CANCELLED_SCRAM, "SCRAM"))
    curve.directory.answer(opens[1].ticket, session_reply("o1", error_code=ErrorCode.SESSION_LIMIT,
                                                          error_message="too many"))
    curve.directory.answer(opens[2].ticket, session_reply("o2", session_id="s-0123456789abcdef"))
    for rid in ("o0", "o1", "o2"):
        alice.session_reply(rid)
    refunded = ledger.snapshot()["alice"][2]
    assert refunded == 2.0


def test_an_exec_is_charged_and_refunded_when_its_session_is_not_found(curve):
    ledger = curve.server.admission.ledger
    alice = curve.caller("alice")
    alice.submit("e", stream=False, session_id="s-0123456789abcdef")
    (exec_,) = handed(curve)
    assert exec_.owner == "alice" and ledger.snapshot()["alice"][1] == 1.0
    curve.directory.answer(exec_.task.ticket, error_reply("e", ErrorCode.SESSION_NOT_FOUND, "no session"))
    alice.read_to_reply("e", ack=False)
    assert ledger.snapshot()["alice"][2] == 1.0


def test_session_lost_refunds_an_exec_that_never_ran_and_not_one_whose_vm_died_under_it(curve):
    """After a corrald restart Sessions answers session_lost with no command
    run (outcome not_run): refunded. A session's VM that died under a running
    exec answers it session_lost with the crash's outcome: charged."""
    ledger = curve.server.admission.ledger
    alice = curve.caller("alice")
    alice.submit("never", stream=False, session_id="s-0123456789abcdef")
    alice.submit("ran", stream=False, session_id="s-0123456789abcdef")
    never, ran = handed(curve, 2)
    curve.directory.answer(never.task.ticket, error_reply(
        "never", ErrorCode.SESSION_LOST, "session s-0123456789abcdef ended when corrald restarted"))
    curve.directory.answer(ran.task.ticket, error_reply(
        "ran", ErrorCode.SESSION_LOST, "session s-0123456789abcdef ended: the VM died",
        outcome=outcomes.for_error(ErrorCode.VM_LOST, command_started=True)))
    assert alice.read_to_reply("never", ack=False).outcome == outcomes.NOT_RUN
    assert alice.read_to_reply("ran", ack=False).outcome == outcomes.VM_CRASHED
    assert ledger.snapshot()["alice"][1:] == (2.0, 1.0)


def test_closes_and_lists_carry_the_callers_identity_and_cost_nothing(curve):
    ledger = curve.server.admission.ledger
    carol = curve.caller("carol")
    carol.close_session("s-0123456789abcdef")
    carol.list_sessions()
    close, listing = handed(curve, 2)
    assert (close.owner, listing.owner) == ("carol", "carol")
    assert close.request.session_id == "s-0123456789abcdef"
    assert ledger.snapshot().get("carol", (0, 0.0, 0.0))[1] == 0.0  # no bucket opened: nothing charged


# --- ownership, with the real Sessions actor --------------------------------------------

@pytest.fixture
def owned(tmp_path, keys):
    timers = Timers()

    def real_sessions(directory: Directory, metrics: Metrics):
        return Sessions.start(directory=directory, metrics=metrics, timers=timers, limits=SESSION_LIMITS,
                              view=SessionsView(), tick_s=3600)

    try:
        with world_of(tmp_path, keys, curve=True, sessions=real_sessions) as w:
            yield w
    finally:
        timers.stop()


vms = itertools.count(1)


def open_session(w: StreamWorld, caller: Caller, request_id: str):
    """Open through the server; the test plays the Supervisor that takes the claim."""
    caller.open(request_id, capabilities=(b"dev:python",))
    claim = submitted(w.scheduler, request_id).task.claim
    supervisor = Recorder.start()
    w.directory.tell("sessions", SessionStarted(claim.session_id, f"corral-test-{next(vms)}", supervisor))
    reply = caller.session_reply(request_id)
    assert reply.error_code == "" and reply.session_id == claim.session_id
    return reply.session_id, supervisor


def test_another_identitys_session_does_not_exist_for_it(owned):
    alice, carol = owned.caller("alice"), owned.caller("carol")
    session_id, supervisor = open_session(owned, alice, "o")
    unknown = "s-" + "0" * 16

    carol.submit("theirs", stream=False, session_id=session_id)
    carol.submit("nobodys", stream=False, session_id=unknown)
    theirs, nobodys = carol.read_to_reply("theirs", ack=False), carol.read_to_reply("nobodys", ack=False)
    assert theirs.error_code == nobodys.error_code == ErrorCode.SESSION_NOT_FOUND
    assert theirs.error_message.replace(session_id, "ID") == nobodys.error_message.replace(unknown, "ID")
    assert (theirs.outcome, theirs.exit_code) == (nobodys.outcome, nobodys.exit_code)

    carol.close_session(session_id, "c1")
    carol.close_session(unknown, "c2")
    c1, c2 = carol.session_reply("c1"), carol.session_reply("c2")
    assert c1.error_code == c2.error_code == ErrorCode.SESSION_NOT_FOUND
    assert c1.error_message.replace(session_id, "ID") == c2.error_message.replace(unknown, "ID")
    carol.list_sessions("l")
    assert carol.session_reply("l").sessions == ()
    quiet(carol)

    # Alice's session is untouched: her exec reaches its Supervisor, her list shows it.
    assert not [m for m in supervisor.proxy().seen.get() if not isinstance(m, RunTask)]
    alice.submit("mine", stream=False, session_id=session_id)
    run = wait_for(supervisor, 1)[0]
    assert isinstance(run, RunTask) and run.task.request.task_id == "mine"
    alice.list_sessions("l")
    (listed,) = alice.session_reply("l").sessions
    assert listed[0] == session_id and listed[5] == "open"


def test_an_open_the_scheduler_turns_down_is_forgotten_by_sessions(owned):
    alice = owned.caller("alice")
    alice.open("o")
    submit = wait_for(owned.scheduler, 1)[0]
    owned.directory.answer(submit.task.ticket, error_reply("o", ErrorCode.BUSY, "the queue is full", 500))
    reply = alice.session_reply("o")
    assert (reply.error_code, reply.retry_after_ms) == (ErrorCode.BUSY, 500)
    sessions = owned.directory.get("sessions").proxy()
    wait_until(lambda: not sessions.state.get().table.sessions, 5, "Sessions forgetting the failed open")


# --- snapshots: pause, resume, fork ----------------------------------------------------

SESSION = "s-0123456789abcdef"


def pause(caller, request_id, session_id=SESSION):
    caller.send(SessionPause(request_id=request_id, session_id=session_id))


def resume(caller, request_id, session_id=SESSION):
    caller.send(SessionResume(request_id=request_id, session_id=session_id))


def fork(caller, request_id, count=1, session_id=SESSION):
    caller.send(SessionFork(request_id=request_id, session_id=session_id, count=count))


def test_pause_resume_and_fork_are_handed_to_sessions_with_their_owner_and_answered_once(world):
    alice = world.caller()
    pause(alice, "p")
    resume(alice, "r")
    fork(alice, "f", count=3)
    p, r, f = handed(world, 3)
    assert (type(p), type(r), type(f)) == (PauseSession, ResumeSession, ForkSession)
    assert {m.owner for m in (p, r, f)} == {"local"}
    assert f.request.count == 3 and p.request.session_id == SESSION
    new = (("s-1111111111111111", b"", 0, 0, 0, "open"),)
    world.directory.answer(p.ticket, session_reply("p", session_id=SESSION))
    world.directory.answer(r.ticket, session_reply("r", error_code=ErrorCode.SESSION_BUSY, error_message="busy"))
    world.directory.answer(f.ticket, session_reply("f", session_id=SESSION, sessions=new))
    world.directory.answer(f.ticket, session_reply("f", error_code=ErrorCode.SESSION_LOST, error_message="late"))
    assert alice.session_reply("p").session_id == SESSION
    assert alice.session_reply("r").error_code == ErrorCode.SESSION_BUSY
    assert alice.session_reply("f").sessions == new
    quiet(alice)
    assert world.server.unanswered() == 0
    for kind, code in (("pause", "ok"), ("resume", "session_busy"), ("fork", "ok")):
        assert world.metrics.session_requests.labels(kind, code)._value.get() == 1


@pytest.mark.parametrize("count", [0, MAX_FORKS + 1])
def test_a_fork_of_too_few_or_too_many_is_refused_at_once(world, count):
    alice = world.caller()
    fork(alice, "f", count=count)
    reply = alice.session_reply("f")
    assert reply.error_code == ErrorCode.INVALID_REQUEST and f"1 to {MAX_FORKS}" in reply.error_message
    assert wait_for(world.directory.get("sessions"), 0) == []


def test_forks_are_refused_in_corralds_modes_pauses_and_resumes_are_left_to_sessions(world):
    alice = world.caller()
    for code in ("draining", "safe_mode", "shutting_down"):
        world.server.refusal = (code, f"corrald is {code}")
        fork(alice, f"f-{code}")
        assert alice.session_reply(f"f-{code}").error_code == code
    pause(alice, "p")
    resume(alice, "r")
    assert [type(m) for m in handed(world, 2)] == [PauseSession, ResumeSession]


def test_an_error_task_reply_for_a_pause_or_fork_goes_out_as_a_session_reply(world):
    alice = world.caller()
    pause(alice, "p")
    fork(alice, "f")
    handed(world, 2)
    world.server.stop()  # corrald stopping answers them as it answers tasks
    assert alice.session_reply("p").error_code == ErrorCode.CANCELLED
    assert alice.session_reply("f").error_code == ErrorCode.CANCELLED


def test_without_a_sessions_actor_they_are_answered_unavailable(world):
    world.directory.get("sessions").stop()
    alice = world.caller()
    pause(alice, "p")
    resume(alice, "r")
    fork(alice, "f")
    for rid in ("p", "r", "f"):
        reply = alice.session_reply(rid)
        assert reply.error_code == ErrorCode.UNAVAILABLE and reply.retry_after_ms == 1000


def test_a_fork_is_charged_count_default_tasks_and_refunded_when_busy_pause_and_resume_are_free(curve):
    ledger = curve.server.admission.ledger
    alice = curve.caller("alice")  # a budget of 3; a normal task with no capability costs 1
    pause(alice, "p")
    resume(alice, "r")
    p, r = handed(curve, 2)
    assert ledger.snapshot().get("alice", (0, 0.0, 0.0))[1] == 0.0
    fork(alice, "f", count=2)
    f = handed(curve, 3)[-1]
    assert f.owner == "alice" and ledger.snapshot()["alice"][1] == 2.0
    fork(alice, "greedy", count=MAX_FORKS)  # 8 is over what alice may ever hold
    assert alice.session_reply("greedy").error_code == ErrorCode.COST_OVER_CAPACITY
    curve.directory.answer(f.ticket, session_reply("f", error_code=ErrorCode.SESSION_BUSY, error_message="busy"))
    alice.session_reply("f")
    assert ledger.snapshot()["alice"][2] == 2.0  # never reached a VM: refunded
    fork(alice, "g", count=1)
    g = handed(curve, 4)[-1]
    curve.directory.answer(g.ticket, session_reply("g", session_id=SESSION, sessions=(
        ("s-1111111111111111", b"", 0, 0, 0, "open"),)))
    alice.session_reply("g")
    assert ledger.snapshot()["alice"][1:] == (3.0, 2.0)  # a fork that made its session is not refunded


def test_an_exec_answered_session_paused_is_refunded(curve):
    ledger = curve.server.admission.ledger
    alice = curve.caller("alice")
    alice.submit("e", stream=False, session_id=SESSION)
    (exec_,) = handed(curve)
    curve.directory.answer(exec_.task.ticket, error_reply("e", ErrorCode.SESSION_PAUSED, "paused"))
    assert alice.read_to_reply("e", ack=False).error_code == ErrorCode.SESSION_PAUSED
    assert ledger.snapshot()["alice"][1:] == (1.0, 1.0)


def test_another_identitys_pause_resume_and_fork_find_no_session(owned):
    alice, carol = owned.caller("alice"), owned.caller("carol")
    session_id, supervisor = open_session(owned, alice, "o")
    unknown = "s-" + "0" * 16
    for send in (pause, resume, fork):
        send(carol, "theirs", session_id=session_id)
        theirs = carol.session_reply("theirs")
        send(carol, "nobodys", session_id=unknown)
        nobodys = carol.session_reply("nobodys")
        assert theirs.error_code == nobodys.error_code == ErrorCode.SESSION_NOT_FOUND
        assert theirs.error_message.replace(session_id, "ID") == nobodys.error_message.replace(unknown, "ID")
        carol.session_replies.clear()
    quiet(carol)
    assert supervisor.proxy().seen.get() == []
    pause(alice, "mine", session_id=session_id)  # hers is there: her pause saves its VM
    assert isinstance(wait_for(supervisor, 1)[0], SaveSession)
