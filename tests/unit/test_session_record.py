"""What outlives a corrald restart of its sessions: the Sessions actor keeps a
record of its open sessions (id, owner, lifetime end) under the state
directory; the next one reads it as it starts. Those sessions ended with the
restart: their owner's exec and close are answered session_lost, anyone
else's session_not_found as for an unknown id; they are counted once, listed
nowhere, and forgotten when their lifetime would be over."""

import json
import logging
import stat
import time

import pykka
import pytest

from actors.messages import SessionEnded
from actors.session_table import MAX_REMEMBERED, Remembered, SessionRecord
from tests.unit.test_sessions import World

UNKNOWN = "s-" + "0" * 16


class RecordedWorld(World):
    """A World whose Sessions actor keeps its record at `path`; `restart()`
    stops it and starts a new one on the same record, as a new corrald would."""

    def __init__(self, path):
        self.record = SessionRecord(path)
        super().__init__()

    def restart(self):
        self.sessions.stop()
        from actors.edge.metrics import Metrics
        self.metrics = Metrics()  # a new process counts afresh
        self.sessions = self.start()


@pytest.fixture
def record_path(tmp_path):
    return tmp_path / "state" / "sessions" / "test.json"


@pytest.fixture
def world(record_path):
    w = RecordedWorld(record_path)
    yield w
    w.stop()


def on_disk(path):
    record = json.loads(path.read_text())
    return ({e["id"]: e["owner"] for e in record["open"]}, {e["id"]: e["owner"] for e in record["lost"]})


def write_record(path, open_=(), lost=()):
    assert SessionRecord(path).write(list(open_), list(lost))


