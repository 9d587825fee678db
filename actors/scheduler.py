"""Scheduler: the priority queue between Intake and the warm pool.

Four levels (CRITICAL 0 .. LOW 3), FIFO within a level, a hard depth: a task
that would make the queue deeper is refused at once with `busy` and nothing
queued is disturbed. Whenever a task and an available VM of its hardware tier
(actors/vm/tiers.py) meet, the task goes to that VM's Supervisor: the first task
in priority order whose tier has a free VM, so a task waiting for a rare tier
never holds up the default tasks behind it. Tasks waiting for a rare tier are
counted to the PoolManager (TierDemand), which boots VMs for them.

In safe mode (an operator's SCRAM) nothing is dispatched: every queued task
is answered `cancelled_scram` at once, and so is any task that still reaches
the Scheduler (in flight from Intake, or handed back by a VM) until an
operator resumes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import pykka

from actors.directory import Directory, drain_inbox
from actors.messages import (ChildFailed, InjectFault, Requeue, ResumeService, RunTask, Scram,
                             Submit, Task, Tick, TierDemand, VmAvailable, VmWithdrawn)
from actors.edge.metrics import Metrics
from actors.vm.tiers import DEFAULT_TIER, tier_of
from actors.timers import Timers
from protocol.wire.tasks import PRIORITY_NAMES, ErrorCode, error_reply

log = logging.getLogger("corral.scheduler")
LEVEL_NAMES = {level: name for name, level in PRIORITY_NAMES.items()}


@dataclass
class SchedulerState:
    """What a restarted Scheduler takes over from the one that crashed."""

    queues: list[deque] = field(default_factory=lambda: [deque() for _ in LEVEL_NAMES])
    available: OrderedDict = field(default_factory=OrderedDict)  # vm_id -> (Supervisor ref, Tier)
    queued_bytes: int = 0
    safe_mode: bool = False
    demand: tuple = ()  # the last TierDemand sent


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


class Scheduler(pykka.ThreadingActor):
    def __init__(self, directory: Directory, metrics: Metrics, timers: Timers, max_depth: int,
                 max_queued_bytes: int, max_wait_s: float, retry_after_ms: int = 1000,
                 state: SchedulerState | None = None, safe_mode: bool = False):
        super().__init__()
        self.directory = directory
        self.metrics = metrics
        self.timers = timers
        self.max_depth = max_depth
        self.max_queued_bytes = max_queued_bytes
        self.max_wait_s = max_wait_s
        self.retry_after_ms = retry_after_ms
        self.state = state or SchedulerState(safe_mode=safe_mode)

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self.state.queues)

    def on_start(self) -> None:
        if self.state.safe_mode:  # a successor may inherit tasks its predecessor's inbox held
            self._flush_for_scram()
        self._publish_depth()
        self._dispatch()
        self.timers.call_later(1.0, self.actor_ref, Tick())

    def on_receive(self, message) -> None:
        if isinstance(message, (Submit, Requeue)) and self.state.safe_mode:
            self._cancel_for_scram(message.task)
        elif isinstance(message, Submit):
            self._submit(message.task)
        elif isinstance(message, Requeue):
            self._enqueue(message.task, front=True)
        elif isinstance(message, Scram):
            self.state.safe_mode = True
            self._flush_for_scram()
        elif isinstance(message, ResumeService):
            self.state.safe_mode = False
        elif isinstance(message, Tick):
            self._expire_waiting()
            self.timers.call_later(1.0, self.actor_ref, Tick())
        elif isinstance(message, (VmAvailable, VmWithdrawn)):
            self._vm_news(message)
        elif isinstance(message, InjectFault) and message.kind == "crash":
            raise RuntimeError("injected fault: scheduler crash")
        else:
            log.warning("scheduler ignores %r", message)
            return
        self._dispatch()
        self._publish_depth()
        self._publish_demand()

    def _vm_news(self, message: VmAvailable | VmWithdrawn) -> None:
        if isinstance(message, VmAvailable):
            self.state.available[message.vm_id] = (message.supervisor, message.tier)
        else:
            self.state.available.pop(message.vm_id, None)

    def _submit(self, task: Task) -> None:
        if self.depth >= self.max_depth:
            return self._refuse(task, f"queue full ({self.max_depth} tasks waiting); retry later")
        if self.state.queued_bytes + task_bytes(task) > self.max_queued_bytes:
            return self._refuse(task, f"queued tasks hold {self.state.queued_bytes} bytes of memory, "
                                      f"this one would add {task_bytes(task)}, the limit is "
                                      f"{self.max_queued_bytes}; retry later")
        self._enqueue(task)

    def _refuse(self, task: Task, text: str) -> None:
        self.directory.answer(task.ticket, error_reply(task.request.task_id, ErrorCode.BUSY, text,
                                                       retry_after_ms=self.retry_after_ms))

    def _flush_for_scram(self) -> None:
        while (task := self._take()) is not None:
            self._cancel_for_scram(task)

    def _cancel_for_scram(self, task: Task) -> None:
        self.directory.answer(task.ticket, error_reply(
            task.request.task_id, ErrorCode.CANCELLED_SCRAM,
            "an operator stopped corral (SCRAM) before this task ran; retry after it resumes"))

    def _enqueue(self, task: Task, front: bool = False) -> None:
        queue = self.state.queues[task.priority]
        queue.appendleft(task) if front else queue.append(task)
        self.state.queued_bytes += task_bytes(task)

    def _take(self) -> Task | None:
        task = next((q.popleft() for q in self.state.queues if q), None)
        if task is not None:
            self.state.queued_bytes -= task_bytes(task)
        return task

    def _match(self) -> tuple[Task, str] | None:
        """The first task in priority order with a free VM of its tier, and that VM."""
        free = {}
        for vm_id, (_, tier) in self.state.available.items():
            free.setdefault(tier, vm_id)
        for queue in self.state.queues:
            for task in queue:
                vm_id = free.get(tier_of(task.request.capabilities))
                if vm_id is not None:
                    queue.remove(task)
                    self.state.queued_bytes -= task_bytes(task)
                    return task, vm_id
        return None

    def _expire_waiting(self) -> None:
        """No VM for too long (boots failing, pool shed): answer rather than hold forever."""
        now = time.monotonic()
        for queue in self.state.queues:
            for task in [t for t in queue if now - t.accepted_at > self.max_wait_s]:
                queue.remove(task)
                self.state.queued_bytes -= task_bytes(task)
                self.directory.answer(task.ticket, error_reply(
                    task.request.task_id, ErrorCode.UNAVAILABLE,
                    f"no VM became free within {self.max_wait_s:g} s; retry later",
                    retry_after_ms=self.retry_after_ms))

    def _dispatch(self) -> None:
        while self.state.available and not self.state.safe_mode:
            match = self._match()
            if match is None:
                return
            task, vm_id = match
            supervisor, _ = self.state.available.pop(vm_id)
            try:
                supervisor.tell(RunTask(task, assigned_at=time.monotonic()))
            except pykka.ActorDeadError:
                self._enqueue(task, front=True)  # that VM is gone; try the next

    def _publish_demand(self) -> None:
        """Tell the pool how many tasks wait per rare tier, when that changed."""
        waiting: dict = {}
        for queue in self.state.queues:
            for task in queue:
                tier = tier_of(task.request.capabilities)
                if tier != DEFAULT_TIER:
                    waiting[tier] = waiting.get(tier, 0) + 1
        demand = tuple(sorted(waiting.items()))
        if demand != self.state.demand and self.directory.tell("pool", TierDemand(demand)):
            self.state.demand = demand

    def _publish_depth(self) -> None:
        for level, name in LEVEL_NAMES.items():
            self.metrics.queue_depth.labels(name).set(len(self.state.queues[level]))

    def on_stop(self) -> None:
        self._take_inbox()
        while (task := self._take()) is not None:
            self.directory.answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.CANCELLED, "corrald is shutting down"))
        self._publish_depth()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # The queue survives the crash, with what was still in the inbox:
        # the successor takes it over.
        self._take_inbox()
        self.directory.tell("root", ChildFailed("scheduler", repr(exception_value), salvage=self.state))

    def _take_inbox(self) -> None:
        for message in drain_inbox(self):
            if isinstance(message, (Submit, Requeue)):
                self._enqueue(message.task, front=isinstance(message, Requeue))
            elif isinstance(message, (VmAvailable, VmWithdrawn)):
                self._vm_news(message)
