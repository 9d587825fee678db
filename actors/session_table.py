"""The Sessions actor's table: every session corrald holds, what it may
hold, and which sessions are due to end at a given time.

A session is a VM kept for one identity across execs. It is OPENING from
its SessionOpen until the VM that ran its claiming task is its
(SessionStarted), OPEN while execs may run in it, and CLOSING once it was
told to end (EndSession) until its VM is gone (SessionEnded), when it leaves
the table. Snapshots add three: PAUSING while its VM is saved to disk
(SaveSession until SessionSaved), PAUSED with no VM, only its snapshot, and
RESUMING while a VM is restored for it (RestoreSession until SessionStarted).
Every session in the table holds a VM, a snapshot or will, so every one
counts against the limits (sessions.max_per_identity, sessions.max_total):
paused ones, and a fork's new ones from the fork on.

An OPEN session ends at the end of its lifetime (counted from when its VM
first became its) and when it has been idle for its idle time: no exec
running and none answered since. A PAUSED one is never idle (nothing can run
in it), but its lifetime ends it. Its owner sees it; to anyone else it does
not exist.

A fork (Fork, by its ticket) makes new sessions RESUMING from one snapshot;
they are not their owner's to see (listings, execs) until the fork is
answered. A snapshot is in use while a session in the table refers to it:
one PAUSED on it, or one RESUMING from it (a restore that may still read it);
once none does, Sessions discards it (snapshot_unused).

Plain data and functions, no actor: the Sessions actor (actors/sessions.py)
keeps the table up to date from its messages, asks it what is due and does
the telling; a restarted Sessions actor takes the table over. Operators read
a SessionsView it publishes. Tests give the times, they do not wait for them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import pykka

from actors.errors import Rejected
from actors.vm.snapshots import Template
from config import Config
from protocol.wire.tasks import MAX_SESSIONS_LISTED, ErrorCode, SessionOpen

log = logging.getLogger("corral.sessions")

# The reasons a session ends, as corral_sessions_ended_total labels them: Sessions
# ends it (closed by its owner, idle, lifetime, an operator, a drain), or its VM
# does (the dead-man's switch, the VM lost, a guest protocol violation, corrald
# stopping); "restart": the sessions a previous corrald left open, counted by the
# next one as it starts. Others the Supervisor may give are counted as they come.
# Snapshots: its VM's save failed ("save_failed"), the VM restored for it failed
# ("restore_failed"), a fork's new session that started ended with its fork failing
# ("fork_failed").
END_REASONS = ("closed", "idle", "lifetime", "operator", "draining", "deadman", "vm_lost",
               "protocol_violation", "shutdown", "restart", "save_failed", "restore_failed", "fork_failed")
CLAIM_TIMEOUT_MS = 10_000  # the claiming task's `true`: milliseconds of work, seconds under load
OPEN_MARGIN_S = 30.0
# A restore takes ~0.5 s under TCG (a fork's side by side, each from a copy of
# its own), a few more under load: minutes would be a restore that never answers.
RESTORE_TIMEOUT_S = 300.0


class SessionState(StrEnum):
    """Where a session is; the values are what listings show."""

    OPENING = "opening"  # its claiming task waits for a VM or runs
    OPEN = "open"
    PAUSING = "pausing"  # its VM is being saved to a snapshot (pause, or a fork of an open session)
    PAUSED = "paused"  # no VM: its snapshot on disk
    RESUMING = "resuming"  # a VM is being restored for it from a snapshot (resume, fork)
    CLOSING = "closing"  # told to end; its VM is being destroyed


@dataclass(frozen=True)
class SessionLimits:
    max_per_identity: int
    max_total: int
    default_idle_s: int
    max_idle_s: int
    default_life_s: int
    max_life_s: int
    # An open whose VM has not become the session's by then is given up (a
    # backstop: the IntakeServer reports failed opens as they are answered).
    open_timeout_s: float = 660.0
    claim_timeout_ms: int = CLAIM_TIMEOUT_MS
    # A restore whose VM has not said it started (or failed) by then is taken
    # as failed: a backstop for a RestoreSession lost with a crashing pool.
    restore_timeout_s: float = RESTORE_TIMEOUT_S

    @classmethod
    def from_config(cls, cfg: Config) -> SessionLimits:
        s = cfg.sessions
        # Longest an honest open takes: queued until the Scheduler gives up on it,
        # then a VM's acquire and the claiming task with its dead-man's grace.
        open_timeout_s = (cfg.tasks.max_queue_wait_s + cfg.pool.acquire_timeout_s
                          + CLAIM_TIMEOUT_MS / 1000 + cfg.tasks.deadman_grace_s + OPEN_MARGIN_S)
        return cls(max_per_identity=s.max_per_identity, max_total=s.max_total,
                   default_idle_s=s.default_idle_s, max_idle_s=s.max_idle_s,
                   default_life_s=s.default_life_s, max_life_s=s.max_life_s, open_timeout_s=open_timeout_s)


def check_open(request: SessionOpen, limits: SessionLimits) -> tuple[int, int]:
    """The (idle_s, life_s) a SessionOpen gets, its zeros made the defaults;
    Rejected invalid_request if it asks for more than the maxima or its labels
    cannot be listed as k=v lines. The capabilities are the IntakeServer's to
    check, as for a task."""
    idle_s = request.idle_s or limits.default_idle_s
    life_s = request.max_life_s or limits.default_life_s
    if idle_s > limits.max_idle_s:
        raise Rejected(ErrorCode.INVALID_REQUEST,
                       f"idle time {idle_s} s is over the maximum of {limits.max_idle_s} s")
    if life_s > limits.max_life_s:
        raise Rejected(ErrorCode.INVALID_REQUEST,
                       f"lifetime {life_s} s is over the maximum of {limits.max_life_s} s")
    keys = set()
    for key, value in request.labels:
        if not key or any(c in key for c in (b"=", b"\n", b"\0")):
            raise Rejected(ErrorCode.INVALID_REQUEST, f"label name {key!r} is empty or contains '=', "
                                                      "a newline or a NUL byte")
        if b"\n" in value or b"\0" in value:
            raise Rejected(ErrorCode.INVALID_REQUEST, f"label {key!r} has a newline or a NUL byte in its value")
        if key in keys:
            raise Rejected(ErrorCode.INVALID_REQUEST, f"label {key!r} is given twice")
        keys.add(key)
    return idle_s, life_s


def new_session_id() -> str:
    """`s-` and 16 hex digits from the OS's randomness: not guessable, so an id
    alone grants nothing (the owner is checked too) and leaks nothing."""
    return "s-" + secrets.token_hex(8)


def label_lines(labels: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """Labels as the listings carry them: k=v lines."""
    return b"\n".join(key + b"=" + value for key, value in labels)


@dataclass
class Session:
    session_id: str
    owner: str  # the identity that opened it: the only one that sees it
    capabilities: tuple[bytes, ...]  # fixed for its life
    labels: tuple[tuple[bytes, bytes], ...]
    idle_s: float
    life_s: float
    open_ticket: int  # the SessionOpen's, answered when the VM is the session's
    open_request_id: str
    created: float = field(default_factory=time.monotonic)  # the open was taken
    created_wall: float = field(default_factory=time.time)  # for operators
    state: SessionState = SessionState.OPENING
    opened: float = 0.0  # monotonic: its VM became its (lifetime counts from here)
    last_active: float = 0.0  # monotonic: opened, or an exec last started or was answered
    running: int = 0  # execs given to its Supervisor and not answered yet
    execs: int = 0  # execs given to its Supervisor in all
    vm_id: str = ""
    ends_by: float = 0.0  # wall clock: its lifetime is over by then (set as it opens)
    supervisor: pykka.ActorRef | None = None
    end_reason: str = ""  # why Sessions ended it (an OPENING, PAUSING or RESUMING one: ends as that is over)
    closes: list = field(default_factory=list)  # (ticket, request_id) of SessionCloses, answered once it ended
    egress_allow: tuple[bytes, ...] = ()  # its execs' egress rules, fixed when it opened (restores need them)
    # The snapshot it is PAUSED on, or RESUMING from once its RestoreSession is told.
    snapshot: Template | None = None
    restore_told: float = 0.0  # monotonic: its RestoreSession was told (stale_restores)
    pauses: list = field(default_factory=list)  # (ticket, request_id) of SessionPauses, answered once saved
    resumes: list = field(default_factory=list)  # (ticket, request_id) of SessionResumes, answered once open
    forking: int = 0  # the ticket of a fork of it not answered yet
    fork_ticket: int = 0  # a fork's new session: its fork's ticket until answered (unseen by its owner till then)

    def age_s(self, now: float) -> float:
        return now - (self.opened or self.created)

    def idle_for_s(self, now: float) -> float:
        """How long no exec ran in it: 0 while one runs, and unless it is
        OPEN or CLOSING (a paused one is never idle: nothing can run in it)."""
        if self.running or self.state not in (SessionState.OPEN, SessionState.CLOSING):
            return 0.0
        return max(0.0, now - self.last_active)

    @property
    def seen(self) -> bool:
        """Whether its owner knows it: opened, and not a fork's new session
        whose fork is not answered (an exec in one is session_not_found)."""
        return self.state != SessionState.OPENING and not self.fork_ticket


@dataclass
class Fork:
    """A SessionFork not answered yet: `children`, the new sessions, started
    from the parent's snapshot; answered once every session in `waiting` (the
    children, and an open parent restored after its save) is OPEN."""

    ticket: int
    request_id: str
    parent: str
    children: tuple[str, ...]
    waiting: set[str]
    arrived: float  # monotonic: the fork reached Sessions (corral_session_fork_seconds)


@dataclass(frozen=True)
class SessionSummary:
    """One session as operators see it (SessionsView), times monotonic."""

    session_id: str
    owner: str
    labels: tuple[tuple[bytes, bytes], ...]
    state: SessionState
    vm_id: str
    execs: int
    running: int
    since: float  # opened, or the open taken while OPENING
    idle_since: float | None  # None while an exec runs, and unless OPEN or CLOSING


class SessionsView:
    """The sessions, readable from any thread without asking the Sessions
    actor (the control plane lists them). `sessions` is replaced whole."""

    def __init__(self) -> None:
        self.sessions: tuple[SessionSummary, ...] = ()


@dataclass
class SessionTable:
    sessions: dict[str, Session] = field(default_factory=dict)
    forks: dict[int, Fork] = field(default_factory=dict)  # by the fork's ticket

    def add(self, session: Session) -> None:
        self.sessions[session.session_id] = session

    def remove(self, session_id: str) -> Session | None:
        return self.sessions.pop(session_id, None)

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def owned(self, session_id: str, owner: str) -> Session | None:
        """The session if `owner` opened it; None for an unknown id and for
        another identity's alike, so ids of others are never confirmed."""
        session = self.sessions.get(session_id)
        return session if session is not None and session.owner == owner else None

    def opening(self, ticket: int) -> Session | None:
        """The OPENING session whose SessionOpen has `ticket`."""
        for session in self.sessions.values():
            if session.state == SessionState.OPENING and session.open_ticket == ticket:
                return session
        return None

    def count(self, owner: str | None = None) -> int:
        return sum(1 for s in self.sessions.values() if owner is None or s.owner == owner)

    def refusal(self, owner: str, limits: SessionLimits, adding: int = 1) -> str | None:
        """Why `owner` may not have `adding` more sessions now (an open, a
        fork's new ones), or None."""
        more = "one more" if adding == 1 else f"{adding} more"
        if self.count(owner) + adding > limits.max_per_identity:
            return (f"{owner!r} holds {self.count(owner)} sessions; {more} would pass the most one identity may "
                    f"(sessions.max_per_identity = {limits.max_per_identity}); close one first")
        if self.count() + adding > limits.max_total:
            return (f"corrald holds {self.count()} sessions; {more} would pass the most it may "
                    f"(sessions.max_total = {limits.max_total}); retry after some close")
        return None

    def due(self, now: float) -> list[tuple[str, str]]:
        """(session_id, reason) of each session to end now: an OPEN or PAUSED
        one past its lifetime ("lifetime"), an OPEN one idle for its idle
        time ("idle")."""
        ending = []
        for session in self.sessions.values():
            if session.state not in (SessionState.OPEN, SessionState.PAUSED):
                continue
            if now - session.opened >= session.life_s:
                ending.append((session.session_id, "lifetime"))
            elif (session.state == SessionState.OPEN and not session.running
                  and now - session.last_active >= session.idle_s):
                ending.append((session.session_id, "idle"))
        return ending

    def stale_restores(self, now: float, restore_timeout_s: float) -> list[Session]:
        """RESUMING sessions whose restore was told `restore_timeout_s` ago and never answered."""
        return [s for s in self.sessions.values()
                if s.state == SessionState.RESUMING and s.restore_told and now - s.restore_told >= restore_timeout_s]

    def snapshot_unused(self, snapshot: Template) -> bool:
        """Whether no session is PAUSED on `snapshot` or RESUMING from it:
        nothing will read it any more."""
        return all(s.snapshot is None or s.snapshot.directory != snapshot.directory
                   for s in self.sessions.values())

    def stale_opens(self, now: float, open_timeout_s: float) -> list[Session]:
        """OPENING sessions whose VM has not come within `open_timeout_s`."""
        return [s for s in self.sessions.values()
                if s.state == SessionState.OPENING and now - s.created >= open_timeout_s]

    def stop_idle_clocks(self, for_s: float) -> None:
        """Safe mode held `for_s`: nobody could run an exec meanwhile, so that
        time does not count as idle."""
        for session in self.sessions.values():
            if session.state != SessionState.OPENING:
                session.last_active += for_s

    def listing(self, owner: str, now: float) -> tuple[tuple[str, bytes, int, int, int, str], ...]:
        """`owner`'s sessions for a SessionReply: (id, labels as k=v lines, age
        ms, idle ms, execs run, state), oldest first. OPENING ones and a
        fork's new ones before it is answered are left out: their ids are
        not the owner's to know yet."""
        mine = sorted((s for s in self.sessions.values() if s.owner == owner and s.seen), key=lambda s: s.created)
        return tuple(listed(s, now) for s in mine[:MAX_SESSIONS_LISTED])

    def summaries(self) -> tuple[SessionSummary, ...]:
        """Every session for operators, oldest first."""
        return tuple(SessionSummary(
            session_id=s.session_id, owner=s.owner, labels=s.labels, state=s.state, vm_id=s.vm_id,
            execs=s.execs, running=s.running, since=s.opened or s.created,
            idle_since=None if s.running or s.state not in (SessionState.OPEN, SessionState.CLOSING)
            else s.last_active)
            for s in sorted(self.sessions.values(), key=lambda s: s.created))


