"""The pool's plan alone, no actor: what to boot, what to retire and what to
shed, and which VMs are leaving (replaced before they retire), from a table
of VMs with times given rather than waited for."""

from actors.messages import PoolVmState
from actors.pool_plan import (REFILL_MARGIN_S, PoolState, PoolVm, TierSizes, boot_backoff_s, boots_wanted,
                              oldest_idle, over_size, replace_lead_s, retire_on_tick)
from actors.vm.tiers import DEFAULT_TIER, Tier

NET = Tier(network=True)
BIG = Tier(large_mem=True)
BOTH = Tier(network=True, large_mem=True)
BOOTING, READY, BUSY, RESETTING = PoolVmState.BOOTING, PoolVmState.READY, PoolVmState.BUSY, PoolVmState.RESETTING
NOW = 1000.0
NO_RARE = TierSizes(warm=0, max=2, idle_s=60)
AGE = 300.0  # pool.max_age_s


def wanted(table, tiers=NO_RARE, now=NOW, max_age_s=AGE):
    return boots_wanted(table, tiers, max_age_s, now)


def vm(state=READY, tier=DEFAULT_TIER, born=NOW, since=NOW, last_task=False, retired=""):
    return PoolVm(supervisor=None, tier=tier, state=state, since=since, born=born, last_task=last_task,
                  retired=retired)


def pool(size=2, **vms):
    return PoolState(vms=dict(vms), size=size)


# --- boots ------------------------------------------------------------------------

def test_an_empty_pool_boots_its_size_of_default_vms():
    assert wanted(pool(size=3)) == [DEFAULT_TIER] * 3


def test_every_live_vm_counts_towards_the_size_whatever_its_state():
    full = pool(size=4, a=vm(BOOTING), b=vm(READY), c=vm(BUSY), d=vm(RESETTING))
    assert wanted(full) == []
    assert wanted(pool(size=4, a=vm(BUSY))) == [DEFAULT_TIER] * 3


def test_vms_shed_for_memory_are_not_replaced():
    shed = pool(size=3, a=vm())
    shed.shed = 1
    assert wanted(shed) == [DEFAULT_TIER]


def test_nothing_boots_in_safe_mode_or_before_the_backoff_is_over():
    safe = pool(size=2)
    safe.safe_mode = True
    assert wanted(safe) == []
    waiting = pool(size=2)
    waiting.next_boot_at = NOW + 0.5
    assert wanted(waiting) == []
    assert wanted(waiting, now=NOW + 0.5) == [DEFAULT_TIER] * 2


def test_while_boots_fail_one_vm_boots_at_a_time():
    failing = pool(size=3)
    failing.boot_failures = 2
    assert wanted(failing) == [DEFAULT_TIER]
    rare_only = pool(size=0)
    rare_only.boot_failures = 1
    assert wanted(rare_only, TierSizes(warm=1)) == [NET]


