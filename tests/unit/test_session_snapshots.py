"""Session snapshots in the Sessions actor alone, with recording actors as the
sessions' Supervisors and the pool: pause (SaveSession, SessionSaved), resume
and fork (RestoreSession, SessionStarted of the restored VMs), all or none
for a fork, failed saves and restores, and what happens to a paused session
and its snapshot (a real directory) on close, lifetime, drain, SCRAM and
corrald's stop."""

import pytest

from actors.messages import (Drain, EndSession, ForkSession, InjectFault, PauseSession, RestoreSession,
                             ResumeService, ResumeSession, RunTask, SaveSession, Scram, SessionEnded,
                             SessionExecDone, SessionSaved, SessionStarted)
from actors.root import Root
from actors.session_table import SessionLimits, SessionRecord
from actors.vm.snapshots import IMAGE_FILE, Template, TemplateKey
from protocol.wire.tasks import SessionFork, SessionPause, SessionReply, SessionResume
from tests.support.probe import Recorder, wait_for
from tests.support.waiting import wait_until
from tests.unit.test_sessions import LIMITS, World, told, wait_told

ROOMY = SessionLimits(**{**LIMITS.__dict__, "max_per_identity": 8, "max_total": 10})
UNKNOWN = "s-" + "0" * 16


class SnapshotWorld(World):
    """A World whose Supervisors save into real snapshot directories under
    `snapshots`, and whose pool's restores the test answers."""

    def __init__(self, snapshots, limits=ROOMY, record=None):
        self.snapshots = snapshots
        self.record = record
        self.saved = 0
        super().__init__(limits)

    def snapshot(self) -> Template:
        """A snapshot on disk as a Supervisor's save leaves one."""
        self.saved += 1
        directory = self.snapshots / f"test-s-{self.saved}"
        directory.mkdir(mode=0o700)
        (directory / IMAGE_FILE).write_bytes(b"guest memory")
        key = TemplateKey(gold="g", agent="a", host="h", domain="d", network=False, memory_mib=512)
        return Template(key=key, directory=directory, xml="<domain/>", name="corral-test-s", inode=1,
                        data_len=65536, guest_next_seq=7, host_next_seq=3)

    def request(self, kind, session_id, owner="alice", **fields) -> int:
        ticket = next(self.tickets)
        message, request = {"pause": (PauseSession, SessionPause), "resume": (ResumeSession, SessionResume),
                            "fork": (ForkSession, SessionFork)}[kind]
        self.sessions.tell(message(ticket, request(request_id=f"{kind}-{ticket}", session_id=session_id, **fields),
                                   owner))
        return ticket

    def pause(self, session_id, owner="alice") -> int:
        return self.request("pause", session_id, owner)

    def resume(self, session_id, owner="alice") -> int:
        return self.request("resume", session_id, owner)

    def fork(self, session_id, count=1, owner="alice") -> int:
        return self.request("fork", session_id, owner, count=count)

    def save(self, session_id, supervisor) -> Template:
        """Play the Supervisor told SaveSession: the VM saved, SessionSaved."""
        wait_told(supervisor, SaveSession)
        snapshot = self.snapshot()
        self.sessions.tell(SessionSaved(session_id, snapshot))
        return snapshot

    def paused(self, owner="alice", **fields):
        """A PAUSED session: (its id, its snapshot), the pause answered."""
        session_id, supervisor = self.opened(owner, **fields)
        ticket = self.pause(session_id, owner)
        snapshot = self.save(session_id, supervisor)
        reply = self.answer(ticket)
        assert (reply.error_code, reply.session_id) == ("", session_id)
        return session_id, snapshot

    def restores(self, count):
        return [m for m in wait_for(self.pool, count) if isinstance(m, RestoreSession)]

    def restored(self, session_id):
        """Play the pool's Supervisor whose restore for `session_id` worked: its VM's Supervisor."""
        supervisor = Recorder.start()
        self.sessions.tell(SessionStarted(session_id, f"corral-test-{next(self.vms)}", supervisor))
        return supervisor

    def state_of(self, session_id):
        self.settled()
        return next((s.state for s in self.view.sessions if s.session_id == session_id), None)


