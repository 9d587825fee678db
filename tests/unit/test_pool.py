"""The PoolManager alone, with recording actors as its Supervisors: it keeps
the pool full, replaces a VM before it retires, offers ready VMs, backs off
failing boots, retires old VMs and sheds idle ones under memory pressure."""

import time
import uuid
from pathlib import Path

import pykka
import pytest

from actors.directory import Directory
from actors.messages import (Freeze, HostMemory, RestoreSession, ResumeService, Retire, Scram, SessionEnded,
                             Thaw, TierDemand, VmAvailable, VmState, VmWithdrawn)
from actors.edge.metrics import Metrics
from actors.pool import PoolManager, PoolSettings
from actors.pool_plan import PoolView, TierSizes
from actors.vm.snapshots import Template, TemplateKey
from actors.vm.tiers import DEFAULT_TIER, Tier
from actors.timers import Timers
from tests.support.probe import Recorder, wait_for
from tests.support.waiting import wait_until


@pytest.fixture
def pool_parts():
    directory = Directory()
    scheduler = Recorder.start()
    directory["scheduler"] = scheduler
    started = {}
    tiers = {}
    restores = {}  # vm_id -> (its RestoreSession, whether the view owned it as its Supervisor started)
    view = PoolView()

    def start_supervisor(vm_id, tier, restore=None):
        started[vm_id] = Recorder.start()
        tiers[vm_id] = tier
        if restore is not None:
            restores[vm_id] = (restore, vm_id in view.owned)
        return started[vm_id]

    timers = Timers()

    def make(size=2, max_age_s=300.0, tier_sizes=TierSizes(), metrics=None):
        pool = PoolManager.start(
            directory=directory, metrics=metrics or Metrics(), timers=timers, start_supervisor=start_supervisor,
            new_name=lambda: f"corral-test-{uuid.uuid4().hex[:12]}", view=view,
            settings=PoolSettings(size=size, max_age_s=max_age_s, backoff_max_s=30.0, tiers=tier_sizes))
        directory["pool"] = pool
        return pool

    make.tiers = tiers
    make.restores = restores
    yield make, directory, scheduler, started, view
    pykka.ActorRegistry.stop_all()
    timers.stop()


def vm_ids(pool):
    return sorted(pool.proxy().state.get().vms)


def test_fills_to_size_and_offers_ready_vms(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=2)
    time.sleep(0.1)
    assert len(started) == 2 and view.owned == frozenset(started)
    first = sorted(started)[0]
    pool.tell(VmState(first, "ready"))
    (offer,) = wait_for(scheduler, 1)
    assert isinstance(offer, VmAvailable) and offer.vm_id == first


def test_a_vm_that_goes_is_replaced(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=2)
    time.sleep(0.1)
    gone = sorted(started)[0]
    pool.tell(VmState(gone, "gone", "vm_lost"))
    time.sleep(0.2)
    assert len(started) == 3 and gone not in vm_ids(pool) and len(vm_ids(pool)) == 2
    assert any(isinstance(m, VmWithdrawn) and m.vm_id == gone for m in scheduler.proxy().seen.get())


def test_a_vm_taking_its_last_task_is_replaced_while_the_task_runs(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=1)
    time.sleep(0.1)
    (first,) = started
    pool.tell(VmState(first, "ready"))
    pool.tell(VmState(first, "busy"))  # not its last task: nothing boots
    time.sleep(0.2)
    assert list(started) == [first]
    pool.tell(VmState(first, "busy", last_task=True))
    wait_until(lambda: len(started) == 2, 5, "the replacement's Supervisor")
    assert view.owned == frozenset(started)  # both owned while the last task runs
    pool.tell(VmState(first, "gone", "retired"))
    time.sleep(0.2)
    assert len(started) == 2 and vm_ids(pool) == sorted(set(started) - {first})


def test_a_retired_vm_is_replaced_before_it_is_gone(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=1, max_age_s=0.5)
    time.sleep(0.1)
    (first,) = started
    pool.tell(VmState(first, "ready"))
    assert wait_for(started[first], 1)[0] == Retire("age")
    # No GONE told yet: the replacement boots all the same.
    wait_until(lambda: len(started) == 2, 5, "the replacement's Supervisor")
    assert pool.proxy().state.get().refills  # the first VM's refill, measured