def test_the_record_holds_the_open_sessions_0600_and_follows_opens_and_ends(world, record_path):
    first, supervisor = world.opened("alice")
    second, _ = world.opened("bob")
    world.settled()
    assert on_disk(record_path) == ({first: "alice", second: "bob"}, {})
    assert stat.S_IMODE(record_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(record_path.parent.stat().st_mode) == 0o700
    world.close(first)
    world.sessions.tell(SessionEnded(first, "closed"))
    wait = time.monotonic() + 5
    while on_disk(record_path) != ({second: "bob"}, {}) and time.monotonic() < wait:
        time.sleep(0.02)
    assert on_disk(record_path) == ({second: "bob"}, {})
    assert [p.name for p in record_path.parent.iterdir()] == ["test.json"]  # no temporary left


def test_after_a_restart_the_owner_gets_session_lost_and_anyone_else_session_not_found(world, record_path):
    session_id, _ = world.opened("alice")
    world.settled()
    world.restart()

    lost = world.answer(world.exec(session_id, owner="alice"))
    assert (lost.error_code, lost.error_message) == ("session_lost",
                                                     f"session {session_id} ended when corrald restarted")
    closed = world.answer(world.close(session_id, owner="alice"))
    assert (closed.error_code, closed.error_message) == ("session_lost",
                                                         f"session {session_id} ended when corrald restarted")
    # To another identity it never existed: the very answer an unknown id gets.
    theirs = world.answer(world.exec(session_id, owner="mallory"))
    unknown = world.answer(world.exec(UNKNOWN, owner="mallory"))
    assert (theirs.error_code, theirs.error_message) == ("session_not_found", f"no session {session_id}")
    assert (unknown.error_code, unknown.error_message) == ("session_not_found", f"no session {UNKNOWN}")
    their_close = world.answer(world.close(session_id, owner="mallory"))
    assert (their_close.error_code, their_close.error_message) == ("session_not_found", f"no session {session_id}")

    assert world.listing("alice").sessions == ()
    assert world.view.sessions == ()
    assert world.metrics.sessions_ended.labels("restart")._value.get() == 1
    assert world.metrics.sessions_open._value.get() == 0
    assert on_disk(record_path) == ({}, {session_id: "alice"})  # remembered, no longer open

    # A second restart still answers the owner, but counts it no more.
    world.restart()
    assert world.answer(world.exec(session_id, owner="alice")).error_code == "session_lost"
    assert world.metrics.sessions_ended.labels("restart")._value.get() == 0


def test_sessions_ended_as_corrald_stops_are_left_in_the_record(world, record_path):
    kept, _ = world.opened("alice")
    closed, _ = world.opened("alice")
    world.close(closed)
    world.sessions.tell(SessionEnded(closed, "closed"))
    world.sessions.tell(SessionEnded(kept, "shutdown"))  # the pool stops before Sessions does
    world.settled()
    assert on_disk(record_path) == ({kept: "alice"}, {})
    world.restart()
    assert world.answer(world.exec(kept)).error_code == "session_lost"
    assert world.answer(world.exec(closed)).error_code == "session_not_found"
    assert world.metrics.sessions_ended.labels("restart")._value.get() == 1


def test_a_session_still_in_the_table_at_stop_is_left_in_the_record(world, record_path):
    session_id, _ = world.opened("alice")
    world.sessions.stop()  # no SessionEnded came: its VM goes with corrald all the same
    assert on_disk(record_path) == ({session_id: "alice"}, {})


def test_a_corrupt_record_is_a_warning_and_the_next_write_replaces_it(world, record_path, caplog):
    world.sessions.stop()
    for corrupt in (b"{not json", b'{"version": 1, "open": [{"id": "x"}]}', b"[]", b"\xff" * 10):
        record_path.write_bytes(corrupt)
        with caplog.at_level(logging.WARNING, logger="corral.sessions"):
            caplog.clear()
            world.sessions = world.start()
            world.settled()
        assert any("unreadable" in r.getMessage() for r in caplog.records), corrupt
        assert world.answer(world.exec(UNKNOWN)).error_code == "session_not_found"
        assert world.metrics.sessions_ended.labels("restart")._value.get() == 0
        world.sessions.stop()
    world.sessions = world.start()
    session_id, _ = world.opened("alice")
    world.settled()
    assert on_disk(record_path) == ({session_id: "alice"}, {})


def test_an_unwritable_record_is_a_warning_and_sessions_go_on(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    world = RecordedWorld(blocker / "sessions" / "test.json")  # its directory cannot be made
    try:
        with caplog.at_level(logging.WARNING, logger="corral.sessions"):
            session_id, supervisor = world.opened("alice")
            world.settled()
        assert any("not written" in r.getMessage() for r in caplog.records)
        assert world.listing("alice").sessions[0][0] == session_id
    finally:
        world.stop()


def test_ended_sessions_are_forgotten_when_their_lifetime_would_be_over(world, record_path):
    world.sessions.stop()
    now = time.time()
    soon, later, past = "s-" + "1" * 16, "s-" + "2" * 16, "s-" + "3" * 16
    write_record(record_path, open_=[Remembered(soon, "alice", now + 0.5), Remembered(past, "alice", now - 1)],
                 lost=[Remembered(later, "alice", now + 3600)])
    world.sessions = world.start()
    assert world.answer(world.exec(soon)).error_code == "session_lost"
    assert world.answer(world.exec(later)).error_code == "session_lost"
    assert world.answer(world.exec(past)).error_code == "session_not_found"
    assert world.metrics.sessions_ended.labels("restart")._value.get() == 2  # both open ones ended with it
    time.sleep(0.6)
    world.settled()
    assert world.answer(world.exec(soon)).error_code == "session_not_found"
    deadline = time.monotonic() + 5
    while on_disk(record_path) != ({}, {later: "alice"}) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert on_disk(record_path) == ({}, {later: "alice"})


def test_no_session_is_remembered_past_max_life_s_and_the_record_stays_bounded(world, record_path):
    world.sessions.stop()
    now = time.time()
    far = "s-" + "4" * 16
    many = [Remembered(f"s-{i:016x}", "alice", now + 60 + i) for i in range(MAX_REMEMBERED + 10)]
    write_record(record_path, lost=many + [Remembered(far, "alice", now + 10 * world.limits.max_life_s)])
    world.sessions = world.start()
    world.settled()
    state = world.sessions.proxy().state.get()
    assert len(state.restarted) == MAX_REMEMBERED
    assert state.restarted[far].until <= now + world.limits.max_life_s + 5
    assert f"s-{0:016x}" not in state.restarted  # the soonest forgotten go first
    assert len(on_disk(record_path)[1]) == MAX_REMEMBERED


def test_a_crashed_sessions_actor_keeps_what_it_remembered_and_counts_nothing_again(world, record_path):
    session_id, _ = world.opened("alice")
    world.settled()
    world.restart()
    state = world.sessions.proxy().state.get()
    world.sessions.stop()
    record_path.unlink()  # the successor takes over the state, it does not read the record
    world.sessions = world.start(state=state)
    assert world.answer(world.exec(session_id)).error_code == "session_lost"
    assert world.metrics.sessions_ended.labels("restart")._value.get() == 1


def test_without_a_record_nothing_is_written_or_remembered(tmp_path):
    world = World()
    try:
        session_id, _ = world.opened("alice")
        world.sessions.stop()
        world.sessions = world.start()
        assert world.answer(world.exec(session_id)).error_code == "session_not_found"
    finally:
        pykka.ActorRegistry.stop_all()
        world.timers.stop()


def test_a_session_whose_vm_is_still_going_as_corrald_stops_is_not_taken_for_lost(world, record_path):
    session_id, supervisor = world.opened("alice")
    world.pool.stop()  # corrald stops: the pool first, and with it every Supervisor
    supervisor.stop()  # dead to is_alive() while it destroys the VM, before it says SessionEnded
    time.sleep(10 * 0.05)  # ticks enough to take a silent Supervisor for a lost VM
    world.settled()
    assert [s.session_id for s in world.view.sessions] == [session_id]
    assert world.metrics.sessions_ended.labels("vm_lost")._value.get() == 0
    world.sessions.tell(SessionEnded(session_id, "shutdown"))
    world.sessions.stop()
    assert on_disk(record_path) == ({session_id: "alice"}, {})