@pytest.fixture
def world(tmp_path):
    w = SnapshotWorld(tmp_path)
    yield w
    w.stop()


# --- pause ----------------------------------------------------------------------------

def test_a_pause_saves_the_vm_and_is_answered_once_saved_the_session_paused_with_no_vm(world):
    session_id, supervisor = world.opened(labels=((b"job", b"build"),))
    ticket = world.pause(session_id)
    assert wait_told(supervisor, SaveSession) == [SaveSession()]
    assert world.state_of(session_id) == "pausing" and ticket not in world.answers()
    snapshot = world.save(session_id, supervisor)
    reply = world.answer(ticket)
    assert reply == SessionReply(request_id=f"pause-{ticket}", error_code="", error_message="",
                                 session_id=session_id, sessions=(), retry_after_ms=0)
    assert world.state_of(session_id) == "paused"
    (summary,) = world.view.sessions
    assert summary.vm_id == "" and summary.idle_since is None
    assert [(r[0], r[5]) for r in world.listing().sessions] == [(session_id, "paused")]
    assert snapshot.directory.exists()  # it is the session now
    assert world.metrics.session_snapshots.labels("pause", "ok")._value.get() == 1
    assert world.metrics.sessions_paused._value.get() == 1 and world.metrics.sessions_open._value.get() == 0
    assert world.answer(world.pause(session_id)).error_code == ""  # paused already: answered at once


def test_execs_in_a_paused_or_pausing_session_and_a_pause_while_an_exec_runs_are_refused(world):
    session_id, supervisor = world.opened()
    world.exec(session_id)
    wait_told(supervisor, RunTask)
    busy = world.answer(world.pause(session_id))
    assert busy.error_code == "session_busy" and "an exec runs" in busy.error_message
    world.sessions.tell(SessionExecDone(session_id))
    world.pause(session_id)
    wait_told(supervisor, SaveSession)
    pausing = world.answer(world.exec(session_id))
    assert pausing.error_code == "session_busy" and "being paused" in pausing.error_message
    assert world.answer(world.pause(session_id)).error_code == "session_busy"
    assert world.answer(world.fork(session_id)).error_code == "session_busy"
    world.save(session_id, supervisor)
    paused = world.answer(world.exec(session_id))
    assert (paused.error_code, paused.error_message) == ("session_paused",
                                                         f"session {session_id} is paused; resume it first")
    assert len(told(supervisor, RunTask)) == 1


def test_a_save_that_fails_ends_the_session_and_answers_the_pause_session_lost(world):
    session_id, supervisor = world.opened()
    ticket = world.pause(session_id)
    wait_told(supervisor, SaveSession)
    world.sessions.tell(SessionEnded(session_id, "save_failed"))
    reply = world.answer(ticket)
    assert reply.error_code == "session_lost" and "save_failed" in reply.error_message
    world.settled()
    assert world.view.sessions == ()
    assert world.metrics.sessions_ended.labels("save_failed")._value.get() == 1
    assert world.metrics.session_snapshots.labels("pause", "failed")._value.get() == 1
    assert world.answer(world.exec(session_id)).error_code == "session_not_found"


def test_a_session_whose_supervisor_dies_while_saving_is_lost(world):
    session_id, supervisor = world.opened()
    ticket = world.pause(session_id)
    wait_told(supervisor, SaveSession)
    supervisor.stop()
    assert world.answer(ticket).error_code == "session_lost"
    late = world.snapshot()  # its SessionSaved comes after all: nobody needs it
    world.sessions.tell(SessionSaved(session_id, late))
    wait_until(lambda: not late.directory.exists(), 5, "the late snapshot discarded")


# --- resume -----------------------------------------------------------------------------

