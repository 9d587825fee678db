"""The running service: builds the supervision tree from a Config and takes it
down again. corrald runs one; tests start their own on their own endpoint."""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pykka

from actors.edge.control import ControlServer, Mode, SafeModeFile
from actors.artifacts import signing
from actors.edge.connections import plan_fd_budget
from actors.directory import Directory
from actors.edge.endpoint import check_endpoint_free
from actors.vm.host import Hypervisor
from actors.edge.identity import Admission
from actors.edge.intake_server import KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, IntakeServer, TaskLimits
from actors.intake import Intake
from actors.messages import Drain, RestoreSession, ResumeService, Scram
from actors.ioguard import IOGuard, ReadLimits
from actors.edge.metrics import Metrics
from actors.egress.proxy import EgressProxy, EgressSettings
from actors.pool import PoolManager, PoolSettings
from actors.pool_plan import PoolView
from actors.refill import Refill
from actors.root import Root
from actors.scheduler import QueueLimits, Scheduler
from actors.session_table import SessionLimits, SessionRecord, SessionsView
from actors.sessions import Sessions
from actors.supervisor import Supervisor, VmSettings
from actors.vm.tiers import DEFAULT_TIER, RARE_TIERS, Tier
from actors.timers import Timers
from actors.watchdog import Watchdog

import config

