"""Supervisor: one per VM. Owns its libvirt domain, overlay and channel; runs
one task at a time (a session's VM: its execs, several at once); enforces the
dead-man's switch.

Life of a VM:  booting --Hello--> settling (offered, running) --settle time--> ready
(offered, paused) --RunTask--> acquiring (resumed, Heartbeat sent) --HeartbeatAck-->
running (PutFiles, Exec sent) --Exit--> [collecting (Collect sent) --last Collected-->]
resetting (Reset sent) --ResetDone--> settling ... and from anywhere: gone. A
session's claim goes running --Exit 0--> session (below) instead. A
RunTask also takes a settling VM, without a resume. Settling lets the guest
finish the clean-up its boot or reset queued before it is paused, so that work
does not slow the next acquire (pool.settle_ms).

A VM restored from a snapshot template (actors/refill.py makes it) starts
differently: resuming (Resume sent: the host's clock, fresh entropy, random
sequence bases) --ResumeDone--> warming (Exec `true` sent: the first command
after a restore is slow, TCG's code cache is empty) --Exit 0--> settling, as a
booted VM after its Hello. A clone that fails before that ends as
restore_failed, and its tier's next refills boot (Refill.restore_failed).

Every state has an allow-list of what the guest may send (default deny) and
a deadline. A violation, a deadline passed or a lost channel ends the VM:
destroyed, overlay deleted, the PoolManager told (it boots a replacement),
and a task that was on it answered with a clear error code. A task whose VM
died before its command started goes back to the Scheduler instead.

An operator's SCRAM freezes the VM (Freeze): its domain is paused whatever
it was doing and its deadline stops counting, since a paused guest cannot be
late, and so does IOGuard's stall clock of a frame it was sending
(ChannelHold); Thaw resumes all three. A ready VM is always paused, so Thaw
leaves it so.

A task with `stream` or `stdin_open` talks to its caller while its command
runs. Just before the Exec the Supervisor tells Intake TaskStarted (its own
ref), so the caller's edge can send it stdin (StdinChunk, forwarded to the guest
as Stdin while the command runs, dropped otherwise) and hold the VM's channel
while the caller is behind (ReaderHold -> IOGuard ChannelHold "reader"). A
streaming task's output goes to Intake chunk by chunk (OutputChunk), in the
guest's order and within the output cap, and none is kept: its answer, after
the last chunk through the same inbox, carries only the truncation flags.
Every chunk must start where its stream ended (Output.offset) and belong to
the running exec; one after its exec's Exit is a violation too.

A task that carries a session's claim (Task.claim: Sessions made it, its
command is `true`) runs as any task; when it exits 0 the VM becomes the
session's instead of being reset: session phase (VmPhase.SESSION), the pool
told (it replaces the VM at once, never offers it again), Sessions told
SessionStarted with this actor's ref, and the claim's ticket left to Sessions
to answer. A claim whose `true` fails is answered guest_error and the VM
ends. The VM then runs between execs (background processes live on), with the
claim's capabilities and egress rules for its whole life. Each exec
(RunTask from Sessions) starts at once, with no heartbeat or resume, and
several may run together, keyed by exec_id; each has its own timeout (the
agent kills its process group, the reply says timeout, the session lives
on), its own dead-man's deadline (timeout + grace: the VM is destroyed),
stdin, streaming and files as a task's, and after its answer one
SessionExecDone. The session ends by EndSession (Sessions: closed, idle,
lifetime, operator, draining), or when its VM dies (dead-man's switch, lost
channel, protocol violation): every exec still running is answered
session_lost, the VM destroyed, the pool told gone and Sessions told
SessionEnded with the reason. An exec answered at the session's end owes no
SessionExecDone: the SessionEnded settles it.

Session snapshots. SaveSession (no exec running) saves the session's VM:
IOGuard's watch and the egress port ended, the channel closed (the agent
sees the host leave, as for a template), then libvirt's save with the
channel's next sequences; the VM is gone after it, the pool told gone
(session_saved), and Sessions told SessionSaved with the snapshot instead of
SessionEnded. A save that fails loses the session (save_failed). A Supervisor
started with `restore` (RestoreSession, from the pool) is a session's from
birth, outside the pool's size: restoring (the snapshot restored as a clone,
its Resume sent) --ResumeDone--> session (the session's CPU and egress rules
set, Sessions told SessionStarted), with no warm-up; any failure before that
ends it and tells Sessions SessionEnded(restore_failed). Never through the
Refill: a session's snapshot is no template of the pool's. A reader that falls behind
holds the whole channel, so all of the session's running execs wait with it.

Blocking libvirt calls happen here, in this VM's own actor thread, so a slow
hypervisor stalls one VM, never the others (and so does making the VM: a
restore, a template build, a boot). So do pause and resume, through
the VM's own QMP connection where it has one (actors/vm/qmp.py). Reading the
channel is IOGuard's. The answer built from what the VM reported is
actors/replies.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pykka

from actors.artifacts.files import Collection, FileSettings
from actors.artifacts.signing import Signer
from actors.directory import Directory, drain_inbox
from actors.egress.proxy import EgressProxy, TaskEgress, task_env
from actors.egress.rules import parse_rules
from actors.errors import CorralError
from actors.refill import NewVm, Refill
from actors.vm.errors import RestoreFailed
from actors.vm.guest_link import CappedOutput, GuestLink
from actors.vm.host import TEMPLATE_CLOSE_S, Hypervisor
from actors.messages import (ChannelFailed, ChannelHold, DeadlinePassed, EndSession, Freeze, GuestSaid, InjectFault,
                             OutputChunk, PoolVmState, ReaderHold, Requeue, RestoreSession, Retire, RunTask,
                             SaveSession, SessionClaim, SessionEnded, SessionExecDone, SessionSaved, SessionStarted,
                             StdinChunk, Task, TaskStarted, Thaw, Unwatch, VmState, Watch)
from actors.edge.metrics import Metrics
from actors.replies import exit_reply, whole_ms, with_files
from actors.vm.snapshots import Template
from actors.vm.tiers import DEFAULT_TIER, Tier, wants_high_cpu
from actors.timers import Timers
from config import Config
from protocol.channel import codec
from protocol.channel import messages as guest
from protocol.channel.constants import MAX_STDIN, MAX_STDIN_CHUNK
from protocol.channel.errors import OutputAfterExit, OutputOutOfOrder, ProtocolError, WrongExec
from protocol.wire import outcomes
from protocol.channel.capabilities import soft_bits
from protocol.wire.tasks import ErrorCode, TaskReply, error_reply

log = logging.getLogger("corral.supervisor")
SEND_TIMEOUT_S = 5.0


class VmPhase(StrEnum):
    """Where a VM is in its life (the cycle is drawn above); logs say the value."""

    BOOTING = "booting"
    RESUMING = "resuming"  # a restored clone: Resume sent, its ResumeDone awaited
    WARMING = "warming"  # a restored clone: its warm-up command runs
    SETTLING = "settling"
    READY = "ready"
    ACQUIRING = "acquiring"
    RUNNING = "running"
    COLLECTING = "collecting"
    RESETTING = "resetting"
    SESSION = "session"  # a session's: runs its execs, several at once, until the session ends
    RESTORING = "restoring"  # a session's from birth, restored from its snapshot: its ResumeDone awaited
    GONE = "gone"


# What the PoolManager is told of each phase. Settling is ready to the pool:
# offered, only not yet paused.
POOL_STATE_OF = {
    VmPhase.BOOTING: PoolVmState.BOOTING,
    VmPhase.RESUMING: PoolVmState.BOOTING,
    VmPhase.WARMING: PoolVmState.BOOTING,
    VmPhase.SETTLING: PoolVmState.READY,
    VmPhase.READY: PoolVmState.READY,
    VmPhase.ACQUIRING: PoolVmState.BUSY,
    VmPhase.RUNNING: PoolVmState.BUSY,
    VmPhase.COLLECTING: PoolVmState.BUSY,
    VmPhase.RESETTING: PoolVmState.RESETTING,
    VmPhase.SESSION: PoolVmState.SESSION,
    VmPhase.RESTORING: PoolVmState.SESSION,  # outside the pool's size from the start
    VmPhase.GONE: PoolVmState.GONE,
}

ALLOWED = {
    VmPhase.BOOTING: frozenset({guest.Hello}),
    # Error: the agent refused the Resume or could not apply it.
    VmPhase.RESUMING: frozenset({guest.ResumeDone, guest.Error}),
    VmPhase.WARMING: frozenset({guest.Exit, guest.Error}),  # `true` prints nothing
    VmPhase.READY: frozenset(),
    VmPhase.ACQUIRING: frozenset({guest.HeartbeatAck}),
    VmPhase.RUNNING: frozenset({guest.Output, guest.Exit, guest.Error}),
    VmPhase.COLLECTING: frozenset({guest.Collected}),
    # The host resets only after the command's Exit, and the agent sends all
    # of a command's Output before its Exit: nothing of it may follow.
    VmPhase.RESETTING: frozenset({guest.ResetDone}),
    VmPhase.SETTLING: frozenset(),
    # Of the execs running (each checked against its exec_id) and those collecting.
    VmPhase.SESSION: frozenset({guest.Output, guest.Exit, guest.Error, guest.Collected}),
    VmPhase.RESTORING: frozenset({guest.ResumeDone, guest.Error}),
}
# Before the VM is first offered: a boot waits for its Hello, a clone answers its Resume and warm-up.
STARTING = (VmPhase.BOOTING, VmPhase.RESUMING, VmPhase.WARMING)
CLONE_STARTING = (VmPhase.RESUMING, VmPhase.WARMING)
# Guest errors that mean "this command was not started" (code -> text before the
# agent's message): the task is answered with the code, the VM lives on.
REFUSED_IN_GUEST = {ErrorCode.PUT_FAILED: "a file could not be put into the VM: ",
                    ErrorCode.MISSING_CAPABILITY: ""}


@dataclass(frozen=True)
class VmSettings:
    boot_timeout_s: float
    acquire_timeout_s: float
    reset_timeout_s: float
    deadman_grace_s: float  # assigned longer than timeout + this: destroy
    max_uses: int
    max_age_s: float
    strict: bool  # one task per VM, never reused
    settle_s: float = 0.0  # runs idle this long after Hello or Reset before it is paused
    files: FileSettings | None = None  # caps and signer for files in and out
    default_soft_bits: int = 0  # soft capabilities every task holds unasked (tasks.default_capabilities)
    large_memory_mib: int = 4096  # the res:large_mem tier's memory
    cpu: tuple[int, int] = (1024, 50)  # (shares, quota %) of default tasks
    high_cpu: tuple[int, int] = (4096, 0)  # ... of res:high_cpu tasks

    @classmethod
    def from_config(cls, cfg: Config, signer: Signer | None) -> VmSettings:
        pool, vm, tasks, artifacts = cfg.pool, cfg.vm, cfg.tasks, cfg.artifacts
        return cls(
            boot_timeout_s=vm.boot_timeout_s, acquire_timeout_s=pool.acquire_timeout_s,
            reset_timeout_s=pool.reset_timeout_s, deadman_grace_s=tasks.deadman_grace_s,
            settle_s=pool.settle_ms / 1000,
            max_uses=pool.max_uses, max_age_s=pool.max_age_s, strict=pool.strict,
            files=FileSettings(max_put_bytes=artifacts.max_put_bytes,
                               max_collect_bytes=artifacts.max_collect_bytes,
                               collect_timeout_s=artifacts.collect_timeout_s, signer=signer),
            default_soft_bits=soft_bits(tasks.default_capabilities),
            large_memory_mib=vm.large_memory_mib,
            cpu=(vm.cpu_shares, vm.cpu_quota_pct),
            high_cpu=(vm.high_cpu_shares, vm.high_cpu_quota_pct))


@dataclass
class RunningTask:
    task: Task
    assigned_at: float
    output: CappedOutput
    exec_id: int = 0
    acquired_at: float = 0.0
    reply: TaskReply | None = None  # the command's result while its files are collected
    collection: Collection | None = None
    stdin_sent: int = 0  # bytes of stdin given to the guest, Exec.stdin included
    stdin_closed: bool = True  # no more stdin goes to the command (no stdin_open, or eof sent)
    stdin_held: list = field(default_factory=list)  # (data, eof) that came while the VM was frozen
    reader_held: bool = False  # this task's caller is behind: IOGuard holds the channel for it ("reader")
    deadline_token: int = 0  # a session's exec: its armed deadline (0: none counting)
    deadline_at: float = 0.0  # ... and when it passes (monotonic): its dead-man's switch, or its files' time

    @property
    def streaming(self) -> bool:
        return self.task.request.stream


class Supervisor(pykka.ThreadingActor):
    def __init__(self, vm_id: str, *, directory: Directory, hypervisor: Hypervisor, refill: Refill,
                 timers: Timers, metrics: Metrics, settings: VmSettings, tier: Tier = DEFAULT_TIER,
                 egress: EgressProxy | None = None, restore: RestoreSession | None = None):
        """`restore`: this VM is that session's from birth, restored from its
        snapshot (outside the pool's size); None for a pool VM."""
        super().__init__()
        self.vm_id = vm_id
        self.tier = tier
        self.egress = egress if tier.network else None  # the net:egress tier's way out (actors/egress/)
        self.cpu: tuple[int, int] | None = None  # as last set live; None: as booted
        self.directory = directory
        self.hypervisor = hypervisor
        self.refill = refill
        self.timers = timers
        self.metrics = metrics
        self.settings = settings
        self.restore = restore
        self.state: VmPhase = VmPhase.RESTORING if restore is not None else VmPhase.BOOTING
        self.saved: Template | None = None  # the session's snapshot, once its VM was saved into it
        self.handle = None
        self.made: NewVm | None = None  # how the VM was made, until it is first offered
        self.run_control = None  # pauses and resumes the domain (QMP or libvirt)
        self.link: GuestLink | None = None
        self.current: RunningTask | None = None  # the task of a one-shot VM (or a session's claim)
        self.session: SessionClaim | None = None  # the session this VM is, from its claim's exit
        self.session_capabilities: tuple = ()  # what the claim asked for: every exec of the session holds it
        self.end_reason = ""  # why the session ends, told to Sessions (SessionEnded)
        self.execs: dict[int, RunningTask] = {}  # a session's running execs, by exec_id
        self.reader_hold_told = False  # IOGuard holds the channel for some task's caller
        self.deadline_token = 0
        self.deadline: tuple[VmPhase, float] | None = None  # (phase, monotonic time) armed last
        self.frozen_at: float | None = None  # monotonic time of the Freeze, while frozen
        self.uses = 0
        self.born = time.monotonic()
        self.retire_reason = ""
        self.next_id = 0
        self.exited_exec: int | None = None  # the last exec whose Exit came: no Output of it may follow

    # --- life cycle ------------------------------------------------------------

    def on_start(self) -> None:
        if self.restore is not None:
            return self._start_restored()
        self._tell_pool(PoolVmState.BOOTING)
        try:
            self.made = self.refill.new_vm(
                self.vm_id, network=self.tier.network,
                memory_mib=self.settings.large_memory_mib if self.tier.large_mem else None)
            self.handle = self.made.handle
        except RestoreFailed:  # may still finish under this name (the Refill warned): a fresh VM takes over
            self._end("restore_failed")
            return
        except Exception as e:  # pykka calls no hook for on_start failures: end cleanly here
            log.warning("VM %s: cannot start: %s", self.vm_id, e)
            self._end("boot_failed")
            return
        if self.handle.restored:
            self.state = VmPhase.RESUMING
        self._connect()

    def _start_restored(self) -> None:
        """A session's VM restored from its snapshot: the clone, then its
        Resume; a failure ends it as restore_failed (Sessions told). Never
        through the Refill: a session's snapshot is no template of the pool's."""
        self._tell_pool(PoolVmState.SESSION)
        try:
            # A copy of its own: a fork's sessions restore from one snapshot side by side.
            self.handle = self.hypervisor.restore(self.restore.snapshot, name=self.vm_id, private_copy=True)
        except Exception as e:  # RestoreFailed, TemplateGone (discarded meanwhile), or a bug
            log.warning("VM %s: cannot restore session %s: %s", self.vm_id, self.restore.session_id, e)
            return self._end("restore_failed")
        self._connect()

    def _connect(self) -> None:
        """Connect to the new VM's channel (a restored one's Resume sent) and
        have IOGuard read it; its first answer is due within the boot timeout."""
        try:
            self.run_control = self.hypervisor.run_control(self.handle)
            # A clone's agent said Hello before its template was saved (a session's did
            # more): its next frame, and the host's, follow what the VM saved had seen.
            self.link = GuestLink(self.handle.socket, guest_first_seq=self.handle.guest_first_seq,
                                  host_first_seq=self.handle.host_first_seq)
            self.link.connect(time.monotonic() + self.settings.boot_timeout_s)
            self.link.sock.settimeout(SEND_TIMEOUT_S)
            if self.handle.restored:
                self.link.send_resume()  # ResumeDone comes through IOGuard, on the new base
        except Exception as e:
            if self.state == VmPhase.BOOTING:  # a clone's failure is warned of by _start_failed
                log.warning("VM %s: cannot start: %s", self.vm_id, e)
            self._end(self._start_failed(f"cannot connect: {e}"))
            return
        self.directory.tell("ioguard", Watch(self.vm_id, self.link.sock, self.actor_ref,
                                             first_seq=self.link.decoder.expected_seq))
        if self.egress is not None and self.state != VmPhase.RESTORING:  # a session's: at its ResumeDone
            self._attach_egress()
        self._arm(self.state, self.settings.boot_timeout_s)

    def _attach_egress(self) -> None:
        ref, vm_id = self.actor_ref, self.vm_id  # a violation on the egress port ends the VM as one on the channel
        self.egress.attach(vm_id, self.handle.egress_socket,
                           lambda code, detail: ref.tell(ChannelFailed(vm_id, code, detail, violation=True)))

    def on_receive(self, message: Any) -> None:
        if self.state == VmPhase.GONE:
            if isinstance(message, RunTask):  # raced with our end
                self._strand(message.task)
            return
        if isinstance(message, GuestSaid):
            self.link.guest_frame_read()
            self._guest_said(message.message)
        elif isinstance(message, RunTask):
            self._run_task(message)
        elif isinstance(message, StdinChunk):
            self._stdin(message)
        elif isinstance(message, ReaderHold):
            self._reader_hold(message)
        elif isinstance(message, Freeze):
            self._freeze()
        elif isinstance(message, Thaw):
            self._thaw()
        elif isinstance(message, DeadlinePassed):
            if message.phase == VmPhase.SESSION == self.state:
                self._exec_deadline_passed(message.token)
            elif message.token == self.deadline_token and message.phase == self.state:
                self._deadline_passed()
        elif isinstance(message, EndSession):
            self._end_session(message.reason)
        elif isinstance(message, SaveSession):
            self._save_session()
        elif isinstance(message, ChannelFailed):
            if message.violation:
                self.metrics.violations.labels(message.code).inc()
                log.warning("VM %s violated the protocol: %s", self.vm_id, message.detail)
                self._fail(ErrorCode.PROTOCOL_VIOLATION, f"the VM broke the channel protocol ({message.code})",
                           reason=self._start_failed(f"protocol violation: {message.detail}"))
            else:
                self._fail(ErrorCode.VM_LOST, f"the VM died ({message.detail})",
                           reason=self._start_failed(f"channel lost: {message.detail}"))
        elif isinstance(message, Retire):
            self.retire_reason = message.reason
            if self.state in (VmPhase.READY, VmPhase.SETTLING, *STARTING):
                self._end("retired_" + message.reason)
        elif isinstance(message, InjectFault):
            self._inject(message.kind)
        else:
            log.warning("VM %s ignores %r", self.vm_id, message)

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        """One-for-one: a crashed Supervisor takes only its own VM down."""
        log.error("VM %s supervisor crashed: %r", self.vm_id, exception_value)
        self._fail(ErrorCode.VM_LOST, "the VM's supervisor failed", stop=False)
        self._requeue_stranded()

    def on_stop(self) -> None:
        if self.state == VmPhase.SESSION:
            self._lose_session("corrald is shutting down", "shutdown", stop=False)
        elif self.state != VmPhase.GONE:
            self._fail(ErrorCode.CANCELLED, "corrald is shutting down", stop=False)
        self._requeue_stranded()

    def _requeue_stranded(self) -> None:
        """A RunTask that arrived after this VM ended would die with the inbox."""
        for message in drain_inbox(self):
            if isinstance(message, RunTask):
                self._strand(message.task)

    def _strand(self, task: Task) -> None:
        """A task this VM cannot run: a task goes back to the Scheduler; a
        session's exec has lost its VM (Sessions hears of it by SessionEnded)."""
        if task.request.session_id:
            self.directory.answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.SESSION_LOST,
                f"session {task.request.session_id} lost its VM before the exec started"))
        else:
            self._requeue(task)

    # --- guest messages --------------------------------------------------------

    def _guest_said(self, message: codec.Message) -> None:
        if isinstance(message, guest.Output) and message.exec_id == self.exited_exec:
            return self._violation(OutputAfterExit(f"output of exec {message.exec_id} after its exit"))
        if type(message) not in ALLOWED[self.state]:
            self.metrics.violations.labels("unexpected_message").inc()
            text = f"the VM sent {type(message).__name__} while {self.state}"
            self._fail(ErrorCode.PROTOCOL_VIOLATION, text, reason=self._start_failed(text))
            return
        if self.state in CLONE_STARTING:
            self._clone_said(message)
        elif self.state == VmPhase.RESTORING:
            self._restored_said(message)
        elif self.state == VmPhase.SESSION:
            self._session_said(message)
        elif isinstance(message, guest.Hello):
            self.metrics.boot_seconds.observe(time.monotonic() - self.born)
            log.info("VM %s booted in %.2f s", self.vm_id, time.monotonic() - self.born)
            self._offer()
        elif isinstance(message, guest.HeartbeatAck):
            if message.nonce != self.next_id:
                return self._fail(ErrorCode.PROTOCOL_VIOLATION, "heartbeat answered with a wrong nonce")
            self._start_command()
        elif isinstance(message, guest.Output):
            if message.exec_id != self.current.exec_id:
                return self._violation(WrongExec(f"output for exec {message.exec_id}, not {self.current.exec_id}"))
            self._output(self.current, message)
        elif isinstance(message, guest.Exit):
            if message.exec_id != self.current.exec_id:
                return self._violation(WrongExec(f"exit for exec {message.exec_id}, not {self.current.exec_id}"))
            self._finished(self.current, message)
        elif isinstance(message, guest.Collected):
            self._collected(self.current, message)
        elif isinstance(message, guest.Error) and message.exec_id not in (0, self.current.exec_id):
            self._violation(WrongExec(f"an error for exec {message.exec_id}, not {self.current.exec_id}"))
        elif isinstance(message, guest.Error) and message.code in REFUSED_IN_GUEST:
            self._refused_in_guest(message.code, REFUSED_IN_GUEST[message.code] + message.message)
        elif isinstance(message, guest.Error):
            self._fail(ErrorCode.GUEST_ERROR, f"the guest agent failed: {message.code}: {message.message}")
        elif isinstance(message, guest.ResetDone):
            if message.reset_id != self.next_id or not message.ok:
                return self._end("reset_failed")
            self._offer()

    def _clone_said(self, message: codec.Message) -> None:
        """A restored clone's answers before it is offered: ResumeDone, then the
        warm-up's Exit."""
        if isinstance(message, guest.ResumeDone):
            log.info("VM %s restored from %s; its clock stepped %+.3f s", self.vm_id,
                     self.made.key.digest, message.clock_step_ns / 1e9)
            self.state = VmPhase.WARMING
            self._arm(VmPhase.WARMING, self.settings.boot_timeout_s)
            try:
                self.link.send(guest.Exec(
                    exec_id=self._new_id(), argv=(b"true",), env=(), cwd=b"", stdin=b"",
                    timeout_ms=int(self.settings.boot_timeout_s * 1000), output_cap=0, as_root=False,
                    capabilities=self.settings.default_soft_bits))
            except CorralError as e:
                self._end(self._start_failed(f"the warm-up could not be sent ({e})"))
        elif isinstance(message, guest.Error):
            self._end(self._start_failed(f"the agent answered {message.code}: {message.message}"))
        elif message.exec_id != self.next_id or message.exit_code != 0 or message.timed_out:
            self._end(self._start_failed(f"the warm-up `true` ended with {message}"))
        else:
            self.exited_exec = message.exec_id
            self.refill.restored(self.made.key)
            self._offer()

    def _offer(self) -> None:
        """After its Hello or a Reset: offered to the Scheduler, settling first if
        pool.settle_ms, so the guest does the clean-up that step queued now and
        not during the next acquire. A task that comes while it settles takes it
        running; otherwise it is paused when the settle time is up."""
        try:
            # Booted unthrottled (a faster boot); offered with the default CPU, so
            # a default task's acquire makes no libvirt call but the resume.
            self._set_cpu(self.settings.cpu)
        except CorralError as e:
            log.warning("VM %s: cannot set its CPU: %s", self.vm_id, e)
            return self._end("pause_failed")
        if self.retire_reason:
            return self._end("retired_" + self.retire_reason)
        if self.made is not None:  # first offered: the refill is done
            self.metrics.refill_seconds.labels(self.made.kind).observe(time.monotonic() - self.born)
            self.made = None
        if self.settings.settle_s > 0:
            self._set_state(VmPhase.SETTLING, self.settings.settle_s)
        elif self._pause():
            self._set_state(VmPhase.READY)

    def _pause(self) -> bool:
        """Pause the VM to wait for a task; False if it had to end instead."""
        try:
            if self.frozen_at is None:  # a frozen VM is paused already
                self.run_control.pause()
        except CorralError as e:
            log.warning("VM %s: cannot pause: %s", self.vm_id, e)
            self._end("pause_failed")
            return False
        return True

    def _run_task(self, message: RunTask) -> None:
        if self.state == VmPhase.SESSION:
            return self._run_exec(message)
        if message.task.request.session_id:  # never this VM's session: nothing to run it in
            return self._not_this_session(message.task)
        if self.state not in (VmPhase.READY, VmPhase.SETTLING) or self.frozen_at is not None:
            self._requeue(message.task)
            return
        paused = self.state == VmPhase.READY
        request = message.task.request
        self.current = RunningTask(message.task, message.assigned_at,
                                   CappedOutput(request.output_cap, keep=not request.stream))
        self.state = VmPhase.ACQUIRING
        try:
            # Queued in the socket before the resume: the agent finds it the
            # moment it runs again, with no round trip after the resume call.
            self.link.send(guest.Heartbeat(nonce=self._new_id()))
            if self.egress is not None:  # this task's rules, from before its first instruction
                self.egress.begin_task(self.vm_id, TaskEgress(message.task.request.task_id, message.task.identity,
                                                              parse_rules(message.task.request.egress_allow)))
            if wants_high_cpu(message.task.request.capabilities):
                self._set_cpu(self.settings.high_cpu)  # before the resume: live from the first instruction
            if paused:  # a settling VM still runs
                self.run_control.resume()
        except CorralError as e:
            return self._fail(ErrorCode.VM_LOST, f"the VM could not be resumed ({e})")
        # Telling the pool and arming the deadline wait until the guest runs:
        # they are off the acquire's path, and the answer cannot be read before.
        self._set_state(VmPhase.ACQUIRING, self.settings.acquire_timeout_s)

    def _start_command(self) -> None:
        running = self.current
        running.acquired_at = time.monotonic()
        self.metrics.acquire_seconds.observe(running.acquired_at - running.assigned_at)
        request = running.task.request
        running.exec_id = self._new_id()
        # Both clocks count from assignment, as callers see it: the guest kills
        # the command at the timeout, the dead-man's switch 5 s later.
        deadman_at = running.assigned_at + request.timeout_ms / 1000 + self.settings.deadman_grace_s
        self._set_state(VmPhase.RUNNING, deadman_at - time.monotonic())
        self._send_command(running, request.capabilities)

    def _send_command(self, running: RunningTask, capabilities: tuple) -> None:
        """The task's files, then its Exec, with the time left of its timeout."""
        request = running.task.request
        timeout_left_ms = request.timeout_ms - whole_ms(running.acquired_at - running.assigned_at)
        running.stdin_sent, running.stdin_closed = len(request.stdin), not request.stdin_open
        try:
            for path, mode, data in request.files_in:  # the agent answers a failed put at the Exec
                self.link.send(guest.PutFile(path=path, mode=mode, data=data))
            if request.stream or request.stdin_open:
                # Before the Exec, so that stdin sent early (held by the edge)
                # reaches this actor only once it can go after the Exec.
                self.directory.tell("intake", TaskStarted(running.task.ticket, self.actor_ref))
            self.link.send(guest.Exec(
                exec_id=running.exec_id, argv=request.argv,
                env=request.env if self.egress is None else task_env(request.env), cwd=request.cwd,
                stdin=request.stdin, timeout_ms=max(1, timeout_left_ms),
                output_cap=request.output_cap, as_root=False,
                capabilities=soft_bits(capabilities) | self.settings.default_soft_bits,
                stdin_open=request.stdin_open))
        except CorralError as e:
            self._fail(ErrorCode.VM_LOST, f"the VM stopped taking input ({e})")

    def _refused_in_guest(self, code: str, text: str) -> None:
        """The agent refused to start the command (a file could not be put, or
        argv[0] needs a soft capability the task lacks): nothing ran, so the VM
        is reset and reused as usual."""
        self._answer(error_reply(self.current.task.request.task_id, code, text))
        self._after_task(timed_out=False)

    def _output(self, running: RunningTask, message: guest.Output) -> None:
        try:
            data = running.output.add(message.stream, message.offset, message.data)
        except OutputOutOfOrder as e:
            return self._violation(e)
        if running.streaming and data:
            self.directory.tell("intake", OutputChunk(running.task.ticket, message.stream, message.offset, data))

    def _command_of(self, ticket: int) -> RunningTask | None:
        """The task of `ticket` if its command runs now (from its Exec to its Exit)."""
        if self.state == VmPhase.RUNNING and self.current.task.ticket == ticket:
            return self.current
        if self.state == VmPhase.SESSION:
            return next((r for r in self.execs.values() if r.task.ticket == ticket and r.reply is None), None)
        return None

    def _stdin(self, message: StdinChunk) -> None:
        """More stdin from the caller: to the guest while the ticket's command
        runs; dropped otherwise (it ended, or took no more stdin)."""
        running = self._command_of(message.ticket)
        if running is None or running.stdin_closed:
            return
        data = message.data[:max(0, MAX_STDIN - running.stdin_sent)]
        eof = message.eof or len(data) < len(message.data)
        if len(data) < len(message.data):  # the edge caps stdin lower: a bug there, not the caller's doing
            log.warning("VM %s: stdin past %d bytes dropped; the command's stdin is closed", self.vm_id, MAX_STDIN)
        if not data and not eof:
            return
        running.stdin_sent += len(data)
        running.stdin_closed = eof
        if self.frozen_at is not None:  # a paused guest reads nothing: sent at the Thaw
            running.stdin_held.append((data, eof))
            return
        self._send_stdin(running, data, eof)

    def _send_stdin(self, running: RunningTask, data: bytes, eof: bool) -> None:
        try:
            for start in range(0, max(len(data), 1), MAX_STDIN_CHUNK):
                piece = data[start:start + MAX_STDIN_CHUNK]
                self.link.send(guest.Stdin(exec_id=running.exec_id, data=piece,
                                           eof=eof and start + MAX_STDIN_CHUNK >= len(data)))
        except CorralError as e:
            self._fail(ErrorCode.VM_LOST, f"the VM stopped taking input ({e})")

    def _reader_hold(self, message: ReaderHold) -> None:
        running = self._command_of(message.ticket)
        if running is None:
            return  # its command is over: the hold ended with it
        self._hold_for_reader(running, message.held)

    def _hold_for_reader(self, running: RunningTask, held: bool) -> None:
        """Stop (or resume) reading the channel while the task's caller is
        behind: held while any running task's caller is."""
        running.reader_held = held
        tasks = [*self.execs.values(), *([self.current] if self.current is not None else [])]
        wanted = any(task.reader_held for task in tasks)
        if wanted != self.reader_hold_told:
            self.reader_hold_told = wanted
            self.directory.tell("ioguard", ChannelHold(self.vm_id, held=wanted, reason="reader"))

    def _finished(self, running: RunningTask, exit_message: guest.Exit) -> None:
        self.exited_exec = running.exec_id
        self._hold_for_reader(running, False)  # no more output: collected files and the reset must flow
        self.metrics.run_seconds.observe(exit_message.wall_ms / 1000)
        request = running.task.request
        exit_message = running.output.flag(exit_message)
        timed_out = exit_message.timed_out
        running.reply = exit_reply(running.task, exit_message, running.output.stdout(),
                                   running.output.stderr(), running.assigned_at, running.acquired_at)
        if running.task.claim is not None:
            return self._claimed(running, exit_message)
        if request.collect:
            files = self.settings.files
            running.collection = Collection(self._new_id(), request.collect, files.max_collect_bytes)
            if self.state == VmPhase.SESSION:
                self._arm_exec(running, time.monotonic() + files.collect_timeout_s)
            else:
                self._set_state(VmPhase.COLLECTING, files.collect_timeout_s)
            try:
                self.link.send(guest.Collect(collect_id=running.collection.collect_id,
                                             paths=request.collect, max_bytes=files.max_collect_bytes))
            except CorralError:
                self._collect_ended(running, "the VM stopped taking input", vm_gone=True)
            return
        if self.state == VmPhase.SESSION:
            return self._answer_exec(running, running.reply)
        self._answer(running.reply)
        self._after_task(timed_out)

    def _collected(self, running: RunningTask, message: guest.Collected) -> None:
        violation = running.collection.add(message)
        if violation:
            self.metrics.violations.labels("bad_collect").inc()
            return self._fail(ErrorCode.PROTOCOL_VIOLATION, violation)
        if running.collection.done:
            self._collect_ended(running, "")

    def _collect_ended(self, running: RunningTask, reason: str, vm_gone: bool = False) -> None:
        """Answer with the command's result and its files (those missing get `reason`)."""
        if vm_gone and self.state == VmPhase.SESSION:  # answered session_lost with the others
            return self._fail(ErrorCode.VM_LOST, "the VM stopped taking input")
        running.collection.give_up(reason)
        reply = with_files(running.reply, running.task, running.collection.results, self.settings.files.signer)
        if self.state == VmPhase.SESSION:
            self._answer_exec(running, reply)
            if reason:  # the agent did not send them in time: it may never answer again
                self._lose_session(f"the agent did not send an exec's files within "
                                   f"{self.settings.files.collect_timeout_s:g} s", "deadman")
            return
        self._answer(reply)
        if vm_gone or reason:
            return self._end("collect_failed")
        self._after_task(running.reply.timed_out)

    def _after_task(self, timed_out: bool) -> None:
        """The task is answered: reset the VM for the next one, or end it."""
        last_task = self._last_task()
        self.uses += 1
        if timed_out or last_task:
            # A timed-out task may have left the guest in any state: no reuse.
            return self._end("timed_out" if timed_out else "retired")
        self._set_state(VmPhase.RESETTING, self.settings.reset_timeout_s)
        try:
            self.link.send(guest.Reset(reset_id=self._new_id()))
        except CorralError:
            self._end("vm_lost")

    # --- a session's VM ---------------------------------------------------------

    def _claimed(self, running: RunningTask, exit_message: guest.Exit) -> None:
        """The claim's `true` is over: on exit 0 the VM is the session's (its
        ticket is Sessions' to answer); otherwise the open fails and the VM ends."""
        if exit_message.exit_code != 0 or exit_message.signal or exit_message.timed_out:
            self._answer(error_reply(
                running.task.request.task_id, ErrorCode.GUEST_ERROR,
                f"the session's VM failed its first command (`true`: exit {exit_message.exit_code}, "
                f"signal {exit_message.signal}{', timed out' if exit_message.timed_out else ''})"))
            return self._end("claim_failed")
        self.current = None
        self.session = running.task.claim
        self.session_capabilities = running.task.request.capabilities
        self.uses += 1
        self.deadline, self.deadline_token = None, self.deadline_token + 1  # execs have deadlines of their own
        # The egress rules begun for the claim stay the session's until the VM ends.
        self._set_state(VmPhase.SESSION)
        log.info("VM %s is session %s's", self.vm_id, self.session.session_id)
        self.directory.tell("sessions", SessionStarted(self.session.session_id, self.vm_id, self.actor_ref))

    def _restored_said(self, message: codec.Message) -> None:
        """A restored session VM's answer to its Resume: on ResumeDone it is the
        session's, with the session's CPU and egress rules, and Sessions is told
        SessionStarted (as a claim's VM does); on an Error it ends."""
        restore = self.restore
        if isinstance(message, guest.Error):
            log.warning("VM %s: session %s's restored agent answered %s: %s", self.vm_id, restore.session_id,
                        message.code, message.message)
            return self._end("restore_failed")
        try:
            self._set_cpu(self.settings.high_cpu if wants_high_cpu(restore.capabilities) else self.settings.cpu)
            if self.egress is not None:  # the session's rules, before its first exec
                # Only now: the agent answered the Resume once it had restarted the
                # egress relay, whose streams and sequences were the old proxy's.
                self._attach_egress()
                self.egress.begin_task(self.vm_id, TaskEgress(restore.session_id, restore.owner,
                                                              parse_rules(restore.egress_allow)))
        except (CorralError, ValueError) as e:
            log.warning("VM %s: session %s's restored VM cannot be set up: %s", self.vm_id, restore.session_id, e)
            return self._end("restore_failed")
        self.session = SessionClaim(restore.session_id, restore.owner)
        self.session_capabilities = restore.capabilities
        self.deadline, self.deadline_token = None, self.deadline_token + 1  # execs have deadlines of their own
        self.state = VmPhase.SESSION  # the pool counted it a session's from the start
        log.info("VM %s is session %s's, restored from %s (its clock stepped %+.3f s)", self.vm_id,
                 restore.session_id, restore.snapshot.directory.name, message.clock_step_ns / 1e9)
        self.directory.tell("sessions", SessionStarted(restore.session_id, self.vm_id, self.actor_ref))

    def _save_session(self) -> None:
        """Save the session's VM into a snapshot between its execs: the channel
        closed first (the agent sees the host leave, as for a template), then
        libvirt's save; the VM is gone after it, and Sessions is told
        SessionSaved instead of SessionEnded. Any failure loses the session."""
        if self.state != VmPhase.SESSION:
            log.warning("VM %s told to save a session while %s", self.vm_id, self.state)
            return
        if self.execs:  # Sessions saves only a session with no exec running
            return self._lose_session(f"it was to be saved with {len(self.execs)} exec(s) running", "save_failed")
        session_id = self.session.session_id
        # Nothing more of the guest is read or relayed: the VM is saved as it stands.
        self.directory.tell("ioguard", Unwatch(self.vm_id))
        if self.egress is not None:
            self.egress.detach(self.vm_id)
        guest_next_seq, host_next_seq = self.link.decoder.expected_seq, self.link.encoder.next_seq
        self.link.close()
        self.run_control.close()
        time.sleep(TEMPLATE_CLOSE_S)
        started = time.monotonic()
        try:
            self.saved = self.hypervisor.save_session(self.handle, session_id, guest_next_seq, host_next_seq)
        except Exception as e:  # SessionSaveFailed, or a bug: either way the session is lost
            return self._lose_session(f"its VM could not be saved ({e})", "save_failed")
        log.info("VM %s: session %s saved into %s in %.2f s", self.vm_id, session_id, self.saved.directory.name,
                 time.monotonic() - started)
        self._end("session_saved")

    def _run_exec(self, message: RunTask) -> None:
        """A session's exec: started at once (the VM runs), beside any others."""
        task = message.task
        request = task.request
        if request.session_id != self.session.session_id:
            if not request.session_id:  # a task offered before this VM was a session's
                return self._requeue(task)
            return self._not_this_session(task)
        if self.frozen_at is not None:  # a SCRAM came first: as Sessions answers execs in safe mode
            self.directory.answer(task.ticket, error_reply(
                request.task_id, ErrorCode.CANCELLED_SCRAM,
                "an operator stopped corral (SCRAM) before this exec ran; retry after it resumes"))
            return self._exec_done()
        now = time.monotonic()
        running = RunningTask(task, message.assigned_at, CappedOutput(request.output_cap, keep=not request.stream),
                              exec_id=self._new_id(), acquired_at=now)
        self.execs[running.exec_id] = running
        # Both clocks count from assignment, as for a task.
        self._arm_exec(running, running.assigned_at + request.timeout_ms / 1000 + self.settings.deadman_grace_s)
        self._send_command(running, self.session_capabilities)

    def _not_this_session(self, task: Task) -> None:
        """An exec of a session this VM is not (Sessions routes by id: a bug
        somewhere): answered, never run in another session's VM."""
        session_id = task.request.session_id
        log.error("VM %s was given an exec of session %s, which it is not", self.vm_id, session_id)
        self.directory.answer(task.ticket, error_reply(
            task.request.task_id, ErrorCode.SESSION_LOST, f"session {session_id} has no VM here"))
        self.directory.tell("sessions", SessionExecDone(session_id))

    def _session_said(self, message: codec.Message) -> None:
        """A session's guest message, about one exec: each must name an exec
        that runs (or, Collected, one whose files are on their way)."""
        if isinstance(message, guest.Collected):
            running = next((r for r in self.execs.values()
                            if r.collection is not None and r.collection.collect_id == message.collect_id), None)
            if running is None:
                self.metrics.violations.labels("bad_collect").inc()
                return self._fail(ErrorCode.PROTOCOL_VIOLATION, f"files for collect {message.collect_id}, "
                                                                "which is not in progress")
            return self._collected(running, message)
        running = self.execs.get(message.exec_id)
        if isinstance(message, guest.Error) and message.exec_id == 0:
            return self._fail(ErrorCode.GUEST_ERROR, f"the guest agent failed: {message.code}: {message.message}",
                              reason="guest_error")
        if running is None or running.reply is not None:
            what = type(message).__name__.lower()
            if running is not None and isinstance(message, guest.Output):
                return self._violation(OutputAfterExit(f"output of exec {message.exec_id} after its exit"))
            return self._violation(WrongExec(f"{what} for exec {message.exec_id}, which is not running"))
        if isinstance(message, guest.Output):
            self._output(running, message)
        elif isinstance(message, guest.Exit):
            self._finished(running, message)
        elif message.code in REFUSED_IN_GUEST:  # nothing ran; the session goes on
            self._answer_exec(running, error_reply(running.task.request.task_id, message.code,
                                                   REFUSED_IN_GUEST[message.code] + message.message))
        else:  # the agent gave this exec up (and killed what it started); the session goes on
            self._answer_exec(running, error_reply(
                running.task.request.task_id, ErrorCode.GUEST_ERROR,
                f"the guest agent failed: {message.code}: {message.message}",
                outcome=outcomes.for_error(ErrorCode.GUEST_ERROR, command_started=True)))

    def _answer_exec(self, running: RunningTask, reply: TaskReply) -> None:
        """A session's exec answered: Sessions counts it done (idle from now)."""
        del self.execs[running.exec_id]
        self._hold_for_reader(running, False)
        self.directory.answer(running.task.ticket, reply)
        self._exec_done()

    def _exec_done(self) -> None:
        self.directory.tell("sessions", SessionExecDone(self.session.session_id))

    def _arm_exec(self, running: RunningTask, at: float) -> None:
        """Arm the exec's own deadline: at `at` its dead-man's switch ends the
        session (or, once it exited, its files are given up)."""
        self.deadline_token += 1
        running.deadline_token, running.deadline_at = self.deadline_token, at
        if self.frozen_at is None:  # a frozen VM's execs are armed by Thaw
            self.timers.call_later(max(0.0, at - time.monotonic()), self.actor_ref,
                                   DeadlinePassed(VmPhase.SESSION, running.deadline_token))

    def _exec_deadline_passed(self, token: int) -> None:
        running = next((r for r in self.execs.values() if r.deadline_token == token), None)
        if running is None:
            return  # answered meanwhile, or re-armed
        if running.collection is not None:
            return self._collect_ended(running, f"not collected within {self.settings.files.collect_timeout_s:g} s")
        self.metrics.deadman_kills.inc()
        timeout_s = running.task.request.timeout_ms / 1000
        why = " (its output was held for its caller, who was not reading it)" if running.reader_held else ""
        self._lose_session(f"an exec had no answer from the VM within its timeout ({timeout_s:g} s) "
                           f"+ {self.settings.deadman_grace_s:g} s{why}", "deadman")

    def _end_session(self, reason: str) -> None:
        """Sessions ends the session (closed, idle, lifetime, operator, draining, ...)."""
        if self.state != VmPhase.SESSION:
            log.warning("VM %s told to end a session while %s", self.vm_id, self.state)
            return
        self._lose_session(f"the session was ended ({reason})", reason, pool_reason=f"session_{reason}")

    def _lose_session(self, text: str, reason: str, pool_reason: str = "", stop: bool = True) -> None:
        """The session is over: every exec still running is answered
        session_lost, the VM destroyed, Sessions told why (`reason`)."""
        session_id = self.session.session_id
        log.info("VM %s: session %s ends: %s", self.vm_id, session_id, text)
        self.end_reason = reason
        for running in list(self.execs.values()):
            del self.execs[running.exec_id]
            self._hold_for_reader(running, False)
            # Its command ran when the VM went: the outcome a crash gets.
            self.directory.answer(running.task.ticket, error_reply(
                running.task.request.task_id, ErrorCode.SESSION_LOST, f"session {session_id} ended: {text}",
                outcome=outcomes.for_error(ErrorCode.VM_LOST, command_started=True)))
        self._end(pool_reason or reason, stop=stop)

    # --- deadlines, faults, endings ------------------------------------------

    def _deadline_passed(self) -> None:
        if self.state == VmPhase.BOOTING:
            log.warning("VM %s did not say hello within %.0f s", self.vm_id, self.settings.boot_timeout_s)
            self._end("boot_failed")
        elif self.state in (*CLONE_STARTING, VmPhase.RESTORING):
            self._end(self._start_failed(f"no answer within {self.settings.boot_timeout_s:g} s"))
        elif self.state == VmPhase.ACQUIRING:
            # The command never started: another VM can run it.
            self._requeue(self.current.task)
            self.current = None
            self._end("acquire_timeout")
        elif self.state == VmPhase.RUNNING:
            self.metrics.deadman_kills.inc()
            timeout_s = self.current.task.request.timeout_ms / 1000
            # A caller that stops reading holds the guest's writer, the agent with it.
            why = " (its output was held for its caller, who was not reading it)" if self.current.reader_held else ""
            self._fail(ErrorCode.TIMEOUT, f"no answer from the VM within the timeout ({timeout_s:g} s) "
                                  f"+ {self.settings.deadman_grace_s:g} s{why}; the VM was destroyed",
                       reason="deadman")
        elif self.state == VmPhase.COLLECTING:
            self._collect_ended(self.current, f"not collected within {self.settings.files.collect_timeout_s:g} s")
        elif self.state == VmPhase.RESETTING:
            self._end("reset_timeout")
        elif self.state == VmPhase.SETTLING and self._pause():
            self.state = VmPhase.READY  # offered already, as it began to settle

    def _freeze(self) -> None:
        if self.frozen_at is not None:
            return
        # Before the pause: a frame the guest is sending stops its stall clock.
        self.directory.tell("ioguard", ChannelHold(self.vm_id, held=True))
        if self.state != VmPhase.READY:  # ready VMs are paused already
            try:
                self.run_control.pause()
            except CorralError as e:
                # A VM that cannot be paused in an emergency must not run on.
                return self._fail(ErrorCode.VM_LOST, f"the VM could not be paused for a SCRAM ({e})")
        self.frozen_at = time.monotonic()
        self.deadline_token += 1  # the armed deadline stops counting
        for running in self.execs.values():  # and so do a session's execs'
            running.deadline_token = 0

    def _thaw(self) -> None:
        if self.frozen_at is None:
            return
        frozen_for = time.monotonic() - self.frozen_at
        self.frozen_at = None
        if self.state != VmPhase.READY:  # a ready VM stays paused
            try:
                self.run_control.resume()
            except CorralError as e:
                return self._fail(ErrorCode.VM_LOST, f"the VM could not be resumed after a SCRAM ({e})")
        self.directory.tell("ioguard", ChannelHold(self.vm_id, held=False))
        if self.state != VmPhase.READY and self.deadline is not None:
            phase, at = self.deadline
            self._arm(phase, at + frozen_for - time.monotonic())
        for running in list(self.execs.values()):
            self._arm_exec(running, running.deadline_at + frozen_for)
        commands = [self.current] if self.state == VmPhase.RUNNING else list(self.execs.values())
        for running in commands:
            held, running.stdin_held = running.stdin_held, []
            for data, eof in held:
                if self.state == VmPhase.GONE:  # the VM stopped taking input
                    return
                self._send_stdin(running, data, eof)

    def _inject(self, kind: str) -> None:
        log.warning("VM %s: injected fault %s", self.vm_id, kind)
        if kind == "kill_qemu":
            self.hypervisor.faults.kill_qemu(self.vm_id)
        elif kind == "hang_guest":
            self.run_control.pause()  # the guest stops answering; deadlines do the rest
        elif kind == "drop_libvirt":
            self.hypervisor.faults.drop_libvirt()
        elif kind == "crash":
            raise RuntimeError(f"injected fault: supervisor of {self.vm_id} crashed")
        else:
            log.warning("unknown fault %r", kind)

    def _violation(self, error: ProtocolError) -> None:
        """The guest broke the protocol in a message it sent (IOGuard finds the
        violations in the bytes): counted by kind, the VM ended, its task
        answered protocol_violation."""
        self.metrics.violations.labels(error.code).inc()
        log.warning("VM %s violated the protocol: %s: %s", self.vm_id, error.code, error)
        text = f"the VM broke the channel protocol ({error.code}: {error})"
        self._fail(ErrorCode.PROTOCOL_VIOLATION, text, reason=self._start_failed(text))

    def _fail(self, code: str, text: str, reason: str | None = None, stop: bool = True) -> None:
        """End the VM; the task on it (if its command started) gets `code`,
        a session's execs session_lost."""
        if self.state == VmPhase.SESSION:
            return self._lose_session(text, reason or code, stop=stop)
        if self.current is not None:
            if self.state == VmPhase.ACQUIRING:
                self._requeue(self.current.task)
                self.current = None
            else:
                self._answer(error_reply(self.current.task.request.task_id, code, text,
                                         outcome=outcomes.for_error(code, command_started=True)))
        self._end(reason or code, stop=stop)

    def _answer(self, reply: TaskReply) -> None:
        self._hold_for_reader(self.current, False)
        if self.egress is not None:  # the task's connections end with it
            self.egress.end_task(self.vm_id)
        self.directory.answer(self.current.task.ticket, reply)
        self.current = None

    def _requeue(self, task: Task) -> None:
        """Back to the Scheduler; if it is restarting, the task is answered instead."""
        if not self.directory.tell("scheduler", Requeue(task)):
            self.directory.answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.UNAVAILABLE, "the scheduler was restarting; retry"))

    def _end(self, reason: str, stop: bool = True) -> None:
        if self.state == VmPhase.GONE:
            return
        was_session = self.state == VmPhase.SESSION
        was_restoring = self.state == VmPhase.RESTORING
        self.state = VmPhase.GONE
        self.deadline_token += 1
        self.directory.tell("ioguard", Unwatch(self.vm_id))
        if self.egress is not None:
            self.egress.detach(self.vm_id)
        if self.link is not None:
            self.link.close()
        if self.run_control is not None:
            self.run_control.close()
        if self.handle is not None:
            try:
                self.hypervisor.destroy(self.handle)
            except CorralError as e:
                log.error("VM %s: destroy failed: %s (the watchdog will reap it)", self.vm_id, e)
        log.info("VM %s gone: %s", self.vm_id, reason)
        self._tell_pool(PoolVmState.GONE, reason)
        if was_session and self.saved is not None:  # the session lives on in its snapshot
            self.directory.tell("sessions", SessionSaved(self.session.session_id, self.saved))
        elif was_session:
            self.directory.tell("sessions", SessionEnded(self.session.session_id, self.end_reason or reason))
        elif was_restoring:  # whatever ended it: the session's VM never came back
            self.directory.tell("sessions", SessionEnded(self.restore.session_id, "restore_failed"))
        if stop:
            self.stop()

    def _set_state(self, state: VmPhase, deadline_s: float | None = None) -> None:
        self.state = state
        self._tell_pool(POOL_STATE_OF[state])
        if deadline_s is not None:
            self._arm(state, deadline_s)

    def _arm(self, phase: VmPhase, delay_s: float) -> None:
        self.deadline_token += 1
        self.deadline = (phase, time.monotonic() + delay_s)
        if self.frozen_at is None:  # a frozen VM's deadline is armed by Thaw
            self.timers.call_later(max(0.0, delay_s), self.actor_ref,
                                   DeadlinePassed(phase, self.deadline_token))

    def _start_failed(self, detail: str) -> str | None:
        """The pool's reason for a VM that fails before it is first offered,
        whatever broke; None for one that was offered. A boot: boot_failed (the
        pool backs off instead of boot-looping on a broken or hostile image). A
        clone: restore_failed, counted and warned of by the Refill, which has
        its tier's next refills boot (a clone that failed after its restore is
        not retried in place: IOGuard may still deliver what its channel said).
        A session's VM restoring from its snapshot: restore_failed, warned of
        here (Sessions is told by _end)."""
        if self.state == VmPhase.BOOTING:
            return "boot_failed"
        if self.state in CLONE_STARTING:
            self.refill.restore_failed(self.made.key, self.state.value, f"VM {self.vm_id}: {detail}")
            return "restore_failed"
        if self.state == VmPhase.RESTORING:  # a session's snapshot: nothing of the Refill's
            log.warning("VM %s: session %s's restored VM failed: %s", self.vm_id, self.restore.session_id, detail)
            return "restore_failed"
        return None

    def _set_cpu(self, cpu: tuple[int, int]) -> None:
        if cpu != self.cpu:
            self.hypervisor.set_cpu(self.vm_id, *cpu)
            self.cpu = cpu

    def _tell_pool(self, state: PoolVmState, reason: str = "") -> None:
        last_task = state == PoolVmState.BUSY and self._last_task()
        self.directory.tell("pool", VmState(self.vm_id, state, reason, last_task))

    def _last_task(self) -> bool:
        """This VM ends after the task on it: strict, its uses or age used up,
        or retired (a timeout, which ends it too, cannot be foreseen). Told to
        the pool with BUSY, so its replacement boots while the task runs."""
        return (self.settings.strict or bool(self.retire_reason)
                or self.uses + 1 >= self.settings.max_uses
                or time.monotonic() - self.born >= self.settings.max_age_s)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id
