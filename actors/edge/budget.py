"""Cost budgets: what a task costs and how much each identity may spend.

Each identity has a token bucket of cost units (`budget.capacity`, refilled
at `budget.refill_per_s`, both overridable per identity). A task costs its
priority's cost plus the cost of each capability it asks for
(`budget.priority_costs`, `budget.capability_costs`: network and high CPU
cost more). Intake charges the cost when it accepts the task; a task that
cannot be paid is refused `budget_exhausted` with the time until it could
be, or `cost_over_capacity` when no wait would ever be enough.

Charging at acceptance is the only point where the daemon knows the task
will run: the identity cannot queue more work than it can pay for. A task
answered without ever reaching a VM (queue full, scheduler restarting,
flushed from the queue by a SCRAM; an exec in a session that is not there,
paused or busy being paused or resumed, that ended with a corrald restart
or lost its VM before the exec reached it, or refused as corrald drains; an
open or fork past the session limits, a fork of a busy session or refused
in safe mode) is refunded, so being told "busy" costs nothing; a fork
is charged as its count of tasks of the default cost (pause and resume
are free, as a close is);
a task that reached a VM is not, whatever its outcome, since it used the VM
(a caller could otherwise crash its own VM to run for free). Budgets live in
memory: a restart of corrald refills every bucket.

The ledger is used from the Intake server thread and read by the metrics
scrape thread, hence the lock; `clock` is injectable for tests.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from actors.errors import Rejected
from protocol.wire import outcomes
from protocol.wire.tasks import PRIORITY_NAMES, ErrorCode, TaskRequest

# Answers that mean the task (or a session's open, exec or fork) never reached a VM: its charge is given back.
REFUNDED_CODES = frozenset({ErrorCode.BUSY, ErrorCode.UNAVAILABLE, ErrorCode.CANCELLED_SCRAM,
                            ErrorCode.SESSION_NOT_FOUND, ErrorCode.SESSION_LIMIT, ErrorCode.DRAINING,
                            ErrorCode.SESSION_BUSY, ErrorCode.SESSION_PAUSED, ErrorCode.SAFE_MODE})
NEVER_MS = 0xFFFF_FFFF  # retry_after_ms when a bucket does not refill at all


def gives_charge_back(reply) -> bool:
    """Whether the one answer to a charged request (a TaskReply or a
    SessionReply) refunds it: it never reached a VM. session_lost says so
    only with the outcome not_run (the session ended with a corrald restart,
    or lost its VM before the exec reached it); with any other, the exec ran
    in a VM that died under it."""
    if reply.error_code in REFUNDED_CODES:
        return True
    return reply.error_code == ErrorCode.SESSION_LOST and getattr(reply, "outcome", "") == outcomes.NOT_RUN


@dataclass(frozen=True)
class TaskCosts:
    """Cost units of a task: by priority (0..3) plus each capability's."""

    by_priority: tuple[float, float, float, float]
    by_capability: dict[str, float]

    @classmethod
    def from_config(cls, budget) -> TaskCosts:
        p = budget.priority_costs
        costs = {"critical": p.critical, "high": p.high, "normal": p.normal, "low": p.low}
        by_priority = [0.0] * len(PRIORITY_NAMES)
        for name, level in PRIORITY_NAMES.items():
            by_priority[level] = costs[name]
        return cls(tuple(by_priority), dict(budget.capability_costs))

    def of(self, request: TaskRequest) -> float:
        return self.by_priority[request.priority] + sum(
            self.by_capability.get(cap.decode("ascii", "replace"), 0.0) for cap in request.capabilities)


class Bucket:
    __slots__ = ("capacity", "refill_per_s", "tokens", "updated", "spent", "refunded")

    def __init__(self, capacity: float, refill_per_s: float, now: float):
        self.capacity = capacity
        self.refill_per_s = refill_per_s
        self.tokens = capacity
        self.updated = now
        self.spent = 0.0  # charged, refunds included: counters only grow
        self.refunded = 0.0

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill_per_s)
        self.updated = now


class BudgetLedger:
    """Token buckets of cost units, one per identity, created full."""

    def __init__(self, capacity: float, refill_per_s: float,
                 overrides: dict[str, tuple[float, float]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.refill_per_s = refill_per_s
        self.overrides = dict(overrides or {})
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, Bucket] = {}

    @classmethod
    def from_config(cls, budget, clock: Callable[[], float] = time.monotonic) -> BudgetLedger:
        return cls(budget.capacity, budget.refill_per_s,
                   {name: (o.capacity, o.refill_per_s) for name, o in budget.overrides.items()}, clock)

    def _bucket(self, name: str, now: float) -> Bucket:
        bucket = self._buckets.get(name)
        if bucket is None:
            capacity, refill = self.overrides.get(name, (self.capacity, self.refill_per_s))
            bucket = self._buckets[name] = Bucket(capacity, refill, now)
        bucket.refill(now)
        return bucket

    def open(self, name: str) -> None:
        """Make `name`'s bucket now, so metrics show it before its first task."""
        with self._lock:
            self._bucket(name, self.clock())

    def charge(self, name: str, cost: float) -> None:
        """Take `cost` from `name`'s bucket, or raise Rejected (nothing taken)."""
        with self._lock:
            bucket = self._bucket(name, self.clock())
            if cost > bucket.capacity:
                raise Rejected(ErrorCode.COST_OVER_CAPACITY,
                               f"this task costs {cost:g} units, more than identity {name!r}'s whole "
                               f"budget of {bucket.capacity:g}: ask for fewer capabilities or a "
                               "lower priority")
            if cost > bucket.tokens:
                missing = cost - bucket.tokens
                if bucket.refill_per_s <= 0:
                    raise Rejected(ErrorCode.BUDGET_EXHAUSTED,
                                   f"identity {name!r} has {bucket.tokens:g} of the {cost:g} units this "
                                   "task costs, and its budget does not refill", NEVER_MS)
                wait_s = missing / bucket.refill_per_s
                raise Rejected(ErrorCode.BUDGET_EXHAUSTED,
                               f"identity {name!r} has {bucket.tokens:.3g} of the {cost:g} units this task "
                               f"costs; retry in {wait_s:.3g} s", min(NEVER_MS, math.ceil(wait_s * 1000)))
            bucket.tokens -= cost
            bucket.spent += cost

    def refund(self, name: str, cost: float) -> None:
        with self._lock:
            bucket = self._bucket(name, self.clock())
            bucket.tokens = min(bucket.capacity, bucket.tokens + cost)
            bucket.refunded += cost

    def remaining(self, name: str) -> float:
        with self._lock:
            return self._bucket(name, self.clock()).tokens

    def snapshot(self) -> dict[str, tuple[float, float, float]]:
        """identity -> (units remaining now, units charged, units refunded) since start."""
        with self._lock:
            now = self.clock()
            return {name: (self._bucket(name, now).tokens, bucket.spent, bucket.refunded)
                    for name, bucket in list(self._buckets.items())}