log = logging.getLogger("corral.service")
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_large_buffers_to_the_os(threshold: int = 32 * 1024) -> None:
    """Task output passes through corrald in buffers of up to the output cap.
    glibc raises its mmap threshold as such blocks are freed and then keeps
    them in per-thread arenas, so RSS would ratchet up with every large
    reply. A fixed threshold makes every large buffer an mmap that free()
    gives straight back."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        log.debug("mallopt unavailable: large buffers stay with the allocator")


class Corral:
    def __init__(self, cfg: config.Config, hypervisor: Hypervisor | None = None, *,
                 on_give_up: Callable[[str], None] | None = None):
        """`hypervisor`: None to open one for `cfg` (closed at stop); `on_give_up(reason)`
        is called when the Root gives up restarting a failing actor."""
        self.cfg = cfg
        self.hypervisor = hypervisor or Hypervisor.from_config(cfg)
        self.owns_hypervisor = hypervisor is None
        self.metrics = Metrics()
        self.refill = Refill(self.hypervisor, self.metrics, enabled=cfg.snapshots.enabled,
                             boot_timeout_s=cfg.vm.boot_timeout_s)
        self.directory = Directory()
        self.egress = EgressProxy(EgressSettings.from_config(cfg.egress), self.metrics)
        self.timers = Timers()
        self.gave_up = threading.Event()
        self.give_up_reason = ""
        self.on_give_up = on_give_up
        # Sessions' VMs come on top of the pool's: it replaces each one a session takes.
        self.fd_budget = plan_fd_budget(cfg.daemon.max_connections, cfg.control.max_connections,
                                        cfg.pool.size + cfg.pool.tier_max * len(RARE_TIERS) + cfg.sessions.max_total)
        self.server = IntakeServer(
            cfg.daemon.endpoint, TaskLimits.from_config(cfg), self.metrics, self.directory,
            Admission.from_config(cfg, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, self.metrics),
            max_connections=self.fd_budget.client)
        self.signer = signing.load_or_create(cfg.artifacts.key_path(cfg.state_dir))
        self.vm_settings = VmSettings.from_config(cfg, self.signer)
        self.directory.answer_fallback = self.server.post
        self.pool_view = PoolView()
        self.sessions_view = SessionsView()
        self.root: pykka.ActorRef | None = None
        control_dir = Path(cfg.control.endpoint[len("ipc://"):]).parent
        self.safe_mode_file = SafeModeFile(control_dir / f"{cfg.daemon.instance}.safe-mode")
        self.mode = Mode()
        self.mode_lock = threading.Lock()
        held = self.safe_mode_file.read()
        if held is not None:  # a SCRAM outlives restarts until an operator resumes
            self._set_mode("safe_mode", held.get("reason", ""), held.get("since", 0))
        self.control = ControlServer(cfg.control.endpoint, self, cfg.control.faults,
                                     cfg.control.scram_pause_timeout_s, self.fd_budget.control)

    # --- factories: name -> callable(salvage) -> ActorRef, in start order ------

    def _factories(self) -> dict[str, Callable[[Any], pykka.ActorRef]]:
        cfg = self.cfg
        return {
            "ioguard": lambda salvage: IOGuard.start(
                limits=ReadLimits.from_config(cfg), directory=self.directory),
            "intake": lambda salvage: Intake.start(self.server, self.directory),
            "scheduler": lambda salvage: Scheduler.start(
                directory=self.directory, metrics=self.metrics, timers=self.timers,
                limits=QueueLimits.from_config(cfg), state=salvage, safe_mode=self.in_safe_mode),
            "sessions": lambda salvage: Sessions.start(
                directory=self.directory, metrics=self.metrics, timers=self.timers,
                limits=SessionLimits.from_config(cfg), view=self.sessions_view, state=salvage,
                safe_mode=self.in_safe_mode,
                record=SessionRecord.for_instance(cfg.state_dir, cfg.daemon.instance)),
            "pool": lambda salvage: PoolManager.start(
                directory=self.directory, metrics=self.metrics, timers=self.timers,
                start_supervisor=self._start_supervisor, new_name=self.hypervisor.new_name,
                view=self.pool_view, settings=PoolSettings.from_config(cfg), state=salvage,
                safe_mode=self.in_safe_mode),
            "watchdog": lambda salvage: Watchdog.start(
                directory=self.directory, hypervisor=self.hypervisor, timers=self.timers,
                pool_view=self.pool_view, templates_building=self.refill.building,
                interval_s=cfg.watchdog.interval_s,
                min_available_mib=cfg.watchdog.min_available_mib),
        }

    def _start_supervisor(self, vm_id: str, tier: Tier = DEFAULT_TIER,
                          restore: RestoreSession | None = None) -> pykka.ActorRef:
        return Supervisor.start(vm_id, directory=self.directory, hypervisor=self.hypervisor, refill=self.refill,
                                timers=self.timers, metrics=self.metrics, settings=self.vm_settings, tier=tier,
                                egress=self.egress, restore=restore)

    def _ioguard_totals(self) -> dict:
        ioguard = self.directory.get("ioguard")
        try:
            return ioguard.proxy().stats().get(timeout=2)["total"] if ioguard else {}
        except Exception:  # a scrape must not fail because IOGuard is restarting
            return {}

    def _give_up(self, reason: str) -> None:
        self.give_up_reason = reason
        self.gave_up.set()
        if self.on_give_up is not None:
            self.on_give_up(reason)

    # --- modes (the control plane drives these) ---------------------------------

    @property
    def in_safe_mode(self) -> bool:
        return self.mode.name == "safe_mode"

    def _set_mode(self, name: str, reason: str = "", since: float | None = None) -> None:
        self.mode = Mode(name, reason, time.time() if since is None else since)
        self.metrics.safe_mode.set(name == "safe_mode")
        self.server.refusal = {
            "serving": None,
            "draining": ("draining", "corrald is draining: it finishes its tasks and takes no new ones"),
            "safe_mode": ("safe_mode", f"corrald is in safe mode after a SCRAM ({reason}); "
                                       "an operator must resume it"),
        }[name]
        log.warning("mode: %s%s", name, f" ({reason})" if reason else "")

    def enter_safe_mode(self, reason: str) -> None:
        """SCRAM: persisted first, then new work refused, the queue flushed and
        every VM frozen (the Scheduler and PoolManager do their part)."""
        with self.mode_lock:
            self.safe_mode_file.enter(reason)
            self._set_mode("safe_mode", reason)
            self.directory.tell("scheduler", Scram(reason))
            self.directory.tell("sessions", Scram(reason))
            self.directory.tell("pool", Scram(reason))

    def resume_service(self) -> None:
        with self.mode_lock:
            self.safe_mode_file.clear()
            self._set_mode("serving")
            self.directory.tell("scheduler", ResumeService())
            self.directory.tell("sessions", ResumeService())
            self.directory.tell("pool", ResumeService())

    def drain(self) -> None:
        with self.mode_lock:
            if not self.in_safe_mode:  # safe mode already refuses, and more
                self._set_mode("draining")
                self.directory.tell("sessions", Drain())  # each session closes once its execs are answered

    # --- life cycle ------------------------------------------------------------

    def start(self) -> None:
        return_large_buffers_to_the_os()
        check_endpoint_free(self.cfg.daemon.endpoint, "daemon.endpoint")
        check_endpoint_free(self.cfg.control.endpoint, "control.endpoint")
        self.server.start()  # binds first: a busy endpoint fails before any VM boots
        self.metrics_port = self.metrics.serve(self.cfg.metrics.address, self.cfg.metrics.port)
        self.metrics.watch_ioguard(self._ioguard_totals)
        self.metrics.watch_pool(self.pool_view)
        self.egress.start()
        self.root = Root.start(directory=self.directory, factories=self._factories(), metrics=self.metrics,
                               max_restarts=self.cfg.supervision.max_restarts,
                               window_s=self.cfg.supervision.window_s, give_up=self._give_up)
        self.root.proxy().started().get(timeout=30)
        self.control.start()

    def stop(self, grace_s: float = 0.0) -> None:
        """Refuse new tasks; give those accepted up to `grace_s` to finish; then
        answer the rest `cancelled`, destroy every VM, release the endpoints."""
        self.server.refusal = ("shutting_down", "corrald is shutting down")
        deadline = time.monotonic() + grace_s
        while self.server.unanswered() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.control.stop()
        try:
            if self.root is not None:
                self.root.proxy().stop_children().get(timeout=600)
                self.root.stop()
        finally:
            self.server.stop()  # answers whatever no actor did
            self.egress.stop()
            self.timers.stop()
            self.metrics.close()
            if self.owns_hypervisor:
                self.hypervisor.close()
