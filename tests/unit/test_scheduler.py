"""The Scheduler actor alone: priorities, FIFO, the hard depth, requeue, and
a crash that hands the queue to its successor. The pool is played by a
recording actor that holds no VM (a pool held busy)."""

import dataclasses
import time
import tracemalloc

import pykka
import pytest

from actors.directory import Directory
from actors.messages import Answer, Requeue, RunTask, Submit, Task, TierDemand, VmAvailable
from actors.edge.metrics import Metrics
from actors.ready_queue import task_bytes
from actors.scheduler import QueueLimits, Scheduler
from actors.vm.tiers import Tier
from actors.timers import Timers
from protocol.channel.codec import decode, encode, replace
from protocol.wire.tasks import CLIENT_TO_DAEMON, CRITICAL, LOW, NORMAL, TaskRequest
from tests.support.probe import Recorder, wait_for


def task(ticket, priority=NORMAL):
    return Task(ticket, TaskRequest(task_id=f"t{ticket}", priority=priority, argv=(b"true",), env=(),
                                    cwd=b"", stdin=b"", timeout_ms=1000, output_cap=100,
                                    capabilities=()), time.monotonic())


def start_scheduler(directory, timers, **limits):
    return Scheduler.start(directory=directory, metrics=Metrics(), timers=timers, limits=QueueLimits(**limits))


@pytest.fixture
def actors():
    directory = Directory()
    intake, vm = Recorder.start(), Recorder.start()
    directory["intake"] = intake
    timers = Timers()
    scheduler = start_scheduler(directory, timers, max_depth=1000, max_queued_bytes=1 << 30,
                                max_wait_s=600, retry_after_ms=750)
    directory["scheduler"] = scheduler
    yield directory, scheduler, intake, vm
    pykka.ActorRegistry.stop_all()
    timers.stop()


def test_the_1001st_task_is_refused_at_once_and_the_queue_is_untouched(actors):
    directory, scheduler, intake, vm = actors
    for ticket in range(1, 1001):
        scheduler.tell(Submit(task(ticket, LOW)))
    scheduler.tell(Submit(task(1001, CRITICAL)))
    (answer,) = wait_for(intake, 1)
    assert isinstance(answer, Answer) and answer.ticket == 1001
    assert answer.reply.error_code == "busy" and answer.reply.retry_after_ms == 750
    assert scheduler.proxy().state.get().ready.depth == 1000
    # The queue is intact and in order: a VM that frees up gets the first LOW task.
    scheduler.tell(VmAvailable("vm-1", vm))
    (run,) = wait_for(vm, 1)
    assert isinstance(run, RunTask) and run.task.ticket == 1


def test_priority_then_fifo(actors):
    directory, scheduler, intake, vm = actors
    for ticket, priority in [(1, LOW), (2, NORMAL), (3, LOW), (4, CRITICAL), (5, NORMAL)]:
        scheduler.tell(Submit(task(ticket, priority)))
    for i in range(5):
        scheduler.tell(VmAvailable(f"vm-{i}", vm))
    runs = wait_for(vm, 5)
    assert [r.task.ticket for r in runs] == [4, 2, 5, 1, 3]


def test_requeued_task_goes_first_in_its_level(actors):
    directory, scheduler, intake, vm = actors
    scheduler.tell(Submit(task(1)))
    scheduler.tell(Submit(task(2)))
    scheduler.tell(Requeue(task(9)))
    scheduler.tell(VmAvailable("vm-1", vm))
    assert wait_for(vm, 1)[0].task.ticket == 9


def test_dead_vm_does_not_eat_the_task(actors):
    directory, scheduler, intake, vm = actors
    dead = Recorder.start()
    dead.stop()
    scheduler.tell(VmAvailable("dead", dead))
    scheduler.tell(VmAvailable("alive", vm))
    scheduler.tell(Submit(task(1)))
    assert wait_for(vm, 1)[0].task.ticket == 1


def test_stopping_answers_every_queued_task(actors):
    directory, scheduler, intake, vm = actors
    for ticket in range(1, 4):
        scheduler.tell(Submit(task(ticket)))
    scheduler.stop()
    answers = wait_for(intake, 3)
    assert sorted(a.ticket for a in answers) == [1, 2, 3]
    assert {a.reply.error_code for a in answers} == {"cancelled"}