def listed(session: Session, now: float) -> tuple[str, bytes, int, int, int, str]:
    """One session as a SessionReply lists it (a listing, a fork's new ones)."""
    return (session.session_id, label_lines(session.labels), int(session.age_s(now) * 1000),
            int(session.idle_for_s(now) * 1000), session.execs, str(session.state))


def operator_row(summary: SessionSummary, now: float) -> tuple[str, str]:
    """(session id, the rest) of one session for `corral admin sessions`."""
    idle = "-" if summary.idle_since is None else f"{max(0.0, now - summary.idle_since):.0f}s"
    labels = ",".join(f"{k.decode(errors='replace')}={v.decode(errors='replace')}" for k, v in summary.labels)
    return summary.session_id, (f"owner={summary.owner} state={summary.state} age={now - summary.since:.0f}s "
                                f"idle={idle} vm={summary.vm_id or '-'} execs={summary.execs} "
                                f"running={summary.running} labels={labels}")


# --- the record that outlives corrald -------------------------------------------------

RECORD_VERSION = 1
MAX_REMEMBERED = 4096  # sessions ended by restarts still remembered: the record stays small
MAX_RECORD_BYTES = 1 << 20  # a bigger file is not one corrald wrote
SESSION_ID = re.compile(r"s-[0-9a-f]{16}")


