"""The pool's plan alone, no actor: what to boot, what to retire and what to
shed, from a table of VMs with times given rather than waited for."""

from actors.messages import PoolVmState
from actors.pool_plan import (PoolState, PoolVm, TierSizes, boot_backoff_s, boots_wanted, oldest_idle,
                              over_size, retire_on_tick)
from actors.vm.tiers import DEFAULT_TIER, Tier

NET = Tier(network=True)
BIG = Tier(large_mem=True)
BOTH = Tier(network=True, large_mem=True)
BOOTING, READY, BUSY, RESETTING = PoolVmState.BOOTING, PoolVmState.READY, PoolVmState.BUSY, PoolVmState.RESETTING
NOW = 1000.0
NO_RARE = TierSizes(warm=0, max=2, idle_s=60)


def vm(state=READY, tier=DEFAULT_TIER, born=NOW, since=NOW):
    return PoolVm(supervisor=None, tier=tier, state=state, since=since, born=born)


def pool(size=2, **vms):
    return PoolState(vms=dict(vms), size=size)


# --- boots ------------------------------------------------------------------------

def test_an_empty_pool_boots_its_size_of_default_vms():
    assert boots_wanted(pool(size=3), NO_RARE, NOW) == [DEFAULT_TIER] * 3


def test_every_live_vm_counts_towards_the_size_whatever_its_state():
    full = pool(size=4, a=vm(BOOTING), b=vm(READY), c=vm(BUSY), d=vm(RESETTING))
    assert boots_wanted(full, NO_RARE, NOW) == []
    assert boots_wanted(pool(size=4, a=vm(BUSY)), NO_RARE, NOW) == [DEFAULT_TIER] * 3


def test_vms_shed_for_memory_are_not_replaced():
    shed = pool(size=3, a=vm())
    shed.shed = 1
    assert boots_wanted(shed, NO_RARE, NOW) == [DEFAULT_TIER]


def test_nothing_boots_in_safe_mode_or_before_the_backoff_is_over():
    safe = pool(size=2)
    safe.safe_mode = True
    assert boots_wanted(safe, NO_RARE, NOW) == []
    waiting = pool(size=2)
    waiting.next_boot_at = NOW + 0.5
    assert boots_wanted(waiting, NO_RARE, NOW) == []
    assert boots_wanted(waiting, NO_RARE, NOW + 0.5) == [DEFAULT_TIER] * 2


def test_while_boots_fail_one_vm_boots_at_a_time():
    failing = pool(size=3)
    failing.boot_failures = 2
    assert boots_wanted(failing, NO_RARE, NOW) == [DEFAULT_TIER]
    rare_only = pool(size=0)
    rare_only.boot_failures = 1
    assert boots_wanted(rare_only, TierSizes(warm=1), NOW) == [NET]


def test_the_backoff_doubles_up_to_its_maximum():
    assert [boot_backoff_s(n, 30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30.0, 30.0]


def test_rare_tiers_keep_their_warm_size():
    assert boots_wanted(pool(size=1), TierSizes(warm=1, max=2), NOW) == [DEFAULT_TIER, NET, BIG, BOTH]
    warm = pool(size=0, n=vm(BUSY, NET), b=vm(BOOTING, BIG), nb=vm(READY, BOTH))
    assert boots_wanted(warm, TierSizes(warm=1, max=2), NOW) == []


def test_rare_tiers_boot_for_tasks_waiting_up_to_their_max():
    demand = pool(size=0)
    demand.demand = {NET: 3, BIG: 1}
    assert boots_wanted(demand, NO_RARE, NOW) == [NET, NET, BIG]


def test_vms_booting_or_ready_for_a_tier_cover_its_waiting_tasks_but_busy_ones_do_not():
    covered = pool(size=0, a=vm(BOOTING, NET), b=vm(READY, NET))
    covered.demand = {NET: 2}
    assert boots_wanted(covered, TierSizes(warm=0, max=3), NOW) == []
    busy = pool(size=0, a=vm(BUSY, NET))
    busy.demand = {NET: 2}
    assert boots_wanted(busy, TierSizes(warm=0, max=3), NOW) == [NET, NET]
    assert boots_wanted(busy, TierSizes(warm=0, max=2), NOW) == [NET]  # the max counts the busy one


# --- retiring -------------------------------------------------------------------------

def test_idle_vms_past_their_age_retire_and_busy_ones_wait():
    table = pool(old=vm(READY, born=NOW - 301), young=vm(READY, born=NOW - 299),
                 busy_old=vm(BUSY, born=NOW - 1000))
    assert retire_on_tick(table, NO_RARE, 300.0, NOW) == [("old", "age")]


def test_idle_rare_vms_retire_down_to_the_warm_size_and_default_ones_never_for_idleness():
    table = pool(n1=vm(READY, NET, since=NOW - 61), n2=vm(READY, NET, since=NOW - 61),
                 n3=vm(BUSY, NET, since=NOW - 61), fresh=vm(READY, BIG, since=NOW - 10),
                 d=vm(READY, DEFAULT_TIER, since=NOW - 1000))
    assert retire_on_tick(table, TierSizes(warm=1, max=3, idle_s=60), 3600.0, NOW) == [
        ("n1", "idle"), ("n2", "idle")]
    assert retire_on_tick(table, TierSizes(warm=2, max=3, idle_s=60), 3600.0, NOW) == [("n1", "idle")]


def test_over_size_retires_the_oldest_idle_default_vms_only():
    table = pool(size=1, a=vm(READY, born=NOW - 5), b=vm(READY, born=NOW - 50), c=vm(BUSY, born=NOW - 99),
                 d=vm(READY, born=NOW - 1), n=vm(READY, NET, born=NOW - 999))
    # Four default VMs, one wanted: three must go, but only the idle ones can now.
    assert over_size(table) == ["b", "a", "d"]
    table.size = 3
    assert over_size(table) == ["b"]
    table.size = 4
    assert over_size(table) == []


def test_memory_sheds_the_oldest_idle_vm_of_any_tier():
    table = pool(a=vm(READY, born=NOW - 5), n=vm(READY, NET, born=NOW - 50), c=vm(BUSY, born=NOW - 99))
    assert oldest_idle(table) == "n"
    assert oldest_idle(pool(c=vm(BUSY), b=vm(BOOTING))) is None