def test_failing_boots_back_off(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=1)
    time.sleep(0.1)
    pool.tell(VmState(next(iter(started)), "gone", "boot_failed"))
    time.sleep(0.3)
    assert len(started) == 1  # the next boot waits out its backoff (1 s), not at once
    time.sleep(1.5)
    assert len(started) == 2


def test_memory_pressure_sheds_the_oldest_idle_vm_and_regrows(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=2)
    time.sleep(0.1)
    oldest, newest = sorted(started, key=lambda v: list(started).index(v))
    for vm_id in (oldest, newest):
        pool.tell(VmState(vm_id, "ready"))
    pool.tell(HostMemory(short=True))
    assert isinstance(wait_for(started[oldest], 1)[0], Retire)
    pool.tell(VmState(oldest, "gone", "retired_memory"))
    time.sleep(0.2)
    assert len(started) == 2  # stays one smaller while memory is short
    pool.tell(HostMemory(short=False))
    time.sleep(0.2)
    assert len(started) == 3


def test_idle_vms_past_their_age_are_retired(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=1, max_age_s=0.2)
    time.sleep(0.1)
    vm_id = next(iter(started))
    pool.tell(VmState(vm_id, "ready"))
    retire = wait_for(started[vm_id], 1, timeout_s=5)[0]
    assert retire == Retire("age")


NET = Tier(network=True)
BIG = Tier(large_mem=True)


def test_rare_tiers_boot_on_demand_up_to_their_max_and_offer_with_their_tier(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=1, tier_sizes=TierSizes(warm=0, max=2, idle_s=60))
    time.sleep(0.1)
    assert list(make.tiers.values()) == [DEFAULT_TIER]  # no rare-tier VM while nothing waits
    pool.tell(TierDemand(((NET, 3), (BIG, 1))))
    time.sleep(0.2)
    assert sorted(make.tiers.values()) == sorted([DEFAULT_TIER, NET, NET, BIG])  # NET capped at 2
    net_vm = next(v for v, t in make.tiers.items() if t == NET)
    pool.tell(VmState(net_vm, "ready"))
    offer = next(m for m in wait_for(scheduler, 1) if isinstance(m, VmAvailable))
    assert offer.vm_id == net_vm and offer.tier == NET
    pool.tell(TierDemand(()))  # demand gone: nothing more boots, nothing is killed
    time.sleep(0.2)
    assert len(make.tiers) == 4


def test_idle_rare_tier_vms_are_retired_but_warm_ones_kept(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=0, tier_sizes=TierSizes(warm=1, max=2, idle_s=1))
    time.sleep(0.1)
    assert sorted(make.tiers.values()) == sorted([NET, BIG, Tier(network=True, large_mem=True)])
    pool.tell(TierDemand(((NET, 2),)))
    time.sleep(0.2)
    nets = [v for v, t in make.tiers.items() if t == NET]
    assert len(nets) == 2
    pool.tell(TierDemand(()))
    for vm_id in nets:
        pool.tell(VmState(vm_id, "ready"))
    time.sleep(2.5)  # idle_s plus a tick
    retired = [v for v in nets if any(isinstance(m, Retire) for m in started[v].proxy().seen.get())]
    assert len(retired) == 1  # one above the warm size of 1


def test_a_vm_a_session_takes_is_replaced_at_once_kept_for_scram_and_never_offered(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=1)
    time.sleep(0.1)
    (vm_id,) = started
    pool.tell(VmState(vm_id, "ready"))
    pool.tell(VmState(vm_id, "busy"))
    pool.tell(VmState(vm_id, "session"))
    wait_until(lambda: len(started) == 2, 5, "the replacement's Supervisor")
    assert any(isinstance(m, VmWithdrawn) and m.vm_id == vm_id for m in wait_for(scheduler, 2))
    wait_until(lambda: view.states.get(vm_id) == "session", 5, "the session VM in the view")
    assert vm_id in view.owned  # still the pool's to freeze, and no zombie to the Watchdog
    pool.tell(Scram("drill"))
    pool.tell(ResumeService())
    wait_until(lambda: [type(m) for m in started[vm_id].proxy().seen.get()] == [Freeze, Thaw], 5,
               "the session VM frozen and thawed")
    time.sleep(0.2)
    assert [type(m) for m in started[vm_id].proxy().seen.get()] == [Freeze, Thaw]
    offers = [m for m in scheduler.proxy().seen.get() if isinstance(m, VmAvailable)]
    assert [m.vm_id for m in offers] == [vm_id]  # offered once, while it was ready; never after
    pool.tell(VmState(vm_id, "gone", "session_closed"))
    wait_until(lambda: vm_id not in view.owned, 5, "the session VM forgotten once gone")
    assert len(started) == 2  # its end boots nothing: it was replaced as the session took it