@dataclass(frozen=True)
class Remembered:
    """A session another corrald had open: its owner, and the wall-clock time
    its lifetime was over by, after which it is forgotten."""

    session_id: str
    owner: str
    until: float


@dataclass(frozen=True)
class PastSessions:
    """What the previous corrald's record says: the sessions it had open
    (they ended with it) and those ended by earlier restarts, still remembered."""

    open: tuple[Remembered, ...] = ()
    lost: tuple[Remembered, ...] = ()


class SessionRecord:
    """The file that tells the next corrald which sessions this one had open:
    <state_dir>/sessions/<instance>.json (0600, in a 0700 directory), replaced
    whole by rename, so a crash leaves the old record or the new one. It
    holds ids, owners and when each session's lifetime is over, nothing else.
    Reading never fails: a missing file is no sessions, an unreadable or
    corrupt one a warning and no sessions."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def for_instance(cls, state_dir: Path, instance: str) -> SessionRecord:
        return cls(Path(state_dir) / "sessions" / f"{instance}.json")

    def read(self) -> PastSessions:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_RECORD_BYTES + 1)
            if len(data) > MAX_RECORD_BYTES:
                raise ValueError(f"over {MAX_RECORD_BYTES} bytes")
            record = json.loads(data)
            if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
                raise ValueError("not a version 1 record")
            return PastSessions(open=_entries(record.get("open")), lost=_entries(record.get("lost")))
        except FileNotFoundError:
            return PastSessions()
        except (OSError, ValueError, TypeError) as e:
            log.warning("session record %s unreadable (%s): no sessions of an earlier corrald are known", self.path, e)
            return PastSessions()

    def write(self, open_sessions: list[Remembered], lost: list[Remembered]) -> bool:
        """Replace the record; False (and a warning) if it could not be written."""
        record = {"version": RECORD_VERSION, "open": [_entry(r) for r in open_sessions],
                  "lost": [_entry(r) for r in lost]}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), 0o600)  # one left by an older process may have another mode
                json.dump(record, f)
            os.replace(tmp, self.path)
            return True
        except OSError as e:
            log.warning("session record %s not written (%s): a restart now would leave some sessions "
                        "answered session_not_found instead of session_lost", self.path, e)
            return False


def _entry(r: Remembered) -> dict:
    return {"id": r.session_id, "owner": r.owner, "until": r.until}


def _entries(items) -> tuple[Remembered, ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise ValueError("a session list is not a list")
    entries = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("id"), str) and SESSION_ID.fullmatch(item["id"])
                and isinstance(item.get("owner"), str) and isinstance(item.get("until"), (int, float))):
            raise ValueError(f"a session entry is malformed: {str(item)[:80]}")
        entries.append(Remembered(item["id"], item["owner"], float(item["until"])))
    return tuple(entries)


def remembered_now(entries, now_wall: float, max_life_s: float) -> dict[str, Remembered]:
    """The entries still worth remembering at `now_wall`, by id: none past its
    lifetime, none kept longer than `max_life_s` (no session outlives that,
    whatever a record says), at most MAX_REMEMBERED, the latest-ending kept."""
    horizon = now_wall + max_life_s
    live = [Remembered(r.session_id, r.owner, min(r.until, horizon)) for r in entries if r.until > now_wall]
    live.sort(key=lambda r: r.until, reverse=True)
    return {r.session_id: r for r in live[:MAX_REMEMBERED]}
