"""Scheduler: the priority queue between Intake and the warm pool.

Four levels (CRITICAL 0 .. LOW 3), FIFO within a level, a hard depth: a task
that would make the queue deeper is refused at once with `busy` and nothing
queued is disturbed. Whenever a task and an available VM meet, the task goes
to that VM's Supervisor.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import pykka

from actors.directory import Directory
from actors.messages import (Answer, ChildFailed, InjectFault, Requeue, RunTask, Submit, Task,
                             VmAvailable, VmWithdrawn)
from actors.metrics import Metrics
from protocol.tasks import PRIORITY_NAMES, error_reply

log = logging.getLogger("corral.scheduler")
LEVEL_NAMES = {level: name for name, level in PRIORITY_NAMES.items()}


@dataclass
class SchedulerState:
    """What a restarted Scheduler takes over from the one that crashed."""

    queues: list[deque] = field(default_factory=lambda: [deque() for _ in LEVEL_NAMES])
    available: OrderedDict = field(default_factory=OrderedDict)  # vm_id -> Supervisor ref


class Scheduler(pykka.ThreadingActor):
    def __init__(self, directory: Directory, metrics: Metrics, max_depth: int,
                 retry_after_ms: int = 1000, state: SchedulerState | None = None):
        super().__init__()
        self.directory = directory
        self.metrics = metrics
        self.max_depth = max_depth
        self.retry_after_ms = retry_after_ms
        self.state = state or SchedulerState()

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self.state.queues)

    def on_start(self) -> None:
        self._publish_depth()
        self._dispatch()

    def on_receive(self, message) -> None:
        if isinstance(message, Submit):
            self._submit(message.task)
        elif isinstance(message, Requeue):
            self.state.queues[message.task.priority].appendleft(message.task)
        elif isinstance(message, VmAvailable):
            self.state.available[message.vm_id] = message.supervisor
        elif isinstance(message, VmWithdrawn):
            self.state.available.pop(message.vm_id, None)
        elif isinstance(message, InjectFault) and message.kind == "crash":
            raise RuntimeError("injected fault: scheduler crash")
        else:
            log.warning("scheduler ignores %r", message)
            return
        self._dispatch()
        self._publish_depth()

    def _submit(self, task: Task) -> None:
        if self.depth >= self.max_depth:
            self.directory.tell("intake", Answer(task.ticket, error_reply(
                task.request.task_id, "busy",
                f"queue full ({self.max_depth} tasks waiting); retry later",
                retry_after_ms=self.retry_after_ms)))
            return
        self.state.queues[task.priority].append(task)

    def _dispatch(self) -> None:
        while self.state.available:
            task = next((q.popleft() for q in self.state.queues if q), None)
            if task is None:
                return
            vm_id, supervisor = self.state.available.popitem(last=False)
            try:
                supervisor.tell(RunTask(task, assigned_at=time.monotonic()))
            except pykka.ActorDeadError:
                self.state.queues[task.priority].appendleft(task)  # that VM is gone; try the next

    def _publish_depth(self) -> None:
        for level, name in LEVEL_NAMES.items():
            self.metrics.queue_depth.labels(name).set(len(self.state.queues[level]))

    def on_stop(self) -> None:
        for queue in self.state.queues:
            while queue:
                task = queue.popleft()
                self.directory.tell("intake", Answer(task.ticket, error_reply(
                    task.request.task_id, "cancelled", "corrald is shutting down")))
        self._publish_depth()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # The queue survives the crash: the successor takes it over.
        self.directory.tell("root", ChildFailed("scheduler", repr(exception_value), salvage=self.state))