def test_queued_input_bytes_are_bounded(actors):
    directory, scheduler, intake, vm = actors
    small = start_scheduler(directory, scheduler.proxy().timers.get(), max_depth=1000,
                            max_queued_bytes=1 << 20, max_wait_s=600)
    big = lambda ticket: Task(ticket, replace(task(ticket).request, stdin=b"x" * (600 << 10)),
                              time.monotonic())
    small.tell(Submit(big(1)))
    small.tell(Submit(big(2)))  # 1.2 MiB queued would pass the 1 MiB bound
    (answer,) = wait_for(intake, 1)
    assert answer.ticket == 2 and answer.reply.error_code == "busy"
    assert small.proxy().state.get().ready.depth == 1


def test_queued_bytes_count_what_decoded_requests_hold_not_their_length(actors):
    """4096 one-byte argv items are 4 KiB of input but ~180 KiB of Python
    objects (measured with tracemalloc); the bound counts the objects."""
    directory, scheduler, intake, vm = actors
    payload = encode(replace(task(0).request, argv=(b"x",) * 4096))
    many_args = lambda ticket: Task(ticket, decode(payload, CLIENT_TO_DAEMON), time.monotonic())
    tracemalloc.start()
    held = [many_args(n) for n in range(50)]  # each decoded on its own, as Intake does
    measured = tracemalloc.get_traced_memory()[0] / len(held)
    tracemalloc.stop()
    counted = task_bytes(held[0])
    print(f"FIGURE queued bytes: 4096 argv items of 1 byte: {measured:.0f} B held per task (tracemalloc), "
          f"{counted} B counted, {4096} B of input")
    assert measured <= counted <= 2 * measured
    small = start_scheduler(directory, scheduler.proxy().timers.get(), max_depth=1000,
                            max_queued_bytes=1 << 20, max_wait_s=600)
    for ticket in range(1, 11):
        small.tell(Submit(many_args(ticket)))
    answers = wait_for(intake, 10 - (1 << 20) // counted)
    assert {a.reply.error_code for a in answers} == {"busy"} and "bytes of memory" in answers[0].reply.error_message
    assert small.proxy().state.get().ready.depth == (1 << 20) // counted  # 4, where counting lengths let all 10 in
    assert small.proxy().state.get().ready.queued_bytes == counted * ((1 << 20) // counted)


def test_a_task_no_vm_takes_is_answered_when_its_wait_runs_out(actors):
    directory, scheduler, intake, vm = actors
    impatient = start_scheduler(directory, scheduler.proxy().timers.get(), max_depth=10,
                                max_queued_bytes=1 << 20, max_wait_s=1)
    impatient.tell(Submit(task(7)))
    (answer,) = wait_for(intake, 1, timeout_s=5)
    assert answer.ticket == 7 and answer.reply.error_code == "unavailable"
    assert impatient.proxy().state.get().ready.depth == 0


def test_tasks_go_to_vms_of_their_tier_and_rare_ones_never_block_default_ones(actors):
    directory, scheduler, intake, vm = actors
    pool = Recorder.start()
    directory["pool"] = pool
    net = Tier(network=True)
    net_task = dataclasses.replace(task(1, CRITICAL), request=replace(
        task(1).request, priority=CRITICAL, capabilities=(b"net:egress", b"dev:python")))
    scheduler.tell(Submit(net_task))
    scheduler.tell(Submit(task(2, LOW)))
    # The pool hears that one task waits for the net tier.
    (demand,) = wait_for(pool, 1)
    assert isinstance(demand, TierDemand) and demand.waiting == ((net, 1),)
    # A default VM takes the LOW default task, not the CRITICAL net one.
    scheduler.tell(VmAvailable("vm-default", vm))
    (run,) = wait_for(vm, 1)
    assert run.task.ticket == 2
    net_vm = Recorder.start()
    scheduler.tell(VmAvailable("vm-net", net_vm, net))
    (run,) = wait_for(net_vm, 1)
    assert run.task.ticket == 1
    demand = wait_for(pool, 2)[-1]
    assert demand.waiting == ()
