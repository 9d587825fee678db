"""Sessions' table alone, no actor: the checks of an open, the limits, who
sees which session, which sessions are due to end when, and the listings,
with times given rather than waited for."""

import re

import pytest

import config
from actors.errors import Rejected
from actors.session_table import (Session, SessionLimits, SessionState, SessionTable, check_open, label_lines,
                                  new_session_id, operator_row)
from protocol.wire.tasks import MAX_LABELS, SessionOpen

NOW = 1000.0
LIMITS = SessionLimits(max_per_identity=2, max_total=3, default_idle_s=300, max_idle_s=3600,
                       default_life_s=3600, max_life_s=86400)


def open_request(**fields):
    base = dict(request_id="o", capabilities=(), idle_s=0, max_life_s=0, labels=())
    return SessionOpen(**{**base, **fields})


def session(session_id="s-1", owner="alice", state=SessionState.OPEN, opened=NOW, idle_s=60, life_s=600,
            running=0, last_active=None, ticket=1, labels=()):
    return Session(session_id=session_id, owner=owner, capabilities=(), labels=labels, idle_s=idle_s,
                   life_s=life_s, open_ticket=ticket, open_request_id=f"o{ticket}", created=opened - 1,
                   state=state, opened=opened if state != SessionState.OPENING else 0.0,
                   last_active=opened if last_active is None else last_active, running=running)


def table(*sessions):
    t = SessionTable()
    for s in sessions:
        t.add(s)
    return t


# --- opening ------------------------------------------------------------------------

def test_an_open_asking_for_nothing_gets_the_defaults_and_within_the_maxima_what_it_asks():
    assert check_open(open_request(), LIMITS) == (300, 3600)
    assert check_open(open_request(idle_s=3600, max_life_s=86400), LIMITS) == (3600, 86400)


@pytest.mark.parametrize("fields, fragment", [
    (dict(idle_s=3601), "idle time 3601 s is over the maximum of 3600 s"),
    (dict(max_life_s=86401), "lifetime 86401 s is over the maximum of 86400 s"),
    (dict(labels=((b"", b"x"),)), "label name b'' is empty"),
    (dict(labels=((b"a=b", b"x"),)), "label name b'a=b' is empty or contains '='"),
    (dict(labels=((b"a", b"x\ny=z"),)), "label b'a' has a newline"),
    (dict(labels=((b"a", b"1"), (b"a", b"2"))), "label b'a' is given twice"),
])
def test_an_open_past_the_maxima_or_with_labels_that_cannot_be_listed_is_invalid(fields, fragment):
    with pytest.raises(Rejected) as refused:
        check_open(open_request(**fields), LIMITS)
    assert refused.value.code == "invalid_request" and fragment in str(refused.value)


def test_limits_come_from_config_and_an_open_is_given_up_only_after_an_honest_open_would_be_answered():
    cfg = config.load()
    limits = SessionLimits.from_config(cfg)
    assert (limits.max_per_identity, limits.max_total, limits.default_idle_s, limits.max_life_s) == (4, 16, 300, 86400)
    honest_s = cfg.tasks.max_queue_wait_s + cfg.tasks.deadman_grace_s + limits.claim_timeout_ms / 1000
    assert limits.open_timeout_s > honest_s


def test_session_ids_are_s_and_16_hex_digits_and_never_repeat():
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"s-[0-9a-f]{16}", i) for i in ids)


def test_the_limits_count_every_session_held_or_coming_per_identity_and_in_all():
    t = table(session("s-1"), session("s-2", state=SessionState.OPENING))
    assert "sessions.max_per_identity = 2" in t.refusal("alice", LIMITS)
    assert t.refusal("bob", LIMITS) is None
    t.add(session("s-3", owner="bob", state=SessionState.CLOSING))
    assert "sessions.max_total = 3" in t.refusal("carol", LIMITS)
    t.remove("s-1")
    assert t.refusal("alice", LIMITS) is None


def test_a_session_is_its_owners_only_and_to_others_as_unknown():
    t = table(session("s-1", owner="alice"))
    assert t.owned("s-1", "alice").session_id == "s-1"
    assert t.owned("s-1", "bob") is None and t.owned("s-9", "alice") is None


def test_an_opening_session_is_found_by_its_opens_ticket():
    t = table(session("s-1", state=SessionState.OPENING, ticket=7), session("s-2", ticket=8))
    assert t.opening(7).session_id == "s-1"
    assert t.opening(8) is None  # open already: its ticket is answered


# --- ending ---------------------------------------------------------------------------

def test_an_open_session_ends_at_its_idle_time_counted_from_its_last_exec_never_while_one_runs():
    t = table(session("s-1", idle_s=60, last_active=NOW + 100), session("s-2", idle_s=60, running=1))
    assert t.due(NOW + 159) == []
    assert t.due(NOW + 160) == [("s-1", "idle")]
    assert t.due(NOW + 500) == [("s-1", "idle")]  # one exec running: never idle


def test_a_session_ends_at_its_lifetime_whatever_runs_in_it():
    t = table(session("s-1", life_s=600, running=2, idle_s=3600))
    assert t.due(NOW + 599) == []
    assert t.due(NOW + 600) == [("s-1", "lifetime")]


def test_only_open_sessions_are_due_opening_and_closing_ones_are_on_their_way():
    t = table(session("s-1", state=SessionState.OPENING), session("s-2", state=SessionState.CLOSING))
    assert t.due(NOW + 10 ** 6) == []


