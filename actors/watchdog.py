"""Watchdog: liveness of the core actors and VMs, host memory, zombie domains.

Every `interval_s` it checks that each core actor is alive (a dead one is
reported to the Root, which restarts it), tells the PoolManager whether host
memory is short (idle VMs go first), and destroys `corral-` domains that no
Supervisor owns (seen unowned on two ticks running, so a VM being created is
never mistaken for a zombie) and that is no snapshot template being built. It
asks no actor anything: the pool's VM ids come from its PoolView, the
templates' from the Refill (actors/refill.py).
"""

from __future__ import annotations

import logging
from typing import Callable

import pykka

from actors.directory import Directory
from actors.errors import CorralError
from actors.vm.host import Hypervisor
from actors.messages import ChildFailed, HostMemory, Tick
from actors.pool_plan import PoolView
from actors.timers import Timers

log = logging.getLogger("corral.watchdog")
CORE_ACTORS = ("ioguard", "intake", "scheduler", "sessions", "pool")


def available_mib(meminfo: str = "/proc/meminfo") -> int:
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    raise CorralError("no MemAvailable in /proc/meminfo")


class Watchdog(pykka.ThreadingActor):
    def __init__(self, *, directory: Directory, hypervisor: Hypervisor, timers: Timers,
                 pool_view: PoolView, interval_s: float, min_available_mib: int,
                 templates_building: Callable[[], frozenset[str]] = frozenset):
        """`templates_building()`: names of the template VMs being built now."""
        super().__init__()
        self.directory = directory
        self.hypervisor = hypervisor
        self.timers = timers
        self.pool_view = pool_view
        self.templates_building = templates_building
        self.interval_s = interval_s
        self.min_available_mib = min_available_mib
        self.suspects: set[str] = set()
        self.dead_seen: set[str] = set()

    def on_start(self) -> None:
        self.timers.call_later(self.interval_s, self.actor_ref, Tick())

    def on_receive(self, message) -> None:
        if not isinstance(message, Tick):
            return
        for check in (self._check_actors, self._check_memory, self._reap_zombies):
            try:
                check()
            except Exception:  # one failing check must not end the others, or the watchdog
                log.exception("watchdog check %s failed", check.__name__)
        self.timers.call_later(self.interval_s, self.actor_ref, Tick())

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self.directory.tell("root", ChildFailed("watchdog", repr(exception_value)))

    def _check_actors(self) -> None:
        """A dead actor normally reports itself (with its state) as it fails;
        only one seen dead on two ticks running is reported from here."""
        dead = set()
        for name in CORE_ACTORS:
            ref = self.directory.get(name)
            if ref is not None and not ref.is_alive():
                dead.add(name)
                if name in self.dead_seen:
                    log.error("actor %s found dead", name)
                    self.directory.tell("root", ChildFailed(name, "found dead by the watchdog"))
        self.dead_seen = dead

    def _check_memory(self) -> None:
        short = available_mib() < self.min_available_mib
        if short:
            log.warning("host memory below %d MiB available: shedding an idle VM", self.min_available_mib)
        self.directory.tell("pool", HostMemory(short=short))

    def _reap_zombies(self) -> None:
        try:
            unowned = set(self.hypervisor.corral_domains()) - self.pool_view.owned - self.templates_building()
        except CorralError as e:
            log.warning("cannot list domains: %s", e)
            return
        for name in unowned & self.suspects:
            log.warning("destroying zombie domain %s", name)
            try:
                self.hypervisor.destroy_by_name(name)
            except CorralError as e:
                log.error("cannot destroy zombie %s: %s", name, e)
        self.suspects = unowned
