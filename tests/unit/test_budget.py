"""The budget ledger and task costs, on an injected clock."""

import pytest

import config
from actors.edge.budget import NEVER_MS, BudgetLedger, TaskCosts
from actors.errors import Rejected
from protocol.wire.tasks import CRITICAL, LOW, NORMAL, TaskRequest


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(priority=NORMAL, capabilities=()) -> TaskRequest:
    return TaskRequest(task_id="t", priority=priority, argv=(b"true",), env=(), cwd=b"", stdin=b"",
                       timeout_ms=0, output_cap=0, capabilities=tuple(c.encode() for c in capabilities))


def refused(ledger, name, cost) -> Rejected:
    with pytest.raises(Rejected) as error:
        ledger.charge(name, cost)
    return error.value


def test_a_bucket_starts_full_and_refuses_with_the_time_to_wait():
    clock = Clock()
    ledger = BudgetLedger(capacity=10, refill_per_s=2, clock=clock)
    for _ in range(4):
        ledger.charge("alice", 2.5)
    assert ledger.remaining("alice") == 0
    error = refused(ledger, "alice", 3)
    assert error.code == "budget_exhausted" and "alice" in str(error)
    assert error.retry_after_ms == 1500  # 3 units at 2 per second
    assert ledger.remaining("alice") == 0  # a refusal takes nothing


def test_the_bucket_refills_over_time_up_to_its_capacity():
    clock = Clock()
    ledger = BudgetLedger(capacity=10, refill_per_s=2, clock=clock)
    ledger.charge("alice", 10)
    clock.now += 1.5
    assert ledger.remaining("alice") == pytest.approx(3)
    refused(ledger, "alice", 4)
    clock.now += 0.5
    ledger.charge("alice", 4)  # exactly the wait it was told
    clock.now += 3600
    assert ledger.remaining("alice") == 10


def test_identities_have_separate_buckets_and_overrides():
    clock = Clock()
    ledger = BudgetLedger(capacity=10, refill_per_s=1, overrides={"batch": (100, 50)}, clock=clock)
    ledger.charge("alice", 10)
    ledger.charge("batch", 60)
    assert ledger.remaining("bob") == 10
    assert ledger.remaining("batch") == 40
    clock.now += 1
    assert ledger.remaining("batch") == 90 and ledger.remaining("alice") == 1


def test_a_task_dearer_than_the_whole_budget_is_refused_for_good():
    ledger = BudgetLedger(capacity=5, refill_per_s=1, clock=Clock())
    error = refused(ledger, "alice", 6)
    assert error.code == "cost_over_capacity" and error.retry_after_ms == 0


def test_a_bucket_that_never_refills_says_so():
    ledger = BudgetLedger(capacity=2, refill_per_s=0, clock=Clock())
    ledger.charge("alice", 2)
    error = refused(ledger, "alice", 1)
    assert error.code == "budget_exhausted" and error.retry_after_ms == NEVER_MS
    assert "does not refill" in str(error)


def test_refunds_give_back_without_passing_capacity_and_counters_only_grow():
    clock = Clock()
    ledger = BudgetLedger(capacity=10, refill_per_s=1, clock=clock)
    ledger.charge("alice", 4)
    ledger.charge("alice", 4)
    ledger.refund("alice", 4)
    assert ledger.snapshot() == {"alice": (6, 8, 4)}
    clock.now += 100
    ledger.refund("alice", 4)
    assert ledger.remaining("alice") == 10


def test_costs_are_the_priority_cost_plus_each_capability_cost():
    costs = TaskCosts.from_config(config.load().budget)
    assert costs.of(request()) == 1
    assert costs.of(request(LOW)) == 0.5
    assert costs.of(request(CRITICAL, ["net:egress", "res:high_cpu", "dev:python"])) == 8 + 20 + 10
    assert costs.of(request(capabilities=["net:egress"])) > costs.of(request(capabilities=["dev:python"]))