def test_an_open_whose_vm_never_came_is_stale_after_the_open_timeout():
    t = table(session("s-1", state=SessionState.OPENING, opened=NOW), session("s-2"))
    assert t.stale_opens(NOW + 8.9, open_timeout_s=10) == []
    assert [s.session_id for s in t.stale_opens(NOW + 9, open_timeout_s=10)] == ["s-1"]  # its open came at NOW - 1


def test_time_in_safe_mode_is_not_idle_time():
    t = table(session("s-1", idle_s=60))
    t.stop_idle_clocks(for_s=50)
    assert t.due(NOW + 100) == []
    assert t.due(NOW + 110) == [("s-1", "idle")]


# --- listings -------------------------------------------------------------------------

def test_an_owner_lists_its_own_open_and_closing_sessions_with_age_idle_execs_and_labels():
    mine = session("s-1", labels=((b"job", b"build"), (b"try", b"2")), last_active=NOW + 4)
    mine.execs = 3
    t = table(mine, session("s-2", owner="bob"), session("s-3", state=SessionState.OPENING, opened=NOW + 1),
              session("s-4", state=SessionState.CLOSING, running=1, opened=NOW + 2))
    assert t.listing("alice", NOW + 10) == (
        ("s-1", b"job=build\ntry=2", 10_000, 6_000, 3, "open"),
        ("s-4", b"", 8_000, 0, 0, "closing"))
    assert [row[0] for row in t.listing("bob", NOW)] == ["s-2"]
    assert t.listing("carol", NOW) == ()


def test_operators_see_every_session_with_owner_vm_and_state():
    running = session("s-1", running=1)
    running.vm_id, running.execs = "corral-x-1", 4
    t = table(running, session("s-2", owner="bob", state=SessionState.OPENING, labels=((b"k", b"v"),)))
    rows = dict(operator_row(summary, NOW + 30) for summary in t.summaries())
    assert rows == {
        "s-1": "owner=alice state=open age=30s idle=- vm=corral-x-1 execs=4 running=1 labels=",
        "s-2": "owner=bob state=opening age=31s idle=- vm=- execs=0 running=0 labels=k=v"}


def test_labels_list_as_k_v_lines_that_fit_the_wire():
    labels = tuple((f"k{i}".encode(), b"v" * 256) for i in range(MAX_LABELS))
    lines = label_lines(labels)
    assert lines.split(b"\n")[0] == b"k0=" + b"v" * 256 and lines.count(b"\n") == MAX_LABELS - 1


# --- snapshots ------------------------------------------------------------------------

def snapshot(name):
    from pathlib import Path

    from actors.vm.snapshots import Template, TemplateKey
    key = TemplateKey(gold="g", agent="a", host="h", domain="d", network=False, memory_mib=512)
    return Template(key=key, directory=Path("/nonexistent") / name, xml="<domain/>", name="corral-t", inode=1,
                    data_len=65536, guest_next_seq=1, host_next_seq=0)


def test_a_paused_session_is_never_idle_but_ends_at_its_lifetime_pausing_and_resuming_ones_never_due():
    paused = session("s-1", state=SessionState.PAUSED, idle_s=60, life_s=600)
    t = table(paused, session("s-2", state=SessionState.PAUSING, idle_s=1, life_s=1),
              session("s-3", state=SessionState.RESUMING, idle_s=1, life_s=1))
    assert t.due(NOW + 599) == []
    assert t.due(NOW + 600) == [("s-1", "lifetime")]
    assert paused.idle_for_s(NOW + 300) == 0.0


def test_the_limits_count_paused_sessions_and_what_a_fork_would_add():
    t = table(session("s-1", state=SessionState.PAUSED))
    assert t.refusal("alice", LIMITS) is None
    refusal = t.refusal("alice", LIMITS, adding=2)
    assert "2 more would pass" in refusal and "sessions.max_per_identity = 2" in refusal
    t.add(session("s-2", owner="bob", state=SessionState.RESUMING))
    assert "sessions.max_total = 3" in t.refusal("carol", LIMITS, adding=2)


def test_a_forks_new_sessions_are_not_their_owners_to_see_until_the_fork_is_answered():
    child = session("s-2", state=SessionState.RESUMING)
    child.fork_ticket = 9
    t = table(session("s-1", state=SessionState.PAUSED), child)
    assert [(row[0], row[5]) for row in t.listing("alice", NOW)] == [("s-1", "paused")]
    assert [s.state for s in t.summaries()] == ["paused", "resuming"]  # operators see it
    child.fork_ticket = 0
    assert [row[0] for row in t.listing("alice", NOW)] == ["s-1", "s-2"]


def test_a_snapshot_is_in_use_while_a_session_is_paused_on_it_or_resuming_from_it():
    shared, other = snapshot("a"), snapshot("b")
    paused = session("s-1", state=SessionState.PAUSED)
    paused.snapshot = shared
    resuming = session("s-2", state=SessionState.RESUMING)
    resuming.snapshot = snapshot("a")  # the same directory
    t = table(paused, resuming)
    assert not t.snapshot_unused(shared) and t.snapshot_unused(other)
    t.remove("s-1")
    assert not t.snapshot_unused(shared)
    resuming.snapshot = None
    assert t.snapshot_unused(shared)


def test_a_restore_never_answered_is_stale_after_the_restore_timeout():
    told = session("s-1", state=SessionState.RESUMING)
    told.restore_told = NOW
    untold = session("s-2", state=SessionState.RESUMING)  # a fork's new one before its parent's save
    t = table(told, untold)
    assert t.stale_restores(NOW + 9, restore_timeout_s=10) == []
    assert [s.session_id for s in t.stale_restores(NOW + 10, restore_timeout_s=10)] == ["s-1"]
