"""The pool's table of VMs and the plan made from it: which VMs to boot now
(per tier), which idle ones to retire (too old, idle past their tier's time,
over the wanted size) and which one to give up when host memory is short.

Replace before retire: a VM about to end is *leaving* and no longer counts
towards its tier's size, so its replacement boots while it still works. A VM
leaves when the task on it is its last (its Supervisor says so: pool.max_uses
reached, pool.strict, or its age), when the pool has retired it, or, once
booted, when it comes within a lead of pool.max_age_s (the lead follows the
refills the pool has measured). So while tasks come slower than
the pool refills, a task never finds it empty for longer than what is left of
one refill. The price: while a replacement boots, the tier holds one VM more.

A VM that becomes a session's (actors/sessions.py) leaves the pool at once
(in_pool): its replacement boots now, and it stays in the table only so that
SCRAM still freezes it, until it is gone.

Plain data and functions, no actor: the PoolManager (actors/pool.py) keeps the
table up to date from its messages, asks the plan what to do and does the
telling; a restarted PoolManager takes the table over. It publishes what other
threads may read of the table in a PoolView. Tests ask the plan directly, with
times given, not waited for.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import pykka

from actors.messages import PoolVmState
from actors.vm.tiers import DEFAULT_TIER, RARE_TIERS, Tier

# A refill measured longest among the last REFILLS_KEPT, times REFILL_FACTOR
# plus REFILL_MARGIN_S (a tick and the messages), is how long before its age
# limit a VM's replacement starts; DEFAULT_REFILL_S until one is measured.
REFILLS_KEPT = 8
REFILL_FACTOR = 2.0
REFILL_MARGIN_S = 2.0
DEFAULT_REFILL_S = 10.0


@dataclass(frozen=True)
class TierSizes:
    """VMs of each hard-capability tier: kept warm, at most, idle before retiring."""

    warm: int = 0
    max: int = 2
    idle_s: float = 120.0


@dataclass
class PoolVm:
    supervisor: pykka.ActorRef | None  # None only while its Supervisor is being started
    tier: Tier = DEFAULT_TIER
    state: PoolVmState = PoolVmState.BOOTING
    since: float = field(default_factory=time.monotonic)  # in this state since (monotonic)
    born: float = field(default_factory=time.monotonic)
    last_task: bool = False  # the task on it is its last (its Supervisor said so with BUSY)
    retired: str = ""  # why the pool told it to retire; it ends once idle


class PoolView:
    """The VMs the pool owns and their states, readable from any thread without
    asking the PoolManager (the Watchdog tells zombies from live VMs by it, the
    control plane shows it). Each attribute is replaced whole, never mutated."""

    def __init__(self) -> None:
        self.owned: frozenset[str] = frozenset()
        self.states: dict[str, PoolVmState] = {}
        self.size = 0


@dataclass
class PoolState:
    """What a restarted PoolManager takes over: the live VMs and the backoff."""

    vms: dict[str, PoolVm] = field(default_factory=dict)
    boot_failures: int = 0
    next_boot_at: float = 0.0
    shed: int = 0  # VMs given up for host memory
    safe_mode: bool = False
    size: int | None = None  # set by an operator; None: the configured size
    demand: dict = field(default_factory=dict)  # tier -> tasks waiting for it (from the Scheduler)
    # The last few refills, pool's boot order to ready (s): how early a replacement must start.
    refills: deque = field(default_factory=lambda: deque(maxlen=REFILLS_KEPT))

    def count(self, tier: Tier, states: tuple[PoolVmState, ...] | None = None) -> int:
        """VMs of `tier` in the pool (a session's VM is not), in `states` if given."""
        return sum(1 for vm in self.vms.values()
                   if vm.tier == tier and in_pool(vm) and (states is None or vm.state in states))

    def staying(self, tier: Tier, max_age_s: float, now: float) -> int:
        """VMs of `tier` in the pool that are not leaving: what its size is
        counted in. While memory is short (VMs shed) leaving VMs still count,
        so nothing boots ahead of time."""
        if self.shed:
            return self.count(tier)
        lead_s = replace_lead_s(self, max_age_s)
        return sum(1 for vm in self.vms.values()
                   if vm.tier == tier and in_pool(vm) and not leaving(vm, max_age_s, lead_s, now))


def in_pool(vm: PoolVm) -> bool:
    """A session's VM stays in the table (SCRAM's Freeze must reach it, host
    memory counts it) but is no longer the pool's: not counted in any size
    or bound, never offered or retired; it was replaced as it became the session's."""
    return vm.state != PoolVmState.SESSION


def replace_lead_s(pool: PoolState, max_age_s: float) -> float:
    """How long before `max_age_s` a VM counts as leaving: twice the longest
    recent refill and a margin, so its replacement is up before it goes; at
    most half the age limit, so a VM still works most of its life alone."""
    refill_s = max(pool.refills, default=DEFAULT_REFILL_S)
    return min(max_age_s / 2, REFILL_FACTOR * refill_s + REFILL_MARGIN_S)


def leaving(vm: PoolVm, max_age_s: float, lead_s: float, now: float) -> bool:
    """Will end soon, so its replacement should boot now: its task is its last,
    the pool retired it, or it is booted and within `lead_s` of its age limit
    (a VM still booting needs no replacement)."""
    if vm.last_task or vm.retired:
        return True
    return vm.state != PoolVmState.BOOTING and now - vm.born >= max_age_s - lead_s


def boot_backoff_s(boot_failures: int, backoff_max_s: float) -> float:
    """The wait before the next boot after `boot_failures` failed in a row."""
    return min(backoff_max_s, 2 ** (boot_failures - 1))


def boots_wanted(pool: PoolState, tiers: TierSizes, max_age_s: float, now: float) -> list[Tier]:
    """The tiers of the VMs to boot now, one entry per VM, the default tier
    first: each tier's size counts only VMs that are not leaving, so a leaving
    VM's replacement boots now. None in safe mode or before the backoff is
    over; while boots fail, one at a time."""
    if pool.safe_mode or now < pool.next_boot_at:
        return []
    wanted = []
    staying = pool.staying(DEFAULT_TIER, max_age_s, now)
    wanted += [DEFAULT_TIER] * max(0, pool.size - pool.shed - staying)
    for tier in RARE_TIERS:
        # The warm size counts the VMs staying; the max counts every VM, a
        # tier's bound on what it may hold (of large memory, say).
        staying = pool.staying(tier, max_age_s, now)
        count = pool.count(tier)
        # Tasks waiting beyond the VMs that will be free for them soon (each
        # VM booted for them is one more of those).
        soon_free = pool.count(tier, (PoolVmState.BOOTING, PoolVmState.READY))
        waiting = pool.demand.get(tier, 0)
        while staying < tiers.warm or (count < tiers.max and waiting > soon_free):
            wanted.append(tier)
            staying += 1
            count += 1
            soon_free += 1
    return wanted[:1] if pool.boot_failures else wanted


def retire_on_tick(pool: PoolState, tiers: TierSizes, max_age_s: float,
                   now: float) -> list[tuple[str, str]]:
    """(vm_id, reason) for each idle VM to retire now: past `max_age_s` ("age"),
    or of a rare tier, idle past its `idle_s` and above its warm size ("idle").
    A VM retired already is not retired again; one leaving soon anyway is not
    retired for idleness, nor counted in the warm size."""
    idle_of_tier = {tier: pool.staying(tier, max_age_s, now) - tiers.warm for tier in RARE_TIERS}
    lead_s = replace_lead_s(pool, max_age_s)
    retire = []
    for vm_id, vm in pool.vms.items():
        if vm.state != PoolVmState.READY or vm.retired:
            continue
        if now - vm.born > max_age_s:
            retire.append((vm_id, "age"))
        elif (vm.tier != DEFAULT_TIER and idle_of_tier[vm.tier] > 0 and now - vm.since > tiers.idle_s
              and not leaving(vm, max_age_s, lead_s, now)):
            idle_of_tier[vm.tier] -= 1
            retire.append((vm_id, "idle"))
    return retire


def over_size(pool: PoolState, max_age_s: float, now: float) -> list[str]:
    """Idle default-tier VMs to retire, oldest first, for the pool to come down
    to its size; busy ones count until their task ends and are then not
    replaced. Leaving VMs go by themselves: neither counted nor picked. The
    size is the default tier's; the other tiers keep their own."""
    lead_s = replace_lead_s(pool, max_age_s)
    extra = pool.staying(DEFAULT_TIER, max_age_s, now) - pool.size
    idle = sorted((vm.born, vm_id) for vm_id, vm in pool.vms.items()
                  if vm.state == PoolVmState.READY and vm.tier == DEFAULT_TIER
                  and not leaving(vm, max_age_s, lead_s, now))
    return [vm_id for _, vm_id in idle[:max(0, extra)]]


def oldest_idle(pool: PoolState) -> str | None:
    """The idle VM to give up when host memory is short, of any tier."""
    idle = [(vm.born, vm_id) for vm_id, vm in pool.vms.items()
            if vm.state == PoolVmState.READY and not vm.retired]
    return min(idle)[1] if idle else None
