"""Scheduler: the priority queue between Intake and the warm pool.

Four levels (CRITICAL 0 .. LOW 3), FIFO within a level, a hard depth: a task
that would make the queue deeper is refused at once with `busy` and nothing
queued is disturbed. Whenever a task and an available VM of its hardware tier
(actors/vm/tiers.py) meet, the task goes to that VM's Supervisor: the first task
in priority order whose tier has a free VM, so a task waiting for a rare tier
never holds up the default tasks behind it. Tasks waiting for a rare tier are
counted to the PoolManager (TierDemand), which boots VMs for them. The queue
and the choice of what runs next where are plain logic in actors/ready_queue.py;
this actor feeds it messages and tells the results.

In safe mode (an operator's SCRAM) nothing is dispatched: every queued task
is answered `cancelled_scram` at once, and so is any task that still reaches
the Scheduler (in flight from Intake, or handed back by a VM) until an
operator resumes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import pykka

from actors.directory import Directory, drain_inbox
from actors.messages import (ChildFailed, InjectFault, Requeue, ResumeService, RunTask, Scram,
                             Submit, Task, Tick, TierDemand, VmAvailable, VmWithdrawn)
from actors.edge.metrics import Metrics
from actors.ready_queue import ReadyQueue, task_bytes
from actors.timers import Timers
from config import Config
from protocol.wire.tasks import ErrorCode, error_reply

log = logging.getLogger("corral.scheduler")


@dataclass(frozen=True)
class QueueLimits:
    max_depth: int  # tasks queued at most; one more is refused `busy`
    max_queued_bytes: int  # what queued tasks may hold in memory (ready_queue.task_bytes)
    max_wait_s: float  # a task no VM took within this is answered `unavailable`
    retry_after_ms: int = 1000  # what those refusals tell the caller to wait

    @classmethod
    def from_config(cls, cfg: Config) -> QueueLimits:
        tasks = cfg.tasks
        return cls(max_depth=tasks.queue_depth, max_queued_bytes=tasks.max_queued_bytes,
                   max_wait_s=tasks.max_queue_wait_s, retry_after_ms=int(tasks.busy_retry_after_s * 1000))


@dataclass
class SchedulerState:
    """What a restarted Scheduler takes over from the one that crashed."""

    ready: ReadyQueue = field(default_factory=ReadyQueue)
    safe_mode: bool = False
    demand: tuple = ()  # the last TierDemand sent


class Scheduler(pykka.ThreadingActor):
    def __init__(self, *, directory: Directory, metrics: Metrics, timers: Timers, limits: QueueLimits,
                 state: SchedulerState | None = None, safe_mode: bool = False):
        """`state`: a crashed predecessor's, taken over; else an empty queue in `safe_mode` or not."""
        super().__init__()
        self.directory = directory
        self.metrics = metrics
        self.timers = timers
        self.limits = limits
        self.state = state or SchedulerState(safe_mode=safe_mode)

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
            self.state.ready.push(message.task, front=True)
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
            self.state.ready.vm_available(message.vm_id, message.supervisor, message.tier)
        else:
            self.state.ready.vm_withdrawn(message.vm_id)

    def _submit(self, task: Task) -> None:
        limits = self.limits
        if self.state.ready.depth >= limits.max_depth:
            return self._refuse(task, f"queue full ({limits.max_depth} tasks waiting); retry later")
        if self.state.ready.queued_bytes + task_bytes(task) > limits.max_queued_bytes:
            return self._refuse(task, f"queued tasks hold {self.state.ready.queued_bytes} bytes of memory, "
                                      f"this one would add {task_bytes(task)}, the limit is "
                                      f"{limits.max_queued_bytes}; retry later")
        self.state.ready.push(task)

    def _refuse(self, task: Task, text: str) -> None:
        self.directory.answer(task.ticket, error_reply(task.request.task_id, ErrorCode.BUSY, text,
                                                       retry_after_ms=self.limits.retry_after_ms))

    def _flush_for_scram(self) -> None:
        for task in self.state.ready.take_all():
            self._cancel_for_scram(task)

    def _cancel_for_scram(self, task: Task) -> None:
        self.directory.answer(task.ticket, error_reply(
            task.request.task_id, ErrorCode.CANCELLED_SCRAM,
            "an operator stopped corral (SCRAM) before this task ran; retry after it resumes"))

    def _expire_waiting(self) -> None:
        """No VM for too long (boots failing, pool shed): answer rather than hold forever."""
        for task in self.state.ready.expire(time.monotonic(), self.limits.max_wait_s):
            self.directory.answer(task.ticket, error_reply(
                task.request.task_id, ErrorCode.UNAVAILABLE,
                f"no VM became free within {self.limits.max_wait_s:g} s; retry later",
                retry_after_ms=self.limits.retry_after_ms))

    def _dispatch(self) -> None:
        if self.state.safe_mode:
            return
        while (match := self.state.ready.next_match()) is not None:
            task, supervisor = match
            try:
                supervisor.tell(RunTask(task, assigned_at=time.monotonic()))
            except pykka.ActorDeadError:
                self.state.ready.push(task, front=True)  # that VM is gone; try the next

    def _publish_demand(self) -> None:
        """Tell the pool how many tasks wait per rare tier, when that changed."""
        demand = self.state.ready.waiting_per_rare_tier()
        if demand != self.state.demand and self.directory.tell("pool", TierDemand(demand)):
            self.state.demand = demand

    def _publish_depth(self) -> None:
        for name, depth in self.state.ready.depth_by_name().items():
            self.metrics.queue_depth.labels(name).set(depth)

    def on_stop(self) -> None:
        self._take_inbox()
        for task in self.state.ready.take_all():
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
                self.state.ready.push(message.task, front=isinstance(message, Requeue))
            elif isinstance(message, (VmAvailable, VmWithdrawn)):
                self._vm_news(message)