def test_a_resume_restores_a_new_vm_from_the_snapshot_and_discards_it_once_open(world):
    session_id, supervisor = world.opened(capabilities=(b"net:egress",), egress_allow=(b"pypi.org",))
    world.pause(session_id)
    snapshot = world.save(session_id, supervisor)
    ticket = world.resume(session_id)
    (restore,) = world.restores(1)
    assert restore == RestoreSession(session_id, "alice", snapshot, (b"net:egress",), (b"pypi.org",))
    assert world.state_of(session_id) == "resuming" and ticket not in world.answers()
    assert world.answer(world.exec(session_id)).error_code == "session_busy"
    assert world.answer(world.resume(session_id)).error_code == "session_busy"
    new_vm = world.restored(session_id)
    reply = world.answer(ticket)
    assert (reply.error_code, reply.session_id) == ("", session_id)
    assert world.state_of(session_id) == "open"
    assert not snapshot.directory.exists()  # nothing restores from it any more
    exec_ticket = world.exec(session_id)
    assert wait_told(new_vm, RunTask)[0].task.ticket == exec_ticket
    assert told(supervisor, RunTask) == []
    assert world.metrics.session_snapshots.labels("resume", "ok")._value.get() == 1
    assert world.answer(world.resume(session_id)).error_code == ""  # open already: answered at once


def test_a_restore_that_fails_loses_the_resumed_session_and_discards_its_snapshot(world):
    session_id, snapshot = world.paused()
    ticket = world.resume(session_id)
    world.restores(1)
    world.sessions.tell(SessionEnded(session_id, "restore_failed"))
    reply = world.answer(ticket)
    assert reply.error_code == "session_lost" and "restore_failed" in reply.error_message
    wait_until(lambda: not snapshot.directory.exists(), 5, "the snapshot discarded")
    world.settled()
    assert world.view.sessions == ()
    assert world.metrics.sessions_ended.labels("restore_failed")._value.get() == 1
    assert world.metrics.session_snapshots.labels("resume", "failed")._value.get() == 1


def test_a_resume_the_pool_cannot_be_told_is_answered_unavailable_and_the_session_stays_paused(world):
    session_id, snapshot = world.paused()
    world.pool.stop()  # restarting
    reply = world.answer(world.resume(session_id))
    assert reply.error_code == "unavailable" and reply.retry_after_ms > 0
    assert world.state_of(session_id) == "paused" and snapshot.directory.exists()


def test_a_restore_that_never_answers_is_taken_as_failed(tmp_path):
    world = SnapshotWorld(tmp_path, SessionLimits(**{**ROOMY.__dict__, "restore_timeout_s": 0.3}))
    try:
        session_id, snapshot = world.paused()
        ticket = world.resume(session_id)
        assert world.answer(ticket).error_code == "session_lost"
        assert not snapshot.directory.exists()
        late = world.restored(session_id)  # its VM comes after all: nobody's
        assert wait_told(late, EndSession) == [EndSession("unknown")]
    finally:
        world.stop()


# --- fork -------------------------------------------------------------------------------

