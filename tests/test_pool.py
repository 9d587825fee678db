"""The PoolManager alone, with recording actors as its Supervisors: it keeps
the pool full, offers ready VMs, backs off failing boots, retires old VMs and
sheds idle ones under memory pressure."""

import time
import uuid

import pykka
import pytest

from actors.directory import Directory
from actors.messages import HostMemory, Retire, VmAvailable, VmState, VmWithdrawn
from actors.metrics import Metrics
from actors.pool import PoolManager, PoolView
from actors.timers import Timers
from tests.test_scheduler import Recorder, wait_for


@pytest.fixture
def pool_parts():
    directory = Directory()
    scheduler = Recorder.start()
    directory["scheduler"] = scheduler
    started = {}

    def start_supervisor(vm_id):
        started[vm_id] = Recorder.start()
        return started[vm_id]

    timers = Timers()
    view = PoolView()

    def make(size=2, max_age_s=300.0):
        pool = PoolManager.start(directory, Metrics(), timers, start_supervisor,
                                 lambda: f"corral-test-{uuid.uuid4().hex[:12]}", view, size, max_age_s,
                                 backoff_max_s=30.0)
        directory["pool"] = pool
        return pool

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
