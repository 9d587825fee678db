"""The Scheduler's ready queue alone, no actor: priorities, FIFO, requeue at
the head, tiers, expiry and the memory count. Supervisors are stand-in
objects; nothing is told."""

from actors.messages import Task
from actors.ready_queue import ReadyQueue, task_bytes
from actors.vm.tiers import DEFAULT_TIER, Tier
from protocol.channel.codec import replace
from protocol.wire.tasks import CRITICAL, HIGH, LOW, NORMAL, TaskRequest

NET = Tier(network=True)
BIG = Tier(large_mem=True)


def task(ticket, priority=NORMAL, capabilities=(), accepted_at=100.0):
    return Task(ticket, TaskRequest(task_id=f"t{ticket}", priority=priority, argv=(b"true",), env=(),
                                    cwd=b"", stdin=b"", timeout_ms=1000, output_cap=100,
                                    capabilities=capabilities), accepted_at)


def run_all(queue):
    """(ticket, supervisor) for every match until none is left."""
    runs = []
    while (match := queue.next_match()) is not None:
        runs.append((match[0].ticket, match[1]))
    return runs


def test_priority_then_fifo():
    queue = ReadyQueue()
    for ticket, priority in [(1, LOW), (2, NORMAL), (3, LOW), (4, CRITICAL), (5, NORMAL)]:
        queue.push(task(ticket, priority))
    for i in range(5):
        queue.vm_available(f"vm-{i}", f"supervisor-{i}", DEFAULT_TIER)
    assert [ticket for ticket, _ in run_all(queue)] == [4, 2, 5, 1, 3]
    assert queue.depth == 0 and not queue.available


def test_a_task_pushed_to_the_front_goes_first_in_its_level_only():
    queue = ReadyQueue()
    queue.push(task(1, HIGH))
    queue.push(task(2))
    queue.push(task(9), front=True)
    for i in range(3):
        queue.vm_available(f"vm-{i}", f"supervisor-{i}", DEFAULT_TIER)
    assert [ticket for ticket, _ in run_all(queue)] == [1, 9, 2]


def test_nothing_matches_without_a_vm_and_nothing_is_taken():
    queue = ReadyQueue()
    queue.push(task(1))
    assert queue.next_match() is None
    assert queue.depth == 1 and queue.queued_bytes == task_bytes(task(1))


def test_the_vm_free_longest_goes_first_and_a_withdrawn_one_not_at_all():
    queue = ReadyQueue()
    for vm_id in ("old", "gone", "new"):
        queue.vm_available(vm_id, f"supervisor-{vm_id}", DEFAULT_TIER)
    queue.vm_withdrawn("gone")
    queue.vm_withdrawn("never-there")  # forgetting an unknown VM is not an error
    for ticket in (1, 2, 3):
        queue.push(task(ticket))
    assert run_all(queue) == [(1, "supervisor-old"), (2, "supervisor-new")]
    assert queue.depth == 1


def test_a_task_waiting_for_a_rare_tier_does_not_hold_up_default_tasks():
    queue = ReadyQueue()
    queue.push(task(1, CRITICAL, capabilities=(b"net:egress", b"dev:python")))
    queue.push(task(2, LOW))
    queue.vm_available("vm-default", "default", DEFAULT_TIER)
    assert run_all(queue) == [(2, "default")]
    assert queue.waiting_per_rare_tier() == ((NET, 1),)
    queue.vm_available("vm-net", "net", NET)
    assert run_all(queue) == [(1, "net")]
    assert queue.waiting_per_rare_tier() == ()


def test_a_vm_of_another_tier_takes_nothing():
    queue = ReadyQueue()
    queue.push(task(1))
    queue.vm_available("vm-big", "big", BIG)
    assert queue.next_match() is None
    assert list(queue.available) == ["vm-big"]


def test_demand_is_counted_per_rare_tier_in_tier_order():
    queue = ReadyQueue()
    for ticket, capabilities in [(1, (b"res:large_mem",)), (2, (b"net:egress",)), (3, ()),
                                 (4, (b"net:egress",)), (5, (b"net:egress", b"res:large_mem"))]:
        queue.push(task(ticket, capabilities=capabilities))
    assert queue.waiting_per_rare_tier() == ((BIG, 1), (NET, 2), (Tier(network=True, large_mem=True), 1))


def test_expire_takes_out_only_tasks_past_their_wait():
    queue = ReadyQueue()
    queue.push(task(1, LOW, accepted_at=10.0))
    queue.push(task(2, LOW, accepted_at=50.0))
    queue.push(task(3, CRITICAL, accepted_at=10.0))
    expired = queue.expire(now=70.0, max_wait_s=30.0)
    assert [t.ticket for t in expired] == [3, 1]
    assert queue.depth == 1 and queue.queued_bytes == task_bytes(task(2, LOW))
    assert queue.expire(now=80.0, max_wait_s=30.0) == []


def test_take_all_empties_the_queue_in_priority_order():
    queue = ReadyQueue()
    for ticket, priority in [(1, LOW), (2, CRITICAL), (3, NORMAL), (4, CRITICAL)]:
        queue.push(task(ticket, priority))
    assert [t.ticket for t in queue.take_all()] == [2, 4, 3, 1]
    assert queue.depth == 0 and queue.queued_bytes == 0
    assert queue.depth_by_name() == {"critical": 0, "high": 0, "normal": 0, "low": 0}


def test_depth_by_name_counts_each_level():
    queue = ReadyQueue()
    for ticket, priority in [(1, LOW), (2, LOW), (3, HIGH)]:
        queue.push(task(ticket, priority))
    assert queue.depth_by_name() == {"critical": 0, "high": 1, "normal": 0, "low": 2}
    assert queue.depth == 3


def test_queued_bytes_follow_every_way_in_and_out():
    queue = ReadyQueue()
    big = Task(1, replace(task(1).request, stdin=b"x" * 10_000), 100.0)
    small = task(2)
    queue.push(big)
    queue.push(small)
    assert queue.queued_bytes == task_bytes(big) + task_bytes(small) and task_bytes(big) > 10_000
    queue.vm_available("vm", "supervisor", DEFAULT_TIER)
    assert queue.next_match()[0] is big
    assert queue.queued_bytes == task_bytes(small)
    queue.push(big, front=True)
    assert queue.expire(now=1000.0, max_wait_s=1.0) == [big, small]
    assert queue.queued_bytes == 0