def test_a_fork_of_an_open_session_saves_it_restores_it_and_n_new_ones_answered_once_all_are_open(world):
    parent, supervisor = world.opened(labels=((b"job", b"build"),), idle_s=120,
                                      capabilities=(b"dev:python",))
    ticket = world.fork(parent, count=3)
    snapshot = world.save(parent, supervisor)
    restores = world.restores(4)
    assert restores[0].session_id == parent
    new = [r.session_id for r in restores[1:]]
    assert len(set(new)) == 3 and parent not in new
    assert all(r.snapshot == snapshot and r.owner == "alice" and r.capabilities == (b"dev:python",)
               for r in restores)
    assert [s[0] for s in world.listing().sessions] == [parent]  # the new ones are not the owner's yet
    vms = {session_id: world.restored(session_id) for session_id in new}
    world.settled()
    assert ticket not in world.answers() and snapshot.directory.exists()  # the parent's restore still reads it
    world.restored(parent)
    reply = world.answer(ticket)
    assert reply.error_code == "" and reply.session_id == parent
    assert [(r[0], r[1], r[4], r[5]) for r in reply.sessions] == [(n, b"job=build", 0, "open") for n in new]
    assert not snapshot.directory.exists()
    listing = world.listing().sessions
    assert [(r[0], r[5]) for r in listing] == [(parent, "open")] + [(n, "open") for n in new]
    exec_ticket = world.exec(new[1])
    assert wait_told(vms[new[1]], RunTask)[0].task.ticket == exec_ticket
    world.settled()
    summaries = {s.session_id: s for s in world.view.sessions}
    assert all(summaries[n].owner == "alice" and summaries[n].labels == ((b"job", b"build"),) for n in new)
    assert world.metrics.session_snapshots.labels("fork", "ok")._value.get() == 1
    assert world.metrics.session_fork_seconds._sum.get() > 0


def test_a_fork_of_a_paused_session_restores_only_the_new_ones_and_it_stays_paused_on_its_snapshot(world):
    parent, snapshot = world.paused()
    ticket = world.fork(parent, count=2)
    restores = world.restores(2)
    assert parent not in [r.session_id for r in restores]
    assert world.answer(world.resume(parent)).error_code == "session_busy"  # being forked
    for r in restores:
        world.restored(r.session_id)
    reply = world.answer(ticket)
    assert reply.error_code == "" and len(reply.sessions) == 2
    assert world.state_of(parent) == "paused"
    assert snapshot.directory.exists()  # the parent is paused on it
    close = world.close(parent)
    assert world.answer(close).error_code == ""  # no VM to destroy: at once
    assert not snapshot.directory.exists()
    assert len(world.listing().sessions) == 2


def test_a_fork_past_the_limits_is_refused_session_limit_and_starts_nothing(world):
    parent, supervisor = world.opened()
    for _ in range(5):
        world.opened()
    mine = world.answer(world.fork(parent, count=3))  # alice holds 6 of her 8
    assert mine.error_code == "session_limit" and "sessions.max_per_identity = 8" in mine.error_message
    for _ in range(3):
        world.opened("bob")
    total = world.answer(world.fork(parent, count=2))  # 9 held of corrald's 10
    assert total.error_code == "session_limit" and "sessions.max_total = 10" in total.error_message
    world.settled()
    assert told(supervisor, SaveSession) == [] and world.pool.proxy().seen.get() == []
    assert len(world.view.sessions) == 9


def test_the_session_limit_counts_paused_sessions_and_a_forks_new_ones(tmp_path):
    world = SnapshotWorld(tmp_path, SessionLimits(**{**ROOMY.__dict__, "max_per_identity": 3, "max_total": 4}))
    try:
        parent, _ = world.paused()
        refused = world.answer(world.fork(parent, count=3))
        assert refused.error_code == "session_limit" and "sessions.max_per_identity = 3" in refused.error_message
        world.settled()
        assert [m for m in world.pool.proxy().seen.get() if isinstance(m, RestoreSession)] == []
        assert len(world.view.sessions) == 1
        ticket = world.fork(parent, count=2)
        world.restores(2)
        world.settled()
        assert len(world.view.sessions) == 3  # counted from the fork on
        assert world.answer(world.open("alice")).error_code == "session_limit"
        world.opened("bob")
        total = world.answer(world.open("carol"))
        assert total.error_code == "session_limit" and "sessions.max_total = 4" in total.error_message
        assert ticket not in world.answers()
    finally:
        world.stop()


