"""Messages between corrald's actors: small, named, immutable.

Every actor receives them with `tell` (never `ask` + `.get()` inside a
handler), so no actor ever waits on another. Who sends what to whom is in each
class's docstring.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import pykka

from actors.vm.tiers import DEFAULT_TIER, Tier
from protocol.channel import codec
from protocol.wire.tasks import (SessionClose, SessionFork, SessionList, SessionOpen, SessionPause, SessionResume,
                                 TaskReply, TaskRequest)

if TYPE_CHECKING:
    from actors.vm.snapshots import Template


@dataclass(frozen=True)
class SessionClaim:
    """On the Task that opens a session: the VM that runs it becomes the
    session's (it runs the task's `true`, then keeps its state for the session)."""

    session_id: str
    owner: str  # the identity that opened it


@dataclass(frozen=True)
class Task:
    """An accepted request. `ticket` is Intake's unique key for the one answer."""

    ticket: int
    request: TaskRequest
    accepted_at: float  # monotonic
    claim: SessionClaim | None = None  # this task opens a session (Sessions made it)
    identity: str = ""  # who asked (Intake's admission): the egress audit log names it

    @property
    def priority(self) -> int:
        return self.request.priority


# --- Intake, Scheduler ---------------------------------------------------------

@dataclass(frozen=True)
class Submit:
    """Intake -> Scheduler: queue an accepted task."""

    task: Task


@dataclass(frozen=True)
class Requeue:
    """Supervisor -> Scheduler: a task assigned to a VM that could not start it
    (the VM died before the command began); it goes back to the head of its level."""

    task: Task


@dataclass(frozen=True)
class Answer:
    """Anyone -> Intake: the one answer for a ticket (later ones are dropped)."""

    ticket: int
    reply: TaskReply


# --- streams: a task's live output and stdin (issue 14) ------------------------

@dataclass(frozen=True)
class TaskStarted:
    """Supervisor -> Intake: the command of a task with stream or stdin_open is
    about to start on this VM: stdin and reader holds for `ticket` go to
    `supervisor` from now on, until the ticket's Answer."""

    ticket: int
    supervisor: pykka.ActorRef


@dataclass(frozen=True)
class OutputChunk:
    """Supervisor -> Intake: a chunk of a streaming task's output, as the guest
    sent it (in order per stream; `offset` is the stream's bytes before it).
    The ticket's Answer comes after its last chunk, through the same inbox."""

    ticket: int
    stream: int  # 1 stdout, 2 stderr
    offset: int
    data: bytes


@dataclass(frozen=True)
class StdinChunk:
    """IntakeServer -> Supervisor: more stdin for the command of `ticket`;
    `eof`: none after this."""

    ticket: int
    data: bytes
    eof: bool


@dataclass(frozen=True)
class ReaderHold:
    """IntakeServer -> Supervisor: the caller of `ticket` is behind (held:
    corrald holds as much of its output as it may) or has caught up: stop or
    resume reading the VM's channel (ChannelHold reason "reader")."""

    ticket: int
    held: bool


# --- sessions (issue 15) --------------------------------------------------------
# The Sessions actor (actors/sessions.py) answers each ticket it is given with
# Answer(ticket, SessionReply) or, for an exec, Answer(ticket, TaskReply).

@dataclass(frozen=True)
class OpenSession:
    """IntakeServer -> Sessions: an accepted SessionOpen from identity `owner`
    (checked and charged like a task of its capabilities). Sessions answers
    `ticket` SessionReply(session_id) once the session's VM is its, or an error."""

    ticket: int
    request: SessionOpen
    owner: str


@dataclass(frozen=True)
class CloseSession:
    """IntakeServer -> Sessions: `owner` closes one of its sessions; `ticket`
    is answered once the session's VM is gone (session_not_found for an
    unknown id or another identity's)."""

    ticket: int
    request: SessionClose
    owner: str


@dataclass(frozen=True)
class ListSessions:
    """IntakeServer -> Sessions: `owner`'s sessions, answered at once."""

    ticket: int
    request: SessionList
    owner: str


@dataclass(frozen=True)
class SessionOpenFailed:
    """IntakeServer -> Sessions: the open of `ticket` was answered with an
    error someone else posted (the Scheduler's busy, unavailable or
    cancelled_scram; a VM that failed under its claiming task; corrald
    stopping): the session will never start, Sessions forgets it."""

    ticket: int


@dataclass(frozen=True)
class CloseSessionAsOperator:
    """Control -> Sessions: end this session whoever owns it (reason "operator")."""

    session_id: str


@dataclass(frozen=True)
class SessionExec:
    """IntakeServer -> Sessions: an accepted exec in a session
    (task.request.session_id), from identity `owner`; Sessions hands it to the
    session's Supervisor as a RunTask, or answers it session_not_found."""

    task: Task
    owner: str


