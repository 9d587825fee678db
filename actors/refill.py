"""Refill: how a new VM is made for its Supervisor. A clone restored from its
tier's snapshot template where one is on disk (~0.5 s under TCG); where none
is, one Supervisor at a time builds it (a boot and a save, ~6 s) and then
restores from it, while the others cold boot; a cold boot where snapshots are
off (config [snapshots] enabled), held off after failures, or failing.

One Refill is shared by every Supervisor (their threads call it, never
another actor) and the Watchdog, which counts the template VMs being built as
owned. What happens after the restore (the Resume exchange, the warm-up) is
the Supervisor's; it reports a clone that failed there with restore_failed.

Failures never fail a task: a restore that fails falls back to a cold boot
with one warning and corral_snapshot_restore_failures_total, and that tier's
refills boot for a while (RESTORE_HOLD_OFF_S, doubling while failures go on);
a template removed or rebuilt while a clone waited for it is no failure: the
clone looks it up again (restores a rebuilt one, builds or boots otherwise);
a build that fails is counted in corral_snapshot_builds_total{result="failed"}
and not retried for BUILD_HOLD_OFF_S (doubling), so a broken image or host
never makes a build loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from actors.edge.metrics import Metrics
from actors.errors import CorralError
from actors.vm.errors import RestoreFailed, TemplateBuildFailed, TemplateGone
from actors.vm.handle import VmHandle
from actors.vm.host import Hypervisor
from actors.vm.snapshots import Template, TemplateKey

log = logging.getLogger("corral.refill")

RESTORE_HOLD_OFF_S = (10.0, 600.0)  # after a failed clone: first, longest
TEMPLATE_LOOKUPS = 2  # a template removed or rebuilt under a waiting clone is looked up again, once
BUILD_HOLD_OFF_S = (60.0, 3600.0)  # after a failed template build: first, longest


@dataclass(frozen=True)
class NewVm:
    """A VM made for a Supervisor, running."""

    handle: VmHandle
    kind: str  # restore, build (restored after building the template) or boot: the refill's label
    key: TemplateKey | None = None  # the template a clone was restored from; None for a boot


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0  # monotonic; nothing of this kind is tried for the key before


class Refill:
    """Makes VMs for Supervisors. Thread-safe."""

    def __init__(self, hypervisor: Hypervisor, metrics: Metrics, *, enabled: bool, boot_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.hypervisor = hypervisor
        self.metrics = metrics
        self.enabled = enabled
        self.boot_timeout_s = boot_timeout_s
        self.clock = clock
        self._lock = threading.Lock()
        self._building: dict[TemplateKey, str] = {}  # key -> its template VM's name, while it builds
        self._failures: dict[tuple[str, TemplateKey], _Failures] = {}  # ("restore"|"build", key)

    def building(self) -> frozenset[str]:
        """Names of the template VMs being built now: domains no Supervisor owns
        that are no zombies (the Watchdog leaves them be)."""
        with self._lock:
            return frozenset(self._building.values())

    # --- making a VM ------------------------------------------------------------

    def new_vm(self, name: str, network: bool = False, memory_mib: int | None = None) -> NewVm:
        """A running VM named `name` of this tier: restored, or cold booted where
        that cannot be. Blocks its caller's thread (a build takes seconds).
        Raises what Hypervisor.create raises if the cold boot fails too, and
        RestoreFailed (may_finish_late) where a restore ran past its deadline:
        libvirt may still create a domain named `name`, so no boot may take the
        name; the caller gives it up (its Supervisor ends, the pool starts a VM
        of a fresh name, and the Watchdog reaps the late domain if one comes)."""
        if self.enabled:
            clone = self._clone(name, network, memory_mib)
            if clone is not None:
                return clone
        return NewVm(self.hypervisor.create(name=name, network=network, memory_mib=memory_mib), "boot")

    def _clone(self, name: str, network: bool, memory_mib: int | None) -> NewVm | None:
        for _ in range(TEMPLATE_LOOKUPS):
            try:
                key = self.hypervisor.template_key(network, memory_mib)
                with self._lock:
                    if self._held_off("restore", key):
                        return None
                template, kind = self.hypervisor.template(network, memory_mib), "restore"
                if template is None:
                    template, kind = self._build(key, network, memory_mib)
                    if template is None:
                        return None
            except (CorralError, OSError) as e:  # the images cannot be read: the boot will say so
                log.warning("no snapshot for VM %s (%s); booting it", name, e)
                return None
            try:
                return NewVm(self.hypervisor.restore(template, name=name), kind, key)
            except TemplateGone as e:  # another clone or a sweep removed it, or a build replaced it
                log.info("%s; looking for its template again", e)
            except RestoreFailed as e:
                self.restore_failed(key, "restore", str(e), template_removed=e.template_removed)
                if e.may_finish_late:
                    raise
                return None
        return None

    def _build(self, key: TemplateKey, network: bool, memory_mib: int | None) -> tuple[Template | None, str]:
        """(template, refill kind): this tier's template, built by the caller if no
        one else builds it now; None where someone does or the build failed (the
        caller boots meanwhile)."""
        with self._lock:
            if key in self._building or self._held_off("build", key):
                return None, "boot"
            name = self.hypervisor.new_name()
            self._building[key] = name  # owned before its domain exists: never a zombie
        try:
            built = self.hypervisor.template(network, memory_mib)  # by a builder that just finished
            if built is not None:
                return built, "restore"
            started = self.clock()
            built = self.hypervisor.build_template(network, memory_mib, name=name,
                                                   boot_timeout_s=self.boot_timeout_s)
        except (TemplateBuildFailed, CorralError, OSError) as e:
            self.metrics.snapshot_builds.labels("failed").inc()
            hold_s = self._failed("build", key)
            log.warning("snapshot %s could not be built: %s; VMs of that tier boot, "
                        "the next build in %.0f s", _tier_name(key), e, hold_s)
            return None, "boot"
        finally:
            with self._lock:
                del self._building[key]
        self.metrics.snapshot_builds.labels("ok").inc()
        self._succeeded("build", key)
        log.info("snapshot %s built in %.1f s", _tier_name(key), self.clock() - started)
        return built, "build"

    # --- what the Supervisor reports of a clone ---------------------------------

    def restore_failed(self, key: TemplateKey, stage: str, why: str, template_removed: bool = False) -> None:
        """A clone of `key` failed at `stage` (restore, resuming, warming): one
        warning, one count; this tier's next refills boot for a while."""
        self.metrics.restore_failures.labels(stage).inc()
        hold_s = self._failed("restore", key)
        log.warning("a snapshot clone of %s failed (%s: %s)%s; falling back to cold boots for %.0f s",
                    _tier_name(key), stage, why,
                    "; its template was removed and will be rebuilt" if template_removed else "", hold_s)

    def restored(self, key: TemplateKey) -> None:
        """A clone of `key` was offered: restores of that tier are healthy."""
        self._succeeded("restore", key)

    # --- hold-offs ---------------------------------------------------------------

    def _held_off(self, what: str, key: TemplateKey) -> bool:
        """Under self._lock: True while `what` is not tried for `key` after a failure."""
        failures = self._failures.get((what, key))
        return failures is not None and self.clock() < failures.until

    def _failed(self, what: str, key: TemplateKey) -> float:
        """Count a failure; returns how long `what` is held off for this key."""
        first_s, longest_s = RESTORE_HOLD_OFF_S if what == "restore" else BUILD_HOLD_OFF_S
        with self._lock:
            failures = self._failures.setdefault((what, key), _Failures())
            failures.count += 1
            hold_s = min(longest_s, first_s * 2 ** (failures.count - 1))
            failures.until = self.clock() + hold_s
        return hold_s

    def _succeeded(self, what: str, key: TemplateKey) -> None:
        with self._lock:
            self._failures.pop((what, key), None)


def _tier_name(key: TemplateKey) -> str:
    return f"template {key.digest} (network {'on' if key.network else 'off'}, {key.memory_mib} MiB)"
