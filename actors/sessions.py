"""Sessions: the VMs kept for one identity across execs, and who may use them.

Open: the IntakeServer hands over an accepted SessionOpen (OpenSession).
Sessions checks the limits, makes the session's id, records it OPENING and
submits to the Scheduler a task that claims a VM for it: `true`, with the
open's capabilities, carrying SessionClaim(id, owner). The Scheduler places
it like any task; the Supervisor that runs it keeps the VM afterwards (its
pool boots a replacement) and says SessionStarted: the session is OPEN and
the open is answered with its id. An open that fails on the way (queue full,
SCRAM, no VM in time, the VM lost) is answered by whoever failed it; the
IntakeServer tells Sessions (SessionOpenFailed) and the session is forgotten.

Exec: a TaskRequest with session_id, accepted and charged by the
IntakeServer like a task, comes here (SessionExec) instead of the Scheduler.
An unknown id, one not OPEN, or another identity's is answered
session_not_found with the same text, so ids of others leak nothing; else
the exec goes straight to the session's Supervisor (RunTask), which answers
it and says SessionExecDone.

End: closed by its owner (SessionClose, answered once the VM is gone), idle
for its idle time, past its lifetime, by an operator, or by a drain once its
running execs are answered: Sessions tells the Supervisor EndSession(reason);
the Supervisor answers what still runs session_lost, destroys the VM and says
SessionEnded. A VM that dies by itself (dead-man's switch, lost, protocol
violation) says SessionEnded too.

Restart: no session outlives corrald, but its owner learns that it ended.
Sessions keeps a SessionRecord (ids, owners, lifetime ends) of its open
sessions, rewritten as they open and end; one that ends because corrald
stops stays in it. The next Sessions reads it as it starts: those sessions
ended with the restart (counted once), and an exec or close by their owner is
answered session_lost, to anyone else session_not_found as for an unknown id.
They are remembered, in the record too, until their lifetime would be over.

SCRAM: the pool freezes session VMs like every VM; execs still reaching
Sessions are answered cancelled_scram, pauses, resumes and forks safe_mode,
and idle clocks stop until resume (nobody can run an exec meanwhile);
nothing is ended while safe mode holds.

Snapshots. Pause (PauseSession): an OPEN session with no exec running is
PAUSING and its Supervisor told SaveSession; at SessionSaved it is PAUSED,
holding the snapshot (no VM), and the pause is answered. A pause of a PAUSED
session is answered at once (it is paused: what the caller asked for). An
exec in a PAUSED session is answered session_paused; a pause, fork or exec
while it is PAUSING or RESUMING, or a pause or fork while an exec runs,
session_busy. Resume (ResumeSession): a PAUSED session is RESUMING, the pool
told RestoreSession; the VM restored for it says SessionStarted (a new
vm_id), the session is OPEN again and the resume answered; an OPEN one is
answered at once. Fork (ForkSession) of N: N new sessions (the same owner,
capabilities, egress rules, labels, idle time and lifetime), counted against
the limits at once; an OPEN session is saved first, then restored itself as
well as the N; a PAUSED one's snapshot serves the N and it stays paused. The
fork is answered once all its new sessions (and an open parent) are OPEN,
listing the new ones; all or none: one that fails fails the fork
(session_lost), and those that started are ended "fork_failed". A save that
fails ends the session (SessionEnded "save_failed"), a restore that fails
the session restored ("restore_failed"); what waited on either is answered
session_lost. A pool that cannot be told a RestoreSession (restarting) leaves
a paused session paused: the resume or fork is answered unavailable. A
snapshot is discarded once no session is PAUSED on it or RESUMING from it
(SessionTable.snapshot_unused). A close, an operator, a drain or the lifetime
end a PAUSED session at once (its snapshot discarded); a PAUSING or RESUMING
one ends as that is over.

It only ever tells. The table and what is due when are plain logic in
actors/session_table.py; a crashed Sessions actor hands the table, and what
its inbox still held, to its successor (ChildFailed.salvage).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pykka

from actors.directory import Directory, drain_inbox, send
from actors.edge.metrics import Metrics
from actors.errors import Rejected
from actors.messages import (ChildFailed, CloseSession, CloseSessionAsOperator, Drain, EndSession, ForkSession,
                             InjectFault, ListSessions, OpenSession, PauseSession, RestoreSession, ResumeService,
                             ResumeSession, RunTask, SaveSession, Scram, SessionClaim, SessionEnded, SessionExec,
                             SessionExecDone, SessionOpenFailed, SessionSaved, SessionStarted, Submit, Task, Tick)
from actors.session_table import (Fork, Remembered, Session, SessionLimits, SessionRecord, SessionState,
                                  SessionsView, SessionTable, check_open, listed, new_session_id, remembered_now)
from actors.timers import Timers
from actors.vm.snapshots import Template, discard_snapshot
from protocol.wire.tasks import MAX_FORKS, NORMAL, ErrorCode, TaskRequest, error_reply, session_reply

log = logging.getLogger("corral.sessions")
# States whose session has a VM of its own (corral_sessions_open).
HOLDING_A_VM = (SessionState.OPEN, SessionState.PAUSING, SessionState.CLOSING)
TICK_S = 1.0
CLAIM_OUTPUT_CAP = 4096  # `true` prints nothing; a guest that does is cut short
# What Sessions takes over from a crashed predecessor's inbox (Ticks and faults are its own).
CARRIED_OVER = (OpenSession, CloseSession, ListSessions, SessionOpenFailed, CloseSessionAsOperator, SessionExec,
                SessionStarted, SessionExecDone, SessionEnded, Scram, ResumeService, Drain,
                PauseSession, ResumeSession, ForkSession, SessionSaved)
# Requests answered with a SessionReply (on_failure answers the one that crashed the actor).
SESSION_REQUESTS = (OpenSession, CloseSession, ListSessions, PauseSession, ResumeSession, ForkSession)


@dataclass
class SessionsState:
    """What a restarted Sessions actor takes over."""

    table: SessionTable = field(default_factory=SessionTable)
    safe_mode: bool = False
    safe_since: float = 0.0  # monotonic: idle clocks stopped then
    draining: bool = False
    silent: set = field(default_factory=set)  # sessions whose Supervisor was found dead on the last tick
    # Sessions an earlier corrald had open, by id: they ended with its restart.
    restarted: dict[str, Remembered] = field(default_factory=dict)
    # Sessions of this corrald that ended as it stops: the record keeps them open.
    stopped: dict[str, Remembered] = field(default_factory=dict)
    recorded: tuple = ()  # what the record was last written with (_save)
    inbox: list = field(default_factory=list)  # messages the predecessor had not handled


class Sessions(pykka.ThreadingActor):
    def __init__(self, *, directory: Directory, metrics: Metrics, timers: Timers, limits: SessionLimits,
                 view: SessionsView, state: SessionsState | None = None, safe_mode: bool = False,
                 record: SessionRecord | None = None, tick_s: float = TICK_S):
        """`state`: a crashed predecessor's, taken over; else no sessions, in
        `safe_mode` or not, and those `record` says an earlier corrald left
        open taken as ended by the restart. `view` is published for other
        threads. No `record`: nothing outlives this actor's process."""
        super().__init__()
        self.directory = directory
        self.metrics = metrics
        self.timers = timers
        self.limits = limits
        self.view = view
        self.record = record
        self.fresh = state is None
        self.state = state or SessionsState(safe_mode=safe_mode, safe_since=time.monotonic())
        self.tick_s = tick_s
        self.handling = None  # the message being handled: answered if it crashes this actor

    def on_start(self) -> None:
        if self.fresh and self.record is not None:
            self._take_over_record()
        while self.state.inbox:  # one at a time: if one fails, the rest stay for the next successor
            self.handling = self.state.inbox.pop(0)
            self._handle(self.handling)
        self.handling = None
        self._publish()
        self.timers.call_later(self.tick_s, self.actor_ref, Tick())

    def on_receive(self, message) -> None:
        self.handling = message
        self._handle(message)
        self.handling = None
        self._publish()
        self._save()

    def _handle(self, message) -> None:
        if isinstance(message, OpenSession):
            self._open(message)
        elif isinstance(message, SessionStarted):
            self._started(message)
        elif isinstance(message, SessionOpenFailed):
            self._open_failed(message.ticket)
        elif isinstance(message, SessionExec):
            self._exec(message)
        elif isinstance(message, SessionExecDone):
            self._exec_done(message.session_id)
        elif isinstance(message, SessionEnded):
            self._vm_ended(message.session_id, message.reason)
        elif isinstance(message, CloseSession):
            self._close(message)
        elif isinstance(message, PauseSession):
            self._pause(message)
        elif isinstance(message, ResumeSession):
            self._resume_session(message)
        elif isinstance(message, ForkSession):
            self._fork(message)
        elif isinstance(message, SessionSaved):
            self._saved(message.session_id, message.snapshot)
        elif isinstance(message, ListSessions):
            self._answer(message.ticket, session_reply(
                message.request.request_id, sessions=self.state.table.listing(message.owner, time.monotonic())))
        elif isinstance(message, CloseSessionAsOperator):
            session = self.state.table.get(message.session_id)
            if session is not None:
                self._end(session, "operator")
        elif isinstance(message, Tick):
            self._tick()
        elif isinstance(message, Scram):
            if not self.state.safe_mode:
                self.state.safe_mode = True
                self.state.safe_since = time.monotonic()
        elif isinstance(message, ResumeService):
            self._resume()
        elif isinstance(message, Drain):
            self._drain()
        elif isinstance(message, InjectFault) and message.kind == "crash":
            raise RuntimeError("injected fault: sessions crash")
        else:
            log.warning("sessions ignores %r", message)

    # --- open -----------------------------------------------------------------

    def _open(self, message: OpenSession) -> None:
        request = message.request
        try:
            if self.state.draining:
                raise Rejected(ErrorCode.DRAINING, "corrald is draining: it opens no new sessions")
            if self.state.safe_mode:
                raise Rejected(ErrorCode.SAFE_MODE, "corrald is in safe mode after a SCRAM; "
                                                    "an operator must resume it")
            idle_s, life_s = check_open(request, self.limits)
            refusal = self.state.table.refusal(message.owner, self.limits)
            if refusal is not None:
                raise Rejected(ErrorCode.SESSION_LIMIT, refusal)
        except Rejected as e:
            return self._answer(message.ticket, session_reply(
                request.request_id, error_code=e.code, error_message=str(e), retry_after_ms=e.retry_after_ms))
        session = Session(session_id=new_session_id(), owner=message.owner, capabilities=request.capabilities,
                          labels=request.labels, idle_s=idle_s, life_s=life_s, open_ticket=message.ticket,
                          open_request_id=request.request_id, egress_allow=request.egress_allow)
        claim = TaskRequest(task_id=request.request_id, priority=NORMAL, argv=(b"true",), env=(), cwd=b"",
                            stdin=b"", timeout_ms=self.limits.claim_timeout_ms, output_cap=CLAIM_OUTPUT_CAP,
                            capabilities=request.capabilities, egress_allow=request.egress_allow)
        task = Task(message.ticket, claim, time.monotonic(), claim=SessionClaim(session.session_id, message.owner))
        if not self.directory.tell("scheduler", Submit(task)):
            return self._answer(message.ticket, session_reply(
                request.request_id, error_code=ErrorCode.UNAVAILABLE,
                error_message="the scheduler is restarting; retry", retry_after_ms=1000))
        self.state.table.add(session)
        log.info("session %s of %s opening (ticket %d)", session.session_id, session.owner, message.ticket)

    def _started(self, message: SessionStarted) -> None:
        session = self.state.table.get(message.session_id)
        if session is not None and session.vm_id == message.vm_id:
            log.warning("VM %s said twice it started session %s", message.vm_id, message.session_id)
            return
        if session is None or session.state not in (SessionState.OPENING, SessionState.RESUMING):
            # Given up meanwhile (its open answered some other way, its restore
            # taken as failed): the VM is nobody's.
            log.warning("VM %s started session %s, which is neither opening nor resuming: ended",
                        message.vm_id, message.session_id)
            send(message.supervisor, EndSession("unknown"))
            return
        if session.state == SessionState.RESUMING:
            return self._restored(session, message)
        now = time.monotonic()
        session.state = SessionState.OPEN
        session.vm_id, session.supervisor = message.vm_id, message.supervisor
        session.opened = session.last_active = now
        session.ends_by = time.time() + session.life_s
        if session.end_reason:  # a drain or an operator ended it before it opened
            code, text = ((ErrorCode.DRAINING, "corrald is draining: the session was closed as it opened")
                          if session.end_reason == "draining"
                          else (ErrorCode.SESSION_LOST, f"the session was ended ({session.end_reason}) as it opened"))
            self._answer(session.open_ticket, session_reply(session.open_request_id, error_code=code,
                                                            error_message=text))
            self._end(session, session.end_reason)
            return
        log.info("session %s of %s open on VM %s", session.session_id, session.owner, session.vm_id)
        self._answer(session.open_ticket, session_reply(session.open_request_id, session_id=session.session_id))

    def _open_failed(self, ticket: int) -> None:
        session = self.state.table.opening(ticket)
        if session is not None:
            log.info("session %s of %s did not open", session.session_id, session.owner)
            self.state.table.remove(session.session_id)

    # --- snapshots: pause, resume, fork ---------------------------------------

    def _pause(self, message: PauseSession) -> None:
        session = self._to_change(message, SessionState.PAUSED)
        if session is None:
            return
        session.pauses.append((message.ticket, message.request.request_id))
        self._save_vm(session)

    def _resume_session(self, message: ResumeSession) -> None:
        session = self._to_change(message, SessionState.OPEN)
        if session is None:
            return
        if not self._restore(session):
            return self._reply(message.ticket, message.request, ErrorCode.UNAVAILABLE,
                               "the pool is restarting; retry (the session stays paused)", retry_after_ms=1000)
        session.resumes.append((message.ticket, message.request.request_id))

    def _to_change(self, message: PauseSession | ResumeSession, wanted: SessionState) -> Session | None:
        """The owner's session a pause or resume is to bring to `wanted`; None
        once the request is answered: not found, `wanted` already (what the
        caller asked for is so), or busy."""
        session = self._owned_for(message.ticket, message.request, message.owner)
        if session is None:
            return None
        if session.state == wanted:
            self._reply(message.ticket, message.request)
            return None
        busy = self._busy(session)
        if busy:
            self._reply(message.ticket, message.request, ErrorCode.SESSION_BUSY, busy)
            return None
        return session

    def _fork(self, message: ForkSession) -> None:
        request, table = message.request, self.state.table
        session = self._owned_for(message.ticket, request, message.owner)
        if session is None:
            return
        if not 1 <= request.count <= MAX_FORKS:
            return self._reply(message.ticket, request, ErrorCode.INVALID_REQUEST,
                               f"a fork makes 1 to {MAX_FORKS} new sessions, not {request.count}")
        busy = self._busy(session)
        if busy:
            return self._reply(message.ticket, request, ErrorCode.SESSION_BUSY, busy)
        refusal = table.refusal(message.owner, self.limits, adding=request.count)
        if refusal is not None:
            return self._reply(message.ticket, request, ErrorCode.SESSION_LIMIT, refusal)
        children = [Session(session_id=new_session_id(), owner=session.owner, capabilities=session.capabilities,
                            labels=session.labels, idle_s=session.idle_s, life_s=session.life_s, open_ticket=0,
                            open_request_id="", state=SessionState.RESUMING, egress_allow=session.egress_allow,
                            fork_ticket=message.ticket)
                    for _ in range(request.count)]
        for child in children:
            table.add(child)
        ids = tuple(child.session_id for child in children)
        fork = table.forks[message.ticket] = Fork(message.ticket, request.request_id, session.session_id, ids,
                                                  set(ids), time.monotonic())
        session.forking = message.ticket
        log.info("session %s of %s forking into %s", session.session_id, session.owner, ", ".join(ids))
        if session.state == SessionState.PAUSED:
            self._restore_children(fork, session.snapshot)
        else:  # OPEN, no exec running: saved first, then restored along with the new ones (_saved)
            fork.waiting.add(session.session_id)
            self._save_vm(session)

    def _save_vm(self, session: Session) -> None:
        session.state = SessionState.PAUSING
        log.info("session %s of %s: saving VM %s", session.session_id, session.owner, session.vm_id)
        if not send(session.supervisor, SaveSession()):
            self._ended(session.session_id, "vm_lost")

    def _saved(self, session_id: str, snapshot: Template) -> None:
        table = self.state.table
        session = table.get(session_id)
        if session is None or session.state != SessionState.PAUSING:
            log.warning("a snapshot of session %s, which is not being paused: discarded", session_id)
            if session is None or session.snapshot is None or session.snapshot.directory != snapshot.directory:
                discard_snapshot(snapshot)
            return
        session.state, session.snapshot = SessionState.PAUSED, snapshot
        session.vm_id, session.supervisor = "", None
        if session.end_reason:  # closed, drained or ended by an operator as it was saved
            return self._ended(session_id, session.end_reason)
        log.info("session %s of %s paused", session_id, session.owner)
        for ticket, request_id in session.pauses:
            self._answer(ticket, session_reply(request_id, session_id=session_id))
            self.metrics.session_snapshots.labels("pause", "ok").inc()
        session.pauses = []
        if not session.forking:
            return
        fork = table.forks.get(session.forking)  # None: it failed meanwhile; the session goes on all the same
        if not self._restore(session):
            log.warning("session %s stays paused: the pool could not be told to restore it", session_id)
            session.forking = 0
            if fork is not None:
                fork.waiting.discard(session_id)
        if fork is None:
            session.forking = 0
        else:
            self._restore_children(fork, snapshot)

    def _restore_children(self, fork: Fork, snapshot: Template) -> None:
        for child_id in fork.children:
            child = self.state.table.get(child_id)
            child.snapshot = snapshot
            if not self._restore(child):
                return self._fail_fork(fork, ErrorCode.UNAVAILABLE, "the pool is restarting; retry",
                                       retry_after_ms=1000)

    def _restore(self, session: Session) -> bool:
        """Tell the pool to restore a VM for `session` from its snapshot: it is
        RESUMING until the VM says SessionStarted (or SessionEnded). False if
        the pool cannot be told (it is restarting): nothing changed."""
        if not self.directory.tell("pool", RestoreSession(session.session_id, session.owner, session.snapshot,
                                                          session.capabilities, session.egress_allow)):
            return False
        session.state = SessionState.RESUMING
        session.restore_told = time.monotonic()
        return True

    def _restored(self, session: Session, message: SessionStarted) -> None:
        """A VM restored from its snapshot is `session`'s: it is OPEN (again)."""
        now = time.monotonic()
        snapshot, session.snapshot = session.snapshot, None
        session.state, session.restore_told = SessionState.OPEN, 0.0
        session.vm_id, session.supervisor = message.vm_id, message.supervisor
        session.last_active = now
        if not session.opened:  # a fork's new session: its lifetime counts from here
            session.opened = now
            session.ends_by = time.time() + session.life_s
        self._release(snapshot)
        fork = self._fork_waiting_on(session)
        if session.end_reason:  # closed, drained or ended by an operator as it was restored
            for ticket, request_id in session.resumes:
                self._answer(ticket, session_reply(
                    request_id, error_code=ErrorCode.SESSION_LOST,
                    error_message=f"session {session.session_id} was ended ({session.end_reason}) as it resumed"))
                self.metrics.session_snapshots.labels("resume", "failed").inc()
            session.resumes = []
            if fork is not None and session.session_id in fork.children:
                self._fail_fork(fork, ErrorCode.SESSION_LOST, f"a new session of the fork was ended "
                                f"({session.end_reason}) as it started; no new session is left")
            self._end(session, session.end_reason)
            return
        log.info("session %s of %s open on VM %s, restored", session.session_id, session.owner, session.vm_id)
        for ticket, request_id in session.resumes:
            self._answer(ticket, session_reply(request_id, session_id=session.session_id))
            self.metrics.session_snapshots.labels("resume", "ok").inc()
        session.resumes = []
        if session.forking and session.forking not in self.state.table.forks:
            session.forking = 0
        if fork is not None:
            fork.waiting.discard(session.session_id)
            self._fork_progress(fork)

    def _fork_waiting_on(self, session: Session) -> Fork | None:
        """The fork not answered yet that waits for `session` to be OPEN: its own, or one of it."""
        forks = self.state.table.forks
        fork = forks.get(session.fork_ticket) or forks.get(session.forking)
        return fork if fork is not None and session.session_id in fork.waiting else None

    def _fork_progress(self, fork: Fork) -> None:
        """Answer the fork once nothing it waits for is missing, listing its new sessions."""
        if fork.waiting:
            return
        table, now = self.state.table, time.monotonic()
        del table.forks[fork.ticket]
        children = [table.get(child_id) for child_id in fork.children]
        for child in children:
            child.fork_ticket = 0  # its owner's to see from now
        parent = table.get(fork.parent)
        if parent is not None and parent.forking == fork.ticket:
            parent.forking = 0
        log.info("session %s forked into %s", fork.parent, ", ".join(fork.children))
        self._answer(fork.ticket, session_reply(fork.request_id, session_id=fork.parent,
                                                sessions=tuple(listed(child, now) for child in children)))
        self.metrics.session_snapshots.labels("fork", "ok").inc()
        self.metrics.session_fork_seconds.observe(now - fork.arrived)

    def _fail_fork(self, fork: Fork, code: str, text: str, retry_after_ms: int = 0) -> None:
        """All or none: the fork is answered `code`, its new sessions are ended
        ("fork_failed"): at once if no VM is coming for them, else as it comes."""
        table = self.state.table
        if table.forks.pop(fork.ticket, None) is None:
            return
        log.info("fork of session %s failed: %s", fork.parent, text)
        parent = table.get(fork.parent)
        # A parent being saved for the fork still is restored after its save (_saved).
        if parent is not None and parent.forking == fork.ticket and parent.state != SessionState.PAUSING:
            parent.forking = 0
        self._answer(fork.ticket, session_reply(fork.request_id, session_id=fork.parent, error_code=code,
                                                error_message=text, retry_after_ms=retry_after_ms))
        self.metrics.session_snapshots.labels("fork", "failed").inc()
        for child_id in fork.children:
            child = table.get(child_id)
            if child is not None:
                self._end(child, "fork_failed")

    def _release(self, snapshot: Template | None) -> None:
        """Discard `snapshot` if no session needs it any more."""
        if snapshot is not None and self.state.table.snapshot_unused(snapshot):
            log.info("snapshot %s discarded", snapshot.directory)
            discard_snapshot(snapshot)

    def _owned_for(self, ticket: int, request, owner: str) -> Session | None:
        """The session a pause, resume or fork of `owner` is for; None once
        the request is answered: session_lost for one an earlier corrald's
        restart ended, session_not_found for an unknown id, another
        identity's and one that is ending; safe_mode after a SCRAM,
        draining while corrald drains."""
        session_id = request.session_id
        session = self.state.table.owned(session_id, owner)
        if session is None and self._ended_by_restart(session_id, owner):
            self._reply(ticket, request, ErrorCode.SESSION_LOST, f"session {session_id} ended when corrald restarted")
        elif (session is None or not session.seen or session.state == SessionState.CLOSING
              or session.end_reason):
            self._reply(ticket, request, ErrorCode.SESSION_NOT_FOUND, f"no session {session_id}")
        elif self.state.safe_mode:
            self._reply(ticket, request, ErrorCode.SAFE_MODE,
                        "corrald is in safe mode after a SCRAM; an operator must resume it")
        elif self.state.draining:
            self._reply(ticket, request, ErrorCode.DRAINING, "corrald is draining: it closes its sessions")
        else:
            return session
        return None

    @staticmethod
    def _busy(session: Session) -> str:
        """Why a pause, resume or fork of `session` must wait, or ""."""
        if session.state == SessionState.PAUSING:
            return f"session {session.session_id} is being paused; retry once it is"
        if session.state == SessionState.RESUMING:
            return f"session {session.session_id} is being resumed; retry once it is"
        if session.forking:
            return f"session {session.session_id} is being forked; retry once the fork is answered"
        if session.running:
            return f"an exec runs in session {session.session_id}; retry once it is answered"
        return ""

    def _reply(self, ticket: int, request, code: str = "", text: str = "", retry_after_ms: int = 0) -> None:
        """Answer a pause, resume or fork: ok (the session's id) or `code`."""
        self._answer(ticket, session_reply(request.request_id, session_id="" if code else request.session_id,
                                           error_code=code, error_message=text, retry_after_ms=retry_after_ms))

    # --- exec -----------------------------------------------------------------

    def _exec(self, message: SessionExec) -> None:
        task = message.task
        session_id = task.request.session_id
        session = self.state.table.owned(session_id, message.owner)
        if session is None and self._ended_by_restart(session_id, message.owner):
            return self._answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.SESSION_LOST, f"session {session_id} ended when corrald restarted"))
        if session is None or not session.seen or session.state == SessionState.CLOSING or session.end_reason:
            return self._answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.SESSION_NOT_FOUND, f"no session {session_id}"))
        if session.state == SessionState.PAUSED:
            return self._answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.SESSION_PAUSED, f"session {session_id} is paused; resume it first"))
        if session.state != SessionState.OPEN:
            return self._answer(task.ticket, error_reply(task.request.task_id, ErrorCode.SESSION_BUSY, (
                f"session {session_id} is being {'paused' if session.state == SessionState.PAUSING else 'resumed'}"
                "; retry once it is")))
        if self.state.safe_mode:
            return self._answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.CANCELLED_SCRAM,
                "an operator stopped corral (SCRAM) before this exec ran; retry after it resumes"))
        if self.state.draining:
            return self._answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.DRAINING,
                "corrald is draining: it runs no new execs and closes the session"))
        now = time.monotonic()
        if not send(session.supervisor, RunTask(task, assigned_at=now)):
            self._answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.SESSION_LOST, f"session {session_id} lost its VM"))
            return self._ended(session_id, "vm_lost")
        session.running += 1
        session.execs += 1
        session.last_active = now
        self.metrics.session_execs.inc()

    def _exec_done(self, session_id: str) -> None:
        session = self.state.table.get(session_id)
        if session is None:
            return
        session.running = max(0, session.running - 1)
        session.last_active = time.monotonic()
        if self.state.draining and not session.running and session.state == SessionState.OPEN:
            self._end(session, "draining")

    # --- end ------------------------------------------------------------------

    def _close(self, message: CloseSession) -> None:
        request = message.request
        session = self.state.table.owned(request.session_id, message.owner)
        if session is None and self._ended_by_restart(request.session_id, message.owner):
            return self._answer(message.ticket, session_reply(
                request.request_id, error_code=ErrorCode.SESSION_LOST,
                error_message=f"session {request.session_id} ended when corrald restarted"))
        if session is None or not session.seen:
            return self._answer(message.ticket, session_reply(
                request.request_id, error_code=ErrorCode.SESSION_NOT_FOUND,
                error_message=f"no session {request.session_id}"))
        session.closes.append((message.ticket, request.request_id))
        self._end(session, "closed")  # a PAUSED one at once; a PAUSING or RESUMING one as that is over

    def _end(self, session: Session, reason: str) -> None:
        """Have the session's VM destroyed; it leaves the table at SessionEnded.
        An OPENING or RESUMING one ends as soon as its VM comes (_started), a
        PAUSING one once saved (_saved); a PAUSED one, or a fork's new one
        whose restore was never told, has no VM: it ends now."""
        if session.state == SessionState.CLOSING:
            return  # on its way out already, for its first reason
        session.end_reason = session.end_reason or reason
        if session.state == SessionState.PAUSED or (session.state == SessionState.RESUMING
                                                    and not session.restore_told):
            return self._ended(session.session_id, session.end_reason)
        if session.state in (SessionState.OPENING, SessionState.PAUSING, SessionState.RESUMING):
            return
        session.state = SessionState.CLOSING
        log.info("ending session %s of %s: %s", session.session_id, session.owner, session.end_reason)
        if not send(session.supervisor, EndSession(session.end_reason)):
            self._ended(session.session_id, "vm_lost")

    def _vm_ended(self, session_id: str, reason: str) -> None:
        """A Supervisor says its VM, the session's, is gone."""
        session = self.state.table.get(session_id)
        if session is not None and session.state == SessionState.PAUSED:
            # A paused session has no VM: this is about one it no longer holds.
            log.warning("session %s is paused: a VM of it ending (%s) ends nothing", session_id, reason)
            return
        self._ended(session_id, reason)

    def _ended(self, session_id: str, reason: str) -> None:
        table = self.state.table
        session = table.remove(session_id)
        if session is None:
            return
        reason = session.end_reason or reason
        log.info("session %s of %s ended: %s", session_id, session.owner, reason)
        if reason == "shutdown" and session.seen:
            # It ends with this corrald: the next one answers its owner session_lost.
            self.state.stopped[session_id] = Remembered(session_id, session.owner, session.ends_by)
        if session.state == SessionState.OPENING:  # its VM went before it was the session's
            self._answer(session.open_ticket, session_reply(
                session.open_request_id, error_code=ErrorCode.SESSION_LOST,
                error_message=f"the session's VM was lost as it opened ({reason})"))
            return
        for op, waiting in (("pause", session.pauses), ("resume", session.resumes)):
            for ticket, request_id in waiting:
                self._answer(ticket, session_reply(
                    request_id, error_code=ErrorCode.SESSION_LOST,
                    error_message=f"session {session_id} ended ({reason}) as it was being {op}d"))
                self.metrics.session_snapshots.labels(op, "failed").inc()
        fork = table.forks.get(session.fork_ticket) or table.forks.get(session.forking)
        if fork is not None:
            if session_id in fork.children:
                self._fail_fork(fork, ErrorCode.SESSION_LOST,
                                f"a new session of the fork did not start ({reason}); no new session is left")
            elif session.state == SessionState.PAUSING:  # the parent, lost before anything was restored
                self._fail_fork(fork, ErrorCode.SESSION_LOST,
                                f"session {session_id} was lost as it was saved for the fork ({reason})")
            else:  # the parent, lost after its save: the new sessions go on from its snapshot
                fork.waiting.discard(session_id)
                self._fork_progress(fork)
        if session.opened:  # not a fork's new session that never started
            self.metrics.sessions_ended.labels(reason).inc()
            self.metrics.session_lifetime_seconds.observe(time.monotonic() - session.opened)
        self._release(session.snapshot)  # before the close is answered: gone by then
        for ticket, request_id in session.closes:
            self._answer(ticket, session_reply(request_id, session_id=session_id))

    # --- time, modes ----------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        table = self.state.table
        for session in table.stale_opens(now, self.limits.open_timeout_s):
            table.remove(session.session_id)
            self._answer(session.open_ticket, session_reply(
                session.open_request_id, error_code=ErrorCode.UNAVAILABLE, retry_after_ms=1000,
                error_message=f"no VM became the session's within {self.limits.open_timeout_s:g} s; retry later"))
        for session in table.stale_restores(now, self.limits.restore_timeout_s):
            log.warning("no VM restored for session %s said it started within %g s: taken as failed",
                        session.session_id, self.limits.restore_timeout_s)
            self._ended(session.session_id, "restore_failed")
        # A Supervisor found dead on two ticks running went without a word
        # (one that says SessionEnded and stops may be dead a tick before it is read).
        # None is judged while the pool is gone: corrald is stopping (each Supervisor,
        # dead to is_alive() as it stops, destroys its VM, seconds, then says
        # SessionEnded "shutdown") or the pool is being restarted.
        pool = self.directory.get("pool")
        silent = set() if pool is None or not pool.is_alive() else {
            sid for sid, s in table.sessions.items() if s.supervisor is not None and not s.supervisor.is_alive()}
        for session_id in silent & self.state.silent:
            self._ended(session_id, "vm_lost")
        self.state.silent = silent
        now_wall = time.time()
        for session_id in [i for i, r in self.state.restarted.items() if r.until <= now_wall]:
            del self.state.restarted[session_id]  # its lifetime would be over: it is unknown now
        if not self.state.safe_mode:  # a frozen session is kept for inspection, whatever its clocks say
            for session_id, reason in table.due(now):
                self._end(table.sessions[session_id], reason)
        self.timers.call_later(self.tick_s, self.actor_ref, Tick())

    def _resume(self) -> None:
        if self.state.safe_mode:
            self.state.table.stop_idle_clocks(time.monotonic() - self.state.safe_since)
        self.state.safe_mode = False
        self.state.draining = False

    def _drain(self) -> None:
        """No new work: forks not answered fail, each session ends once its
        running execs are answered (a paused one now)."""
        self.state.draining = True
        table = self.state.table
        for fork in list(table.forks.values()):
            self._fail_fork(fork, ErrorCode.DRAINING, "corrald is draining: the fork's new sessions were closed")
        for session_id in list(table.sessions):
            session = table.get(session_id)
            if session is not None and (session.state != SessionState.OPEN or not session.running):
                self._end(session, "draining")

    # --- plumbing -------------------------------------------------------------

    def _answer(self, ticket: int, reply) -> None:
        self.directory.answer(ticket, reply)

    def _publish(self) -> None:
        table = self.state.table
        self.view.sessions = table.summaries()
        states = [s.state for s in table.sessions.values()]
        self.metrics.sessions_open.set(sum(1 for s in states if s in HOLDING_A_VM))
        self.metrics.sessions_paused.set(states.count(SessionState.PAUSED))

    # --- the record that outlives corrald -------------------------------------

    def _take_over_record(self) -> None:
        """Read what the previous corrald left: its open sessions ended with it."""
        past = self.record.read()
        now_wall = time.time()
        for entry in past.open:
            log.info("session %s of %s ended when corrald restarted", entry.session_id, entry.owner)
        if past.open:
            self.metrics.sessions_ended.labels("restart").inc(len(past.open))
        self.state.restarted = remembered_now(past.open + past.lost, now_wall, self.limits.max_life_s)
        self._save()

    def _ended_by_restart(self, session_id: str, owner: str) -> bool:
        """Whether `owner`'s session `session_id` ended with an earlier corrald.
        Another identity's is unknown to it, as if never opened."""
        entry = self.state.restarted.get(session_id)
        return entry is not None and entry.owner == owner and entry.until > time.time()

    def _save(self) -> None:
        """Rewrite the record if what it should hold changed: the sessions open
        (paused, closing, ...: each its owner knows) and those ended as this
        corrald stops, and those ended by earlier restarts."""
        if self.record is None:
            return
        open_now = [Remembered(s.session_id, s.owner, s.ends_by) for s in self.state.table.sessions.values()
                    if s.seen]
        open_now += self.state.stopped.values()
        # After the take-over `restarted` only shrinks: its size says whether it changed.
        recorded = (frozenset(r.session_id for r in open_now), len(self.state.restarted))
        if recorded == self.state.recorded:
            return
        self.state.recorded = recorded  # one that failed is tried again at the next change, not on every tick
        self.record.write(open_now, list(self.state.restarted.values()))

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # The table and the messages still queued go to the successor; the
        # message that failed is answered rather than tried again.
        failed, self.handling = self.handling, None
        if isinstance(failed, SESSION_REQUESTS):
            self._answer(failed.ticket, session_reply(
                failed.request.request_id, error_code=ErrorCode.UNAVAILABLE, retry_after_ms=1000,
                error_message="corrald's sessions actor failed on this request; retry"))
        elif isinstance(failed, SessionExec):
            self._answer(failed.task.ticket, error_reply(
                failed.task.request.task_id, ErrorCode.UNAVAILABLE,
                "corrald's sessions actor failed on this exec; retry", retry_after_ms=1000))
        self.state.inbox += [m for m in drain_inbox(self) if isinstance(m, CARRIED_OVER)]
        self.directory.tell("root", ChildFailed("sessions", repr(exception_value), salvage=self.state))

    def on_stop(self) -> None:
        """Shutdown: the PoolManager stops every VM (and answers execs); what
        Sessions still owes an answer is answered here."""
        table = self.state.table
        for message in drain_inbox(self):
            if isinstance(message, SessionEnded):
                self._ended(message.session_id, message.reason)
            elif isinstance(message, SessionSaved):  # its session ends with corrald: nothing restores from it
                discard_snapshot(message.snapshot)
        for fork in list(table.forks.values()):
            table.forks.pop(fork.ticket)
            self._answer(fork.ticket, session_reply(fork.request_id, error_code=ErrorCode.SESSION_LOST,
                                                    error_message="corrald stopped before the fork's new "
                                                                  "sessions started"))
        snapshots = {s.snapshot.directory: s.snapshot for s in table.sessions.values() if s.snapshot is not None}
        for session in list(table.sessions.values()):
            table.remove(session.session_id)
            if not session.seen:
                continue  # an open's claiming task is the Scheduler's to answer; a fork's new one, the fork's
            if not session.closes:  # its VM (or snapshot) goes with corrald: it ends with the restart
                self.state.stopped[session.session_id] = Remembered(session.session_id, session.owner,
                                                                    session.ends_by)
            for ticket, request_id in session.closes:
                self._answer(ticket, session_reply(request_id, session_id=session.session_id))
            for op, waiting in (("paused", session.pauses), ("resumed", session.resumes)):
                for ticket, request_id in waiting:
                    self._answer(ticket, session_reply(
                        request_id, error_code=ErrorCode.SESSION_LOST,
                        error_message=f"corrald stopped as session {session.session_id} was being {op}"))
        for snapshot in snapshots.values():
            discard_snapshot(snapshot)
        self._publish()
        self._save()

