"""Root: the top of corrald's supervision tree.

    Root
     ├─ IOGuard      reads every guest channel
     ├─ Intake       (+ IntakeServer thread: ROUTER socket and ledger)
     ├─ Scheduler    priority queue
     ├─ Sessions     VMs kept across execs, and their owners
     ├─ PoolManager  ── Supervisor per VM (one-for-one: a VM's failure is its own)
     └─ Watchdog

Core actors are restarted one-for-one. A crashed actor hands its state to its
successor (ChildFailed.salvage): the Scheduler its queue, Sessions its
table, the PoolManager its VM table; the Intake's ledger lives in the server thread and survives as is.
IOGuard's channels cannot be salvaged mid-frame: as it fails it tells every
VM's Supervisor its channel is lost, so each VM is ended and replaced (tasks
on them answered vm_lost, none lost). More than
`max_restarts` within `window_s` and the Root gives up: corrald stops,
answering every task it holds.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

import pykka

from actors.directory import Directory
from actors.edge.metrics import Metrics
from actors.messages import ChildFailed

log = logging.getLogger("corral.root")


class Root(pykka.ThreadingActor):
    def __init__(self, *, directory: Directory, factories: dict[str, Callable[[Any], pykka.ActorRef]],
                 metrics: Metrics, max_restarts: int, window_s: float, give_up: Callable[[str], None]):
        super().__init__()
        self.directory = directory
        self.factories = factories  # name -> callable(salvage) -> ActorRef, in start order
        self.metrics = metrics
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.give_up = give_up
        self.restarts: deque[float] = deque()
        self.stopping = False

    def on_start(self) -> None:
        self.directory["root"] = self.actor_ref
        for name, factory in self.factories.items():
            self.directory[name] = factory(None)

    def started(self) -> bool:
        """Answered once on_start has run: every core actor is in the directory."""
        return True

    def on_receive(self, message) -> None:
        if isinstance(message, ChildFailed):
            self._child_failed(message)

    def _child_failed(self, failure: ChildFailed) -> None:
        if self.stopping:
            return  # shutting down: nothing is restarted
        current = self.directory.get(failure.name)
        if current is not None and current.is_alive():
            return  # already replaced (the watchdog may report a death the Root handled)
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > self.window_s:
            self.restarts.popleft()
        if len(self.restarts) > self.max_restarts:
            log.critical("%d restarts within %.0f s (last: %s: %s): giving up",
                         len(self.restarts), self.window_s, failure.name, failure.error)
            self.give_up(f"actor {failure.name} keeps failing: {failure.error}")
            return
        log.error("restarting %s after: %s", failure.name, failure.error)
        self.metrics.actor_restarts.labels(failure.name).inc()
        self.directory[failure.name] = self.factories[failure.name](failure.salvage)

    def stop_children(self, timeout_s: float = 90.0) -> None:
        """Stop in reverse start order: the Watchdog first, so nothing is reaped
        or restarted mid-shutdown; Intake and IOGuard last, to carry the answers."""
        self.stopping = True
        for name in reversed(list(self.factories)):
            ref = self.directory.get(name)
            if ref is not None:
                try:
                    ref.stop(timeout=timeout_s)
                except (pykka.ActorDeadError, pykka.Timeout):
                    log.error("%s did not stop within %.0f s", name, timeout_s)
