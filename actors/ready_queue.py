"""The Scheduler's ready queue: the tasks waiting, by priority, and the VMs
free to take them, and which task goes to which VM next. Plain data, no
actor: the Scheduler (actors/scheduler.py) owns one, hands it to its successor
if it crashes, and does the telling; tests drive it directly.

Four levels (CRITICAL 0 .. LOW 3), FIFO within a level; a task handed back by
a VM goes to the head of its level. The next match is the first task in
priority order whose hardware tier (actors/vm/tiers.py) has a free VM, and the
VM of that tier free the longest: a task waiting for a rare tier never holds
up the default tasks behind it.

It also counts what its tasks hold in memory (task_bytes), for the
Scheduler's bound tasks.max_queued_bytes.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque

import pykka

from actors.messages import Task
from actors.vm.tiers import DEFAULT_TIER, Tier, tier_of
from protocol.wire.tasks import PRIORITY_NAMES

LEVEL_NAMES = {level: name for name, level in PRIORITY_NAMES.items()}

# What one task costs besides its byte strings and tuples: the Task, its
# TaskRequest and Submit (~630 bytes measured with tracemalloc), the ledger
# entry and the in-flight key in Intake.
TASK_OVERHEAD_BYTES = 1024


def _held(obj) -> int:
    """Bytes one object takes on the heap: its size rounded up to the allocator's 16."""
    return -(-sys.getsizeof(obj) // 16) * 16


def task_bytes(task: Task) -> int:
    """What a queued task holds in memory once decoded, the bound of
    tasks.max_queued_bytes: every byte string and tuple of its request, each
    with its object header (a 1-byte argv item takes 48 bytes, not 1), plus
    TASK_OVERHEAD_BYTES. The raw request frame is not kept after decoding,
    so it is not counted."""
    request = task.request
    objects = [request.task_id, request.argv, *request.argv, request.env, request.cwd, request.stdin,
               request.capabilities, *request.capabilities, request.files_in, request.collect, *request.collect]
    for pair in request.env:
        objects += (pair, *pair)
    for item in request.files_in:  # (path, mode, data)
        objects += (item, item[0], item[2])
    return TASK_OVERHEAD_BYTES + sum(map(_held, objects))


class ReadyQueue:
    def __init__(self) -> None:
        self.levels: list[deque[Task]] = [deque() for _ in LEVEL_NAMES]
        # vm_id -> (its Supervisor, its tier), the longest free first
        self.available: OrderedDict[str, tuple[pykka.ActorRef, Tier]] = OrderedDict()
        self.queued_bytes = 0

    # --- tasks -------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return sum(len(level) for level in self.levels)

    def depth_by_name(self) -> dict[str, int]:
        """Tasks waiting per priority name (critical, high, normal, low)."""
        return {name: len(self.levels[level]) for level, name in LEVEL_NAMES.items()}

    def push(self, task: Task, front: bool = False) -> None:
        """Queue `task` at the tail of its level, or at its head (`front`)."""
        level = self.levels[task.priority]
        level.appendleft(task) if front else level.append(task)
        self.queued_bytes += task_bytes(task)

    def take_all(self) -> list[Task]:
        """Every task, in priority order, and the queue empty."""
        tasks = [task for level in self.levels for task in level]
        for level in self.levels:
            level.clear()
        self.queued_bytes = 0
        return tasks

    def expire(self, now: float, max_wait_s: float) -> list[Task]:
        """Take out the tasks accepted more than `max_wait_s` before `now`."""
        expired = []
        for level in self.levels:
            for task in [t for t in level if now - t.accepted_at > max_wait_s]:
                level.remove(task)
                self.queued_bytes -= task_bytes(task)
                expired.append(task)
        return expired

    def waiting_per_rare_tier(self) -> tuple[tuple[Tier, int], ...]:
        """((tier, tasks waiting for it), ...) for every tier but the default, in tier order."""
        waiting: dict[Tier, int] = {}
        for level in self.levels:
            for task in level:
                tier = tier_of(task.request.capabilities)
                if tier != DEFAULT_TIER:
                    waiting[tier] = waiting.get(tier, 0) + 1
        return tuple(sorted(waiting.items()))

    # --- VMs -----------------------------------------------------------------------

    def vm_available(self, vm_id: str, supervisor: pykka.ActorRef, tier: Tier) -> None:
        self.available[vm_id] = (supervisor, tier)

    def vm_withdrawn(self, vm_id: str) -> None:
        self.available.pop(vm_id, None)

    # --- what runs next where ---------------------------------------------------------

    def next_match(self) -> tuple[Task, pykka.ActorRef] | None:
        """The first task in priority order with a free VM of its tier, and that
        VM's Supervisor, both taken out; None if no task has a VM."""
        if not self.available:
            return None
        free: dict[Tier, str] = {}
        for vm_id, (_, tier) in self.available.items():
            free.setdefault(tier, vm_id)
        for level in self.levels:
            for index, task in enumerate(level):
                vm_id = free.get(tier_of(task.request.capabilities))
                if vm_id is not None:
                    del level[index]
                    self.queued_bytes -= task_bytes(task)
                    supervisor, _ = self.available.pop(vm_id)
                    return task, supervisor
        return None
