"""PoolManager: keeps `size` warm VMs, one Supervisor actor each.

It starts Supervisors, learns their states (booting, ready, busy, resetting,
session, gone), offers ready VMs to the Scheduler, retires idle VMs past their age,
and replaces every VM that goes, with exponential backoff while boots fail.
It replaces a VM before it retires: as soon as the VM takes its last task
(its Supervisor says so) or nears its age limit, the replacement boots, so
the pool is not empty for a whole boot each time a VM retires.

A VM that becomes a session's leaves the pool: it is replaced at once and
no longer counted or offered, but stays in the table until it is gone, so a
SCRAM freezes it like the others. A VM restored for a session from its
snapshot (RestoreSession) is a session's from the start: in the table, never
in the pool's size.

In safe mode (SCRAM) it freezes every VM (each Supervisor pauses its domain)
and boots nothing; resuming thaws them and refills the pool.

VMs come in hardware tiers (actors/vm/tiers.py). `size` VMs of the default tier
are kept warm; each hard-capability tier (NIC, large memory) keeps
`tiers.warm` warm (0 by default: those tasks are rare) and boots VMs for the
tasks the Scheduler says are waiting for it (TierDemand), up to `tiers.max`,
retiring them after `tiers.idle_s` idle. The default tier's warm path is
untouched by the others.

What to boot and what to retire is worked out from the pool's table of VMs
by plain functions in actors/pool_plan.py; this actor keeps the table, asks
them, and starts and tells.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import pykka

from actors.directory import Directory, drain_inbox, send
from actors.messages import (BackoffOver, ChildFailed, Freeze, HostMemory, InjectFault, PoolVmState,
                             RestoreSession, ResumeService, Retire, Scram, SessionEnded, SetPoolSize, Thaw, Tick,
                             TierDemand, VmAvailable, VmState, VmWithdrawn)
from actors.edge.metrics import POOL_STATES, Metrics
from actors.pool_plan import (PoolState, PoolView, PoolVm, TierSizes, boot_backoff_s, boots_wanted,
                              oldest_idle, over_size, retire_on_tick)
from actors.vm.tiers import tier_of
from actors.timers import Timers
from config import Config

log = logging.getLogger("corral.pool")
TICK_S = 1.0
SHUTDOWN_S = 60.0


@dataclass(frozen=True)
class PoolSettings:
    size: int  # warm VMs of the default tier, until an operator sets another (SetPoolSize)
    max_age_s: float  # an idle VM older than this is retired; its replacement boots before
    backoff_max_s: float = 30.0  # the longest wait between failing boots
    tiers: TierSizes = TierSizes()

    @classmethod
    def from_config(cls, cfg: Config) -> PoolSettings:
        pool = cfg.pool
        return cls(size=pool.size, max_age_s=pool.max_age_s, backoff_max_s=pool.boot_backoff_max_s,
                   tiers=TierSizes(pool.tier_size, pool.tier_max, pool.tier_idle_s))


class PoolManager(pykka.ThreadingActor):
    def __init__(self, *, directory: Directory, metrics: Metrics, timers: Timers,
                 start_supervisor: Callable[..., pykka.ActorRef], new_name: Callable[[], str],
                 view: PoolView, settings: PoolSettings, state: PoolState | None = None,
                 safe_mode: bool = False):
        """`start_supervisor(vm_id, tier, restore=None)` starts a VM's Supervisor
        (`restore`: a session's VM, restored from its snapshot); `new_name()`
        names a VM; `view` is published for other threads. `state`: a crashed
        predecessor's, taken over; else an empty pool in `safe_mode` or not."""
        super().__init__()
        self.directory = directory
        self.metrics = metrics
        self.timers = timers
        self.start_supervisor = start_supervisor
        self.new_name = new_name
        self.view = view
        self.settings = settings
        self.state = state or PoolState(safe_mode=safe_mode)
        if self.state.size is None:
            self.state.size = settings.size
        self.stopping = False

    def on_start(self) -> None:
        self._fill()
        self.timers.call_later(TICK_S, self.actor_ref, Tick())

    def on_receive(self, message) -> None:
        if isinstance(message, VmState):
            self._vm_state(message)
        elif isinstance(message, Tick):
            self._tick()
        elif isinstance(message, BackoffOver):
            self._fill()
        elif isinstance(message, RestoreSession):
            self._restore_session(message)
        elif isinstance(message, TierDemand):
            self.state.demand = dict(message.waiting)
            self._fill()
        elif isinstance(message, HostMemory):
            if message.short:
                self._shed_one()
            elif self.state.shed:
                self.state.shed -= 1
                self._fill()
        elif isinstance(message, Scram):
            self.state.safe_mode = True
            self._tell_all(Freeze())
        elif isinstance(message, ResumeService):
            self.state.safe_mode = False
            self._tell_all(Thaw())
            self._fill()
        elif isinstance(message, SetPoolSize):
            self.state.size = message.size
            self._shrink()
            self._fill()
        elif isinstance(message, InjectFault) and message.kind == "crash" and not message.vm_id:
            raise RuntimeError("injected fault: pool manager crash")
        elif isinstance(message, InjectFault):
            vm = self.state.vms.get(message.vm_id)
            if vm is not None:
                send(vm.supervisor, message)
        else:
            log.warning("pool ignores %r", message)
        self._publish()

    def _vm_state(self, message: VmState) -> None:
        vm = self.state.vms.get(message.vm_id)
        if vm is None:
            return
        if message.state == PoolVmState.GONE:
            del self.state.vms[message.vm_id]
            self.directory.tell("scheduler", VmWithdrawn(message.vm_id))
            self.metrics.vms_destroyed.labels(message.reason or "unknown").inc()
            if message.reason == "boot_failed":
                self.state.boot_failures += 1
                delay = boot_backoff_s(self.state.boot_failures, self.settings.backoff_max_s)
                self.state.next_boot_at = time.monotonic() + delay
                self.timers.call_later(delay, self.actor_ref, BackoffOver())
                log.warning("VM %s failed to boot; next boot in %.0f s", message.vm_id, delay)
            self._fill()
            return
        if message.state == PoolVmState.READY:
            if vm.state == PoolVmState.BOOTING:
                self.state.boot_failures = 0
                self.state.refills.append(time.monotonic() - vm.born)
            self.directory.tell("scheduler", VmAvailable(message.vm_id, vm.supervisor, vm.tier))
        vm.state = message.state
        vm.since = time.monotonic()
        if message.state == PoolVmState.SESSION:
            # A session's now: out of the pool for good, replaced at once.
            self.directory.tell("scheduler", VmWithdrawn(message.vm_id))
            self._fill()
            return
        if message.last_task and not vm.last_task:
            vm.last_task = True
            self._fill()  # its replacement boots while it runs its last task

    def _restore_session(self, message: RestoreSession) -> None:
        """A VM for a session, restored from its snapshot: a session's from the
        start, so in the table (SCRAM reaches it, the Watchdog counts it owned)
        but outside every size, and never booted or replaced by the pool."""
        if self.stopping:  # no Supervisor will start: the session's VM never comes back
            self.directory.tell("sessions", SessionEnded(message.session_id, "restore_failed"))
            return
        vm_id = self.new_name()
        # In the table as a session's before its Supervisor makes the domain:
        # never a zombie, never counted by _fill.
        self.state.vms[vm_id] = PoolVm(supervisor=None, tier=tier_of(message.capabilities),
                                       state=PoolVmState.SESSION)
        self.view.owned = frozenset(self.state.vms)
        supervisor = self.start_supervisor(vm_id, self.state.vms[vm_id].tier, restore=message)
        self.state.vms[vm_id].supervisor = supervisor
        if self.state.safe_mode:  # frozen like every other VM until an operator resumes
            send(supervisor, Freeze())

    def _tick(self) -> None:
        settings = self.settings
        for vm_id, reason in retire_on_tick(self.state, settings.tiers, settings.max_age_s, time.monotonic()):
            self._retire(vm_id, reason)
        self._fill()
        if not self.stopping:
            self.timers.call_later(TICK_S, self.actor_ref, Tick())

    def _tell_all(self, message) -> None:
        for vm in self.state.vms.values():
            send(vm.supervisor, message)

    def _shrink(self) -> None:
        """Over the wanted size: idle VMs retire (pool_plan.over_size)."""
        for vm_id in over_size(self.state, self.settings.max_age_s, time.monotonic()):
            self._retire(vm_id, "pool_size")

    def _shed_one(self) -> None:
        """Memory is short: the oldest idle VM goes, and the pool stays one
        smaller until the watchdog sees memory back."""
        vm_id = oldest_idle(self.state)
        if vm_id is not None:
            self._retire(vm_id, "memory")
            self.state.shed += 1

    def _retire(self, vm_id: str, reason: str) -> None:
        """No more tasks for this VM; it ends once idle (at once if it is).
        From now on it is leaving: no longer counted in its tier's size."""
        self.state.vms[vm_id].retired = reason
        self.directory.tell("scheduler", VmWithdrawn(vm_id))
        send(self.state.vms[vm_id].supervisor, Retire(reason))

    def _fill(self) -> None:
        if self.stopping:
            return
        for tier in boots_wanted(self.state, self.settings.tiers, self.settings.max_age_s, time.monotonic()):
            vm_id = self.new_name()
            # Published before the Supervisor creates the domain: never a zombie.
            self.state.vms[vm_id] = PoolVm(supervisor=None, tier=tier)
            self.view.owned = frozenset(self.state.vms)
            self.state.vms[vm_id].supervisor = self.start_supervisor(vm_id, tier)

    def _publish(self) -> None:
        self.view.owned = frozenset(self.state.vms)
        self.view.states = {vm_id: vm.state for vm_id, vm in self.state.vms.items()}
        self.view.size = self.state.size
        counts = {s: 0 for s in POOL_STATES}
        for vm in self.state.vms.values():
            counts[vm.state] = counts.get(vm.state, 0) + 1
        for state, count in counts.items():
            self.metrics.pool_vms.labels(state).set(count)

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # VM state changes still in the inbox go into the salvage, not the bin.
        self.stopping = True  # the successor refills; this one starts nothing more
        for message in drain_inbox(self):
            if isinstance(message, VmState):
                self._vm_state(message)
            elif isinstance(message, RestoreSession):  # its session is told, not left waiting
                self._restore_session(message)
        self.directory.tell("root", ChildFailed("pool", repr(exception_value), salvage=self.state))

    def on_stop(self) -> None:
        """Shutdown: each Supervisor destroys its VM and answers its task, all at
        once (destroys take seconds each), waited for against one deadline."""
        self.stopping = True
        stopping = []
        for vm in self.state.vms.values():
            try:
                stopping.append(vm.supervisor.stop(block=False))
            except pykka.ActorDeadError:
                pass
        deadline = time.monotonic() + SHUTDOWN_S
        for future in stopping:
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