def test_the_backoff_doubles_up_to_its_maximum():
    assert [boot_backoff_s(n, 30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30.0, 30.0]


def test_rare_tiers_keep_their_warm_size():
    assert wanted(pool(size=1), TierSizes(warm=1, max=2)) == [DEFAULT_TIER, NET, BIG, BOTH]
    warm = pool(size=0, n=vm(BUSY, NET), b=vm(BOOTING, BIG), nb=vm(READY, BOTH))
    assert wanted(warm, TierSizes(warm=1, max=2)) == []


def test_rare_tiers_boot_for_tasks_waiting_up_to_their_max():
    demand = pool(size=0)
    demand.demand = {NET: 3, BIG: 1}
    assert wanted(demand) == [NET, NET, BIG]


def test_vms_booting_or_ready_for_a_tier_cover_its_waiting_tasks_but_busy_ones_do_not():
    covered = pool(size=0, a=vm(BOOTING, NET), b=vm(READY, NET))
    covered.demand = {NET: 2}
    assert wanted(covered, TierSizes(warm=0, max=3)) == []
    busy = pool(size=0, a=vm(BUSY, NET))
    busy.demand = {NET: 2}
    assert wanted(busy, TierSizes(warm=0, max=3)) == [NET, NET]
    assert wanted(busy, TierSizes(warm=0, max=2)) == [NET]  # the max counts the busy one


# --- replace before retire -------------------------------------------------------------

def test_a_vm_on_its_last_task_is_replaced_while_it_runs_it():
    # pool.max_uses = 1 (or strict): the one VM takes a task and says it is its last.
    table = pool(size=1, a=vm(BUSY, last_task=True))
    assert wanted(table) == [DEFAULT_TIER]
    table.vms["b"] = vm(BOOTING)  # the replacement, booting while a's task runs
    assert wanted(table) == []
    assert wanted(pool(size=1, a=vm(BUSY))) == []  # a task that is not its last: nothing to replace


def test_a_strict_pool_replaces_every_vm_a_task_takes():
    table = pool(size=2, a=vm(BUSY, last_task=True), b=vm(BUSY, last_task=True))
    assert wanted(table) == [DEFAULT_TIER] * 2
    table.vms.update(c=vm(BOOTING), d=vm(READY))
    assert wanted(table) == []


def test_a_vm_the_pool_retired_is_replaced_before_it_is_gone():
    assert wanted(pool(size=1, a=vm(READY, retired="age"))) == [DEFAULT_TIER]
    assert wanted(pool(size=1, a=vm(READY, retired="age"), b=vm(BOOTING))) == []


def test_a_booted_vm_near_its_age_limit_is_replaced_a_lead_ahead():
    table = pool(size=1)
    table.refills.extend([3.0, 4.0])  # the longest recent refill: 4 s
    lead = replace_lead_s(table, AGE)
    assert lead == 2 * 4.0 + REFILL_MARGIN_S
    table.vms["a"] = vm(READY, born=NOW - (AGE - lead) + 0.1)
    assert wanted(table) == []
    assert wanted(table, now=NOW + 0.1) == [DEFAULT_TIER]
    table.vms["a"].state = BUSY  # busy or idle alike
    assert wanted(table, now=NOW + 0.1) == [DEFAULT_TIER]
    table.vms["a"].state = BOOTING  # a VM still booting needs no replacement, however old
    assert wanted(table, now=NOW + 100) == []


def test_the_lead_follows_the_refills_measured_and_is_at_most_half_the_age_limit():
    table = pool()
    assert replace_lead_s(table, AGE) == 2 * 10.0 + REFILL_MARGIN_S  # nothing measured yet
    table.refills.extend([0.5] * 8)
    assert replace_lead_s(table, AGE) == 1.0 + REFILL_MARGIN_S  # restores: a short lead
    table.refills.append(30.0)
    assert replace_lead_s(table, 40.0) == 20.0
    assert len(table.refills) == 8  # only the last few count


def test_over_size_neither_counts_nor_picks_leaving_vms():
    table = pool(size=1, old=vm(READY, retired="age", born=NOW - 50), new=vm(READY, born=NOW - 1))
    assert over_size(table, AGE, NOW) == []  # old goes by itself, new is its replacement
    table.size = 0
    assert over_size(table, AGE, NOW) == ["new"]


def test_nothing_boots_ahead_while_memory_is_short():
    table = pool(size=2, a=vm(BUSY, last_task=True), b=vm(READY))
    assert wanted(table) == [DEFAULT_TIER]
    table.shed = 1  # one VM given up for memory: the leaving one still counts
    assert wanted(table) == []


def test_a_warm_rare_tier_vm_is_replaced_before_it_retires():
    warm_net = TierSizes(warm=1, max=1)
    table = pool(size=0, n=vm(BUSY, NET, last_task=True), b=vm(READY, BIG), nb=vm(READY, BOTH))
    assert wanted(table, warm_net) == [NET]
    table.vms["n2"] = vm(BOOTING, NET)
    assert wanted(table, warm_net) == []


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
    assert over_size(table, AGE, NOW) == ["b", "a", "d"]
    table.size = 3
    assert over_size(table, AGE, NOW) == ["b"]
    table.size = 4
    assert over_size(table, AGE, NOW) == []


def test_a_vm_retired_already_is_not_retired_or_shed_again():
    table = pool(old=vm(READY, born=NOW - 301, retired="age"), n=vm(READY, NET, since=NOW - 61, retired="idle"))
    assert retire_on_tick(table, TierSizes(warm=0, max=3, idle_s=60), 300.0, NOW) == []
    assert oldest_idle(table) is None


def test_a_rare_vm_leaving_by_age_is_not_retired_for_idleness_nor_counted_warm():
    # n_old nears its age limit and n_new replaces it: the warm one kept is n_new.
    table = pool(n_old=vm(READY, NET, born=NOW - 295, since=NOW - 61), n_new=vm(READY, NET, since=NOW - 61))
    assert retire_on_tick(table, TierSizes(warm=1, max=2, idle_s=60), 300.0, NOW) == []
    assert retire_on_tick(table, TierSizes(warm=0, max=2, idle_s=60), 300.0, NOW) == [("n_new", "idle")]


def test_memory_sheds_the_oldest_idle_vm_of_any_tier():
    table = pool(a=vm(READY, born=NOW - 5), n=vm(READY, NET, born=NOW - 50), c=vm(BUSY, born=NOW - 99))
    assert oldest_idle(table) == "n"
    assert oldest_idle(pool(c=vm(BUSY), b=vm(BOOTING))) is None


# --- sessions' VMs ------------------------------------------------------------------

SESSION = PoolVmState.SESSION


def test_a_sessions_vm_is_not_counted_in_the_size_so_it_is_replaced_at_once():
    assert wanted(pool(size=2, a=vm(SESSION), b=vm(READY))) == [DEFAULT_TIER]
    assert wanted(pool(size=1, a=vm(SESSION), b=vm(SESSION))) == [DEFAULT_TIER]


def test_a_sessions_vm_of_a_rare_tier_takes_nothing_of_its_tiers_bound():
    tiers = TierSizes(warm=0, max=1, idle_s=60)
    table = pool(size=0, a=vm(SESSION, tier=NET))
    table.demand = {NET: 1}
    assert wanted(table, tiers) == [NET]  # the tier's max of 1 counts pool VMs only
    table.vms["b"] = vm(BOOTING, tier=NET)
    assert wanted(table, tiers) == []


def test_a_sessions_vm_is_never_retired_nor_shed_nor_shrunk_away_however_old_or_idle():
    old = NOW - 10 * AGE
    table = pool(size=0, a=vm(SESSION, born=old, since=old), b=vm(SESSION, tier=NET, born=old, since=old))
    assert retire_on_tick(table, NO_RARE, AGE, NOW) == []
    assert over_size(table, AGE, NOW) == []
    assert oldest_idle(table) is None