def test_a_fork_with_one_restore_failing_is_answered_session_lost_and_leaves_no_new_session(world):
    parent, supervisor = world.opened()
    ticket = world.fork(parent, count=3)
    snapshot = world.save(parent, supervisor)
    restores = world.restores(4)
    first, second, third = (r.session_id for r in restores[1:])
    first_vm = world.restored(first)
    world.sessions.tell(SessionEnded(second, "restore_failed"))
    reply = world.answer(ticket)
    assert reply.error_code == "session_lost" and reply.sessions == ()
    assert wait_told(first_vm, EndSession) == [EndSession("fork_failed")]
    third_vm = world.restored(third)  # restored after the fork failed: ended as it comes
    assert wait_told(third_vm, EndSession) == [EndSession("fork_failed")]
    world.restored(parent)  # the forked session goes on
    for session_id in (first, third):
        world.sessions.tell(SessionEnded(session_id, "fork_failed"))
    wait_until(lambda: [s.session_id for s in world.view.sessions] == [parent], 5, "only the parent left")
    assert [(r[0], r[5]) for r in world.listing().sessions] == [(parent, "open")]
    assert not snapshot.directory.exists()
    assert world.metrics.session_snapshots.labels("fork", "failed")._value.get() == 1
    assert world.metrics.sessions_ended.labels("fork_failed")._value.get() == 2  # the two that started
    assert world.answer(world.exec(first)).error_code == "session_not_found"


def test_a_fork_whose_save_fails_loses_the_session_and_starts_nothing(world):
    parent, supervisor = world.opened()
    ticket = world.fork(parent, count=2)
    wait_told(supervisor, SaveSession)
    world.sessions.tell(SessionEnded(parent, "save_failed"))
    assert world.answer(ticket).error_code == "session_lost"
    world.settled()
    assert world.view.sessions == () and world.pool.proxy().seen.get() == []


def test_a_fork_the_pool_cannot_be_told_is_answered_unavailable_and_leaves_nothing(world):
    parent, snapshot = world.paused()
    world.pool.stop()
    reply = world.answer(world.fork(parent, count=2))
    assert reply.error_code == "unavailable" and reply.retry_after_ms > 0
    world.settled()
    assert [s.session_id for s in world.view.sessions] == [parent] and snapshot.directory.exists()


# --- the end of a paused session --------------------------------------------------------------

def test_a_close_of_a_paused_session_ends_it_at_once_and_discards_its_snapshot(world):
    session_id, snapshot = world.paused()
    reply = world.answer(world.close(session_id))
    assert (reply.error_code, reply.session_id) == ("", session_id)
    assert not snapshot.directory.exists() and not (snapshot.directory / IMAGE_FILE).exists()
    assert world.metrics.sessions_ended.labels("closed")._value.get() == 1
    assert world.answer(world.resume(session_id)).error_code == "session_not_found"


def test_a_close_while_pausing_ends_the_session_once_saved(world):
    session_id, supervisor = world.opened()
    pause = world.pause(session_id)
    wait_told(supervisor, SaveSession)
    close = world.close(session_id)
    snapshot = world.save(session_id, supervisor)
    assert world.answer(close).error_code == ""
    assert world.answer(pause).error_code == "session_lost"
    assert not snapshot.directory.exists()


def test_a_paused_session_is_never_idle_but_its_lifetime_ends_it(world):
    idle_id, idle_snapshot = world.paused(idle_s=1)
    life_id, life_snapshot = world.paused(max_life_s=2)
    wait_until(lambda: not life_snapshot.directory.exists(), 5, "the lifetime's end")
    assert world.metrics.sessions_ended.labels("lifetime")._value.get() == 1
    assert world.state_of(idle_id) == "paused" and idle_snapshot.directory.exists()  # 2 s past its idle time


def test_a_drain_closes_paused_sessions_at_once_and_fails_a_fork_not_answered(world):
    paused_id, snapshot = world.paused()
    parent, supervisor = world.opened()
    fork = world.fork(parent, count=1)
    wait_told(supervisor, SaveSession)
    world.sessions.tell(Drain())
    assert world.answer(fork).error_code == "draining"
    wait_until(lambda: not snapshot.directory.exists(), 5, "the paused session closed")
    parent_snapshot = world.save(parent, supervisor)  # the parent, saved for the fork, ends too
    wait_until(lambda: world.view.sessions == (), 5, "every session gone")
    assert not parent_snapshot.directory.exists()
    assert world.metrics.sessions_ended.labels("draining")._value.get() == 2
    assert world.answer(world.resume(paused_id)).error_code == "session_not_found"


