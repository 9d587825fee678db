"""The pool's table of VMs and the plan made from it: which VMs to boot now
(per tier), which idle ones to retire (too old, idle past their tier's time,
over the wanted size) and which one to give up when host memory is short.

Plain data and functions, no actor: the PoolManager (actors/pool.py) keeps the
table up to date from its messages, asks the plan what to do and does the
telling; a restarted PoolManager takes the table over. It publishes what other
threads may read of the table in a PoolView. Tests ask the plan directly, with
times given, not waited for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pykka

from actors.messages import PoolVmState
from actors.vm.tiers import DEFAULT_TIER, RARE_TIERS, Tier


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

    def count(self, tier: Tier, states: tuple[PoolVmState, ...] | None = None) -> int:
        return sum(1 for vm in self.vms.values()
                   if vm.tier == tier and (states is None or vm.state in states))


def boot_backoff_s(boot_failures: int, backoff_max_s: float) -> float:
    """The wait before the next boot after `boot_failures` failed in a row."""
    return min(backoff_max_s, 2 ** (boot_failures - 1))


def boots_wanted(pool: PoolState, tiers: TierSizes, now: float) -> list[Tier]:
    """The tiers of the VMs to boot now, one entry per VM, the default tier
    first. None in safe mode or before the backoff is over; while boots fail,
    one at a time."""
    if pool.safe_mode or now < pool.next_boot_at:
        return []
    wanted = []
    count = pool.count(DEFAULT_TIER)
    wanted += [DEFAULT_TIER] * max(0, pool.size - pool.shed - count)
    for tier in RARE_TIERS:
        count = pool.count(tier)
        # Tasks waiting beyond the VMs that will be free for them soon (each
        # VM booted for them is one more of those).
        soon_free = pool.count(tier, (PoolVmState.BOOTING, PoolVmState.READY))
        waiting = pool.demand.get(tier, 0)
        while count < tiers.warm or (count < tiers.max and waiting > soon_free):
            wanted.append(tier)
            count += 1
            soon_free += 1
    return wanted[:1] if pool.boot_failures else wanted


def retire_on_tick(pool: PoolState, tiers: TierSizes, max_age_s: float,
                   now: float) -> list[tuple[str, str]]:
    """(vm_id, reason) for each idle VM to retire now: past `max_age_s` ("age"),
    or of a rare tier, idle past its `idle_s` and above its warm size ("idle")."""
    idle_of_tier = {tier: pool.count(tier) - tiers.warm for tier in RARE_TIERS}
    retire = []
    for vm_id, vm in pool.vms.items():
        if vm.state != PoolVmState.READY:
            continue
        if now - vm.born > max_age_s:
            retire.append((vm_id, "age"))
        elif vm.tier != DEFAULT_TIER and idle_of_tier[vm.tier] > 0 and now - vm.since > tiers.idle_s:
            idle_of_tier[vm.tier] -= 1
            retire.append((vm_id, "idle"))
    return retire


def over_size(pool: PoolState) -> list[str]:
    """Idle default-tier VMs to retire, oldest first, for the pool to come down
    to its size; busy ones count until their task ends and are then not
    replaced. The size is the default tier's; the other tiers keep their own."""
    extra = pool.count(DEFAULT_TIER) - pool.size
    idle = sorted((vm.born, vm_id) for vm_id, vm in pool.vms.items()
                  if vm.state == PoolVmState.READY and vm.tier == DEFAULT_TIER)
    return [vm_id for _, vm_id in idle[:max(0, extra)]]


def oldest_idle(pool: PoolState) -> str | None:
    """The idle VM to give up when host memory is short, of any tier."""
    idle = [(vm.born, vm_id) for vm_id, vm in pool.vms.items() if vm.state == PoolVmState.READY]
    return min(idle)[1] if idle else None