def test_pool_metrics_count_session_vms(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    metrics = Metrics()
    pool = make(size=1, metrics=metrics)
    (vm_id,) = wait_until(lambda: vm_ids(pool), 5, "a VM")
    assert metrics.gauge_values(metrics.pool_vms)["session"] == 0  # the series exists at 0
    pool.tell(VmState(vm_id, "session"))
    wait_until(lambda: metrics.gauge_values(metrics.pool_vms) == {"booting": 1, "ready": 0, "busy": 0,
                                                                  "resetting": 0, "session": 1},
               5, "one session VM and its replacement booting")


def restore_session(session_id="s-0123456789abcdef", capabilities=()) -> RestoreSession:
    key = TemplateKey(gold="g", agent="a", host="h", domain="d", network=b"net:egress" in capabilities,
                      memory_mib=128)
    snapshot = Template(key=key, directory=Path("/nonexistent/snapshot"), xml="<domain/>", name="corral-saved",
                        inode=1, data_len=1, guest_next_seq=5, host_next_seq=3)
    return RestoreSession(session_id, "alice", snapshot, capabilities)


def test_a_restored_session_vm_is_the_sessions_from_the_start_and_outside_the_pools_size(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=1)
    (pool_vm,) = wait_until(lambda: vm_ids(pool), 5, "the pool's VM")
    message = restore_session(capabilities=(b"net:egress",))
    pool.tell(message)
    wait_until(lambda: len(make.restores) == 1, 5, "the restored VM's Supervisor")
    ((vm_id, (restore, owned_at_start)),) = make.restores.items()
    assert restore == message and make.tiers[vm_id] == Tier(network=True)
    assert owned_at_start  # owned before its domain exists: the Watchdog never takes it for a zombie
    wait_until(lambda: view.states.get(vm_id) == "session", 5, "the restored VM in the view as a session's")
    pool.tell(VmState(vm_id, "session"))  # what its Supervisor says first: never booting
    pool.tell(VmState(pool_vm, "ready"))
    time.sleep(0.3)
    assert sorted(started) == sorted([pool_vm, vm_id])  # nothing booted for it, nor to replace it
    offers = [m.vm_id for m in scheduler.proxy().seen.get() if isinstance(m, VmAvailable)]
    assert offers == [pool_vm]
    pool.tell(VmState(vm_id, "gone", "session_closed"))
    wait_until(lambda: vm_id not in view.owned, 5, "the restored VM forgotten once gone")
    time.sleep(0.2)
    assert len(started) == 2


def test_a_restored_session_vm_is_frozen_at_once_in_safe_mode_and_boots_nothing(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    pool = make(size=1)
    wait_until(lambda: vm_ids(pool), 5, "the pool's VM")
    pool.tell(Scram("drill"))
    pool.tell(restore_session())
    wait_until(lambda: len(make.restores) == 1, 5, "the restored VM's Supervisor")
    (vm_id,) = make.restores
    wait_until(lambda: started[vm_id].proxy().seen.get() == [Freeze()], 5, "the restored VM frozen")
    pool.tell(ResumeService())
    wait_until(lambda: started[vm_id].proxy().seen.get() == [Freeze(), Thaw()], 5, "the restored VM thawed")
    assert len(started) == 2


def test_a_restore_the_pool_cannot_start_tells_sessions_restore_failed(pool_parts):
    make, directory, scheduler, started, view = pool_parts
    sessions = Recorder.start()
    directory["sessions"] = sessions
    pool = make(size=0)
    pool.proxy().stopping = True  # as while corrald stops, or a crashed PoolManager drains its inbox
    pool.tell(restore_session("s-1"))
    assert wait_for(sessions, 1) == [SessionEnded("s-1", "restore_failed")]
    assert started == {}