@dataclass(frozen=True)
class SessionStarted:
    """Supervisor -> Sessions: the VM that ran a claiming task is the
    session's now; execs go to `supervisor`."""

    session_id: str
    vm_id: str
    supervisor: pykka.ActorRef


@dataclass(frozen=True)
class SessionExecDone:
    """Supervisor -> Sessions: an exec of this session was answered (idle time
    counts from here). One for each RunTask Sessions told the Supervisor,
    whatever the answer, until SessionEnded: Sessions counts the execs
    running, and a session with one running is never idle."""

    session_id: str


@dataclass(frozen=True)
class EndSession:
    """Sessions -> Supervisor: end the session (closed, idle, lifetime, budget,
    operator, draining): execs still running are answered session_lost, the VM
    is destroyed."""

    reason: str


@dataclass(frozen=True)
class SessionEnded:
    """Supervisor -> Sessions: the session's VM is gone (after EndSession, or on
    its own: deadman, vm_lost, protocol violation); `reason` says which."""

    session_id: str
    reason: str


# --- session snapshots: pause to disk, resume, fork ------------------------------
# A session's VM is saved whole (libvirt's save: memory, devices) into a
# snapshot of its own (a Template in actors/vm/snapshots.py, under
# <state_dir>/sessions/snapshots), and VMs are restored from it as clones with
# their own name, randomness, clock and sequence bases, as refill's are.

@dataclass(frozen=True)
class PauseSession:
    """IntakeServer -> Sessions: `owner` pauses one of its sessions to disk."""

    ticket: int
    request: SessionPause
    owner: str


@dataclass(frozen=True)
class ResumeSession:
    """IntakeServer -> Sessions: `owner` resumes one of its paused sessions."""

    ticket: int
    request: SessionResume
    owner: str


@dataclass(frozen=True)
class ForkSession:
    """IntakeServer -> Sessions: `owner` forks one of its sessions into
    request.count new ones (count checked by the IntakeServer: 1..MAX_FORKS)."""

    ticket: int
    request: SessionFork
    owner: str


@dataclass(frozen=True)
class SaveSession:
    """Sessions -> Supervisor (a session's, no exec running): save the VM to
    a snapshot on disk; the domain is gone after it. The Supervisor then ends
    (the pool told gone, reason "session_saved") and says SessionSaved; a save
    that fails ends the session as lost (SessionEnded, "save_failed")."""


@dataclass(frozen=True)
class SessionSaved:
    """Supervisor -> Sessions: the session's VM was saved into `snapshot` and
    is gone; Sessions owns the snapshot now (restores from it, removes it)."""

    session_id: str
    snapshot: Template


@dataclass(frozen=True)
class RestoreSession:
    """Sessions -> PoolManager: start a VM for session `session_id`, restored
    from `snapshot` (a resume, a fork's new session, or the forked session
    itself). The pool starts its Supervisor outside the pool's size (a
    session's from the start); the Supervisor restores the clone, sends it a
    Resume (fresh entropy, clock, sequence bases) and, once it is answered,
    runs as the session's (VmPhase.SESSION) with these capabilities and egress
    rules: it says SessionStarted as a claim's VM does. A restore that fails
    says SessionEnded(session_id, "restore_failed")."""

    session_id: str
    owner: str
    snapshot: Template
    capabilities: tuple  # the session's, fixed when it opened; the tier follows from them
    egress_allow: tuple = ()


# --- PoolManager, Scheduler, Supervisor ----------------------------------------

@dataclass(frozen=True)
class VmAvailable:
    """PoolManager -> Scheduler: a warm, paused VM can take a task."""

    vm_id: str
    supervisor: pykka.ActorRef  # the VM's Supervisor
    tier: Tier = DEFAULT_TIER  # the hard capabilities it was booted with


@dataclass(frozen=True)
class TierDemand:
    """Scheduler -> PoolManager: tasks waiting per hardware tier other than the
    default, ((tier, count), ...), sent when it changes; the pool boots VMs for them."""

    waiting: tuple


@dataclass(frozen=True)
class VmWithdrawn:
    """PoolManager -> Scheduler: forget an available VM (retired, shed, dead)."""

    vm_id: str


@dataclass(frozen=True)
class RunTask:
    """Scheduler -> Supervisor: run this task now."""

    task: Task
    assigned_at: float  # monotonic


class PoolVmState(StrEnum):
    """A VM as the PoolManager sees it (VmState.state): coarser than the
    Supervisor's phases. The values are also the `state` label of the pool's
    metrics and what `corral status` shows."""

    BOOTING = "booting"
    READY = "ready"  # offered to the Scheduler
    BUSY = "busy"  # a task is on it
    RESETTING = "resetting"
    SESSION = "session"  # held by a session: not counted in the pool's size, replaced at once
    GONE = "gone"  # destroyed: the pool forgets it