def test_scram_refuses_pause_resume_and_fork_with_safe_mode(world):
    open_id, supervisor = world.opened()
    paused_id, _ = world.paused()
    world.sessions.tell(Scram("drill"))
    for ticket in (world.pause(open_id), world.fork(open_id), world.resume(paused_id), world.fork(paused_id)):
        assert world.answer(ticket).error_code == "safe_mode"
    world.sessions.tell(ResumeService())
    world.pause(open_id)
    assert wait_told(supervisor, SaveSession) == [SaveSession()]


def test_another_identitys_pause_resume_and_fork_get_the_answer_an_unknown_id_gets(world):
    open_id, supervisor = world.opened("alice")
    paused_id, snapshot = world.paused("alice")
    for kind in ("pause", "resume", "fork"):
        for session_id in (open_id, paused_id):
            theirs = world.answer(world.request(kind, session_id, "mallory", **({"count": 1} if kind == "fork" else {})))
            assert (theirs.error_code, theirs.error_message) == ("session_not_found", f"no session {session_id}")
        unknown = world.answer(world.request(kind, UNKNOWN, "alice", **({"count": 1} if kind == "fork" else {})))
        assert (unknown.error_code, unknown.error_message) == ("session_not_found", f"no session {UNKNOWN}")
    world.settled()
    assert told(supervisor, SaveSession) == [] and world.pool.proxy().seen.get() == []


def test_a_pause_that_crashes_the_actor_is_answered_unavailable(world):
    bad = PauseSession(99, SessionPause(request_id="bad", session_id=["not", "hashable"]), "alice")
    world.sessions.tell(bad)
    reply = world.answer(99)
    assert reply.error_code == "unavailable" and reply.request_id == "bad"


def test_at_stop_a_paused_session_is_recorded_like_an_open_one_and_its_snapshot_discarded(tmp_path):
    record_path = tmp_path / "state" / "sessions" / "test.json"
    world = SnapshotWorld(tmp_path, record=SessionRecord(record_path))
    try:
        session_id, snapshot = world.paused()
        world.settled()
        world.sessions.stop()
        assert session_id in {entry.session_id for entry in SessionRecord(record_path).read().open}
        assert not snapshot.directory.exists()
    finally:
        world.stop()


def test_a_vm_ending_for_a_paused_session_ends_nothing(world):
    session_id, snapshot = world.paused()
    world.sessions.tell(SessionEnded(session_id, "vm_lost"))  # about the VM it no longer holds
    assert world.state_of(session_id) == "paused" and snapshot.directory.exists()


def test_a_crash_hands_a_fork_not_answered_to_the_successor(world):
    world.sessions.stop()
    root = Root.start(directory=world.directory, factories={"sessions": lambda salvage: world.start(state=salvage)},
                      metrics=world.metrics, max_restarts=5, window_s=60, give_up=lambda reason: None)
    root.proxy().started().get(timeout=5)
    world.sessions = world.directory.get("sessions")
    parent, snapshot = world.paused()
    ticket = world.fork(parent, count=2)
    restores = world.restores(2)
    first = world.sessions
    first.tell(InjectFault("crash"))
    wait_until(lambda: world.directory.get("sessions") not in (None, first), 5, "a successor")
    world.sessions = world.directory.get("sessions")
    for r in restores:
        world.restored(r.session_id)
    reply = world.answer(ticket)
    assert reply.error_code == "" and [s[0] for s in reply.sessions] == [r.session_id for r in restores]
    assert world.state_of(parent) == "paused" and snapshot.directory.exists()