@dataclass(frozen=True)
class VmState:
    """Supervisor -> PoolManager: the VM moved to `state`. `reason` says why it
    is gone: retired, boot_failed, protocol_violation, deadman, vm_lost, shed, ...
    `last_task` (with BUSY): the task on it is its last, the VM ends after it;
    the pool boots its replacement now."""

    vm_id: str
    state: PoolVmState
    reason: str = ""
    last_task: bool = False


@dataclass(frozen=True)
class Retire:
    """PoolManager/Watchdog -> Supervisor: destroy this VM when idle (now if idle)."""

    reason: str


# --- IOGuard -------------------------------------------------------------------

@dataclass(frozen=True)
class Watch:
    """Supervisor -> IOGuard: start reading this VM's channel."""

    vm_id: str
    sock: socket.socket
    supervisor: pykka.ActorRef  # where what the guest says goes
    # Sequence id of the guest's next frame: 0 on a fresh boot; a restored VM's
    # link hands over its rebased count (GuestLink.decoder.expected_seq after resume).
    first_seq: int = 0

    def __post_init__(self) -> None:  # the sender's bug, raised at the sender, not in IOGuard's thread
        if not isinstance(self.first_seq, int) or not 0 <= self.first_seq <= 0xFFFFFFFF:
            raise ValueError(f"first_seq must be an int in [0, 2**32), got {self.first_seq!r}")


@dataclass(frozen=True)
class Unwatch:
    """Supervisor -> IOGuard: stop reading this VM's channel and forget it."""

    vm_id: str


@dataclass(frozen=True)
class ChannelHold:
    """Supervisor -> IOGuard: stop (`held`) or resume reading this VM's channel
    for `reason`: "paused" (the host paused the VM for a SCRAM) or "reader" (a
    streaming task's caller is behind). Reading resumes when no reason holds;
    a frame in progress does not count held time against its stall deadline,
    since the guest cannot send then."""

    vm_id: str
    held: bool
    reason: str = "paused"


@dataclass(frozen=True)
class GuestSaid:
    """IOGuard -> Supervisor: one verified, decoded guest message."""

    vm_id: str
    message: codec.Message


@dataclass(frozen=True)
class ChannelFailed:
    """IOGuard -> Supervisor: the channel broke (`code` vm_lost) or the guest
    violated the protocol (`code` is the ProtocolError's code)."""

    vm_id: str
    code: str
    detail: str
    violation: bool


# --- timers, health, faults ----------------------------------------------------

@dataclass(frozen=True)
class DeadlinePassed:
    """Timer -> Supervisor: the deadline armed for `phase` (a VmPhase of
    actors/supervisor.py) with `token` has passed; stale tokens are ignored."""

    phase: str
    token: int


@dataclass(frozen=True)
class Tick:
    """Timer -> an actor: do periodic work (retire old VMs, replenish, health)."""


@dataclass(frozen=True)
class BackoffOver:
    """Timer -> PoolManager: the wait after a failed boot has passed; boot again."""


@dataclass(frozen=True)
class HostMemory:
    """Watchdog -> PoolManager, each tick: `short` -> destroy one idle VM and
    stay one smaller; not short -> grow back by one VM."""

    short: bool


@dataclass(frozen=True)
class InjectFault:
    """Tests/operators -> an actor: kill_qemu, hang_guest, drop_libvirt,
    corrupt_frame (IOGuard: flip a bit in the next frame read from `vm_id`), crash."""

    kind: str
    vm_id: str = ""


@dataclass(frozen=True)
class ChildFailed:
    """A core actor's on_failure -> Root: restart me; `salvage` is the state my
    successor takes over so no accepted task is lost."""

    name: str
    error: str
    salvage: Any = None


# --- operators (control plane) -------------------------------------------------

@dataclass(frozen=True)
class Scram:
    """Control -> Scheduler, PoolManager, Sessions: enter safe mode. The
    Scheduler answers every queued task `cancelled_scram` and holds new ones
    off; the PoolManager freezes every VM (session VMs too) and boots none;
    Sessions answers execs still reaching it `cancelled_scram` and stops its
    idle clocks."""

    reason: str


@dataclass(frozen=True)
class ResumeService:
    """Control -> Scheduler, PoolManager, Sessions: leave safe mode (or
    draining), serve again."""


@dataclass(frozen=True)
class Drain:
    """Control -> Sessions: corrald takes no new work; close each session once
    its running execs are answered (reason "draining")."""


@dataclass(frozen=True)
class Freeze:
    """PoolManager -> Supervisor: pause the VM whatever it is doing and stop its
    deadlines' clocks (a paused guest cannot be late)."""


@dataclass(frozen=True)
class Thaw:
    """PoolManager -> Supervisor: undo Freeze; deadlines resume where they stopped."""


@dataclass(frozen=True)
class SetPoolSize:
    """Control -> PoolManager: keep `size` warm VMs (idle ones retire to shrink)."""

    size: int
