"""The Hypervisor: corral's VMs on one libvirt connection. It creates each VM
(overlay, then a transient domain named ``corral-<instance>-<id>``),
destroys it, pauses and resumes it, sets its CPU, and reaps what a crashed
daemon left behind. No actor logic here; the per-VM Supervisor owns the calls.

Every method that can block on libvirtd runs under the call deadline
(actors/vm/libvirt_calls.py); a lost connection is reconnected on the next
call. The domain itself is typed data (actors/vm/domain.py).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
import uuid
from pathlib import Path

from actors.vm.accelerator import detect_accelerator, warn_if_kvm_closed_to_qemu
from actors.vm.domain import (AGENT_DISK_SERIAL, FAST_BOOT_CMDLINE, ROOT_DISK_SERIAL, Disk, DomainSpec,
                              qemu_confinement)
from actors.vm.errors import HypervisorError, NoSuchDomain
from actors.vm.faults import FaultInjector
from actors.vm.handle import LibvirtRunControl, VmHandle
from actors.vm.libvirt_calls import DeadlineCalls, libvirt_errors, libvirt_module, with_deadline
from actors.vm.overlays import create_overlay, give_back_to_root, remove_quietly
from actors.vm.qmp import QmpMonitor
from guest.image.paths import GuestImage, guest_image

log = logging.getLogger("corral.hypervisor")

DOMAIN_PREFIX = "corral-"
# The CFS period the vCPU quota is a share of: the longest libvirt allows (1 s), so
# a throttled VM still runs a short task (a `true`, a reset) at full speed and only
# sustained CPU use is held to the quota.
CPU_PERIOD_US = 1_000_000


class Hypervisor:
    """Creates and destroys corral VMs on one libvirt connection."""

    def __init__(self, *, uri: str, state_dir: Path, image: GuestImage, accelerator: str,
                 memory_mib: int, vcpus: int, tmpfs_size: str = "50%", console_log: bool = False,
                 instance: str = "main", call_timeout_s: float = 30.0, fast_resume: bool = False):
        missing = image.missing()
        if missing:
            raise HypervisorError(
                f"guest image missing: {missing[0]} (build it with scripts/build-guest-image)")
        self.uri = uri
        self.prefix = f"{DOMAIN_PREFIX}{instance}-"  # this corrald's VMs, and only these
        self.image = image
        self.accelerator = accelerator
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.tmpfs_size = tmpfs_size
        self.console_log = console_log
        self.overlay_dir = Path(state_dir) / "vms"
        self.run_dir = Path(state_dir) / "run"
        self.monitor_dir = self.run_dir / "qmp"
        for d in (self.overlay_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.faults = FaultInjector(self)
        self._reconnect_lock = threading.Lock()
        self.calls = DeadlineCalls(call_timeout_s)
        self.conn = self.calls.run("connecting", self._connect)
        self._confinement = self.calls.run("reading host capabilities", self._read_confinement)
        self.qemu_owner = self._keep_images_root_owned()
        if not isinstance(self._confinement, str):
            warn_if_kvm_closed_to_qemu(self._confinement[1])
        self.fast_resume = fast_resume and self.calls.run("preparing QMP sockets", self._prepare_monitor_dir)
        log.info("hypervisor: %s, accelerator %s, pause/resume through %s", uri, accelerator,
                 "QEMU's monitor" if self.fast_resume else "libvirt")

    @classmethod
    def from_config(cls, cfg) -> Hypervisor:
        """The Hypervisor a config describes: accelerator chosen and logged, image checked."""
        accelerator = detect_accelerator(cfg.vm.accelerator)
        log.info("accelerator: %s (vm.accelerator = %s)", accelerator, cfg.vm.accelerator)
        return cls(uri=cfg.libvirt_uri, state_dir=cfg.state_dir, image=guest_image(cfg.state_dir),
                   accelerator=accelerator, memory_mib=cfg.vm.memory_mib, vcpus=cfg.vm.vcpus,
                   tmpfs_size=cfg.vm.tmpfs_size, console_log=cfg.vm.console_log,
                   instance=cfg.daemon.instance, call_timeout_s=cfg.vm.libvirt_call_timeout_s,
                   fast_resume=cfg.vm.fast_resume)

    def _prepare_monitor_dir(self) -> bool:
        """Make the directory QEMU creates our QMP sockets in: its user's alone.
        False (with a warning saying why) where that cannot work."""
        why_not = self._why_no_monitor_dir()
        if why_not:
            log.warning("vm.fast_resume is off: %s; pausing and resuming through libvirt "
                        "(~3 ms slower per acquire)", why_not)
        return not why_not

    def _read_confinement(self) -> tuple[str | None, tuple[int, int] | None] | str:
        """qemu_confinement() of this host, or why QEMU's user cannot be told."""
        try:
            return qemu_confinement(self.conn.getCapabilities(), self.accelerator)
        except (KeyError, ValueError) as e:  # a DAC label naming no user or group here
            return f"cannot tell which user QEMU runs as ({e})"

    def _keep_images_root_owned(self) -> tuple[int, int] | None:
        """QEMU's (uid, gid) where VMs are to run as it with no file relabelled
        (DomainSpec.qemu_owner), after giving the shared image files back to root.
        None where libvirt's own labelling stays: another security driver
        confines QEMU, or QEMU's user is unknown or root."""
        if isinstance(self._confinement, str) or self._confinement[0] or self._confinement[1] is None:
            return None
        owner = self._confinement[1]
        if owner[0] == 0:
            return None
        give_back_to_root((self.image.kernel, self.image.initrd, self.image.disk, self.image.agent_iso))
        return owner

    def _why_no_monitor_dir(self) -> str:
        if isinstance(self._confinement, str):
            return self._confinement
        confining, owner = self._confinement
        if confining:
            return f"libvirt's {confining} security driver would stop QEMU from creating corral's QMP socket"
        try:
            self.monitor_dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.monitor_dir, 0o700)
            if owner is not None:
                os.chown(self.monitor_dir, *owner)
        except OSError as e:
            return f"cannot give {self.monitor_dir} to QEMU's user ({e})"
        return ""

    def run_control(self, handle: VmHandle):
        """What pauses and resumes this VM: our QMP connection to its QEMU
        (connected here, once) where it has a socket, else libvirt."""
        if handle.monitor is None:
            return LibvirtRunControl(self, handle.name)
        monitor = QmpMonitor(handle.monitor, self.calls.timeout_s)
        monitor.connect()
        return monitor

    # --- the libvirt connection ---------------------------------------------------

    def _connect(self):
        libvirt = libvirt_module()
        libvirt.registerErrorHandler(lambda *_: None, None)  # no error spam on stderr
        with libvirt_errors(f"cannot connect to libvirt at {self.uri}",
                            hint="is libvirtd running? scripts/setup-host starts it"):
            return libvirt.open(self.uri)

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass

    def domain(self, name: str):
        """The libvirt domain of that name (NoSuchDomain if there is none),
        reconnecting once if the connection was lost. Call it under self.calls."""
        for attempt in (1, 2):
            try:
                with libvirt_errors(f"cannot find VM {name}"):
                    return self.conn.lookupByName(name)
            except NoSuchDomain:
                raise
            except HypervisorError:
                if attempt == 2 or self._alive():
                    raise
            self._reconnect()

    def _alive(self) -> bool:
        try:
            return self.conn.isAlive() == 1
        except libvirt_module().libvirtError:
            return False

    def _reconnect(self) -> None:
        """Many Supervisor threads may notice at once: one reconnects, the rest reuse it."""
        with self._reconnect_lock:
            if not self._alive():
                log.warning("libvirt connection lost; reconnecting to %s", self.uri)
                self.conn = self._connect()

    # --- one VM ---------------------------------------------------------------------

    @with_deadline
    def suspend(self, name: str) -> None:
        with libvirt_errors(f"cannot suspend VM {name}"):
            self.domain(name).suspend()

    @with_deadline
    def resume(self, name: str) -> None:
        with libvirt_errors(f"cannot resume VM {name}"):
            self.domain(name).resume()

    @with_deadline
    def set_cpu(self, name: str, shares: int, quota_pct: int) -> None:
        """CPU shares and vCPU quota (% of one CPU, 0: no quota) of a running or
        paused VM, live: they apply from its next instruction (res:high_cpu)."""
        quota = CPU_PERIOD_US * quota_pct // 100 if quota_pct else -1  # negative: unlimited
        params = {"cpu_shares": shares, "vcpu_period": CPU_PERIOD_US, "vcpu_quota": quota}
        with libvirt_errors(f"cannot set the CPU of VM {name}"):
            self.domain(name).setSchedulerParametersFlags(params, libvirt_module().VIR_DOMAIN_AFFECT_LIVE)

    @with_deadline
    def cpu_setting(self, name: str) -> dict:
        """The VM's live scheduler parameters as libvirt reads them from its cgroup."""
        with libvirt_errors(f"cannot read the CPU of VM {name}"):
            return self.domain(name).schedulerParametersFlags(libvirt_module().VIR_DOMAIN_AFFECT_LIVE)

    def spec_for(self, name: str, overlay: Path, socket: Path, network: bool = False,
                 memory_mib: int | None = None) -> DomainSpec:
        console = self.run_dir / f"{name}.console.log" if self.console_log else None
        monitor = self.monitor_dir / f"{name}.qmp" if self.fast_resume else None
        cmdline = FAST_BOOT_CMDLINE + f" corral.tmpfs={self.tmpfs_size}"
        if self.accelerator == "tcg":
            # Tasks without address space randomisation: TCG translates a randomised
            # exec's code anew every time (guest/image/init explains).
            cmdline += " corral.aslr=off"
        cmdline += " console=ttyS0" if console else " quiet"
        if network:
            cmdline += " corral.net=1"
        if self.faults.extra_cmdline:
            cmdline += " " + self.faults.extra_cmdline
        return DomainSpec(
            name=name, accelerator=self.accelerator, memory_mib=memory_mib or self.memory_mib,
            vcpus=self.vcpus, kernel=self.image.kernel, initrd=self.image.initrd, cmdline=cmdline,
            disks=(
                Disk(path=overlay, format="qcow2", serial=ROOT_DISK_SERIAL, target="vda",
                     backing=self.image.disk),
                Disk(path=self.image.agent_iso, format="raw", serial=AGENT_DISK_SERIAL,
                     target="vdb", readonly=True),
            ),
            channel_socket=socket, network=network, console_log=console, monitor_socket=monitor,
            qemu_owner=self.qemu_owner,
        )

    @with_deadline
    def create(self, name: str | None = None, network: bool = False,
               memory_mib: int | None = None) -> VmHandle:
        """Overlay, then a transient domain; on any failure nothing is left behind."""
        name = name or self.new_name()
        overlay = self.overlay_dir / f"{name}.qcow2"
        socket = self.run_dir / f"{name}.sock"
        spec = self.spec_for(name, overlay, socket, network, memory_mib)
        handle = VmHandle(name=name, overlay=overlay, socket=socket,
                          console_log=spec.console_log, spec=spec, monitor=spec.monitor_socket)
        create_overlay(self.image.disk, overlay)
        try:
            if spec.qemu_owner is not None:  # libvirt relabels nothing: the overlay is QEMU's to write
                os.chown(overlay, *spec.qemu_owner)
            with libvirt_errors(f"cannot start VM {name}"):
                self.conn.createXML(spec.to_xml(), 0)
        except HypervisorError:
            self.discard_files_of(name)
            raise
        except OSError as e:
            self.discard_files_of(name)
            raise HypervisorError(f"cannot give VM {name}'s overlay to QEMU's user: {e}") from None
        return handle

    @with_deadline
    def destroy(self, handle: VmHandle) -> None:
        """Destroy the domain if it still runs, then delete its overlay and socket."""
        self.destroy_by_name(handle.name)

    @with_deadline
    def destroy_by_name(self, name: str) -> None:
        """Domain and files of a VM known only by name (a zombie, a leftover)."""
        self.destroy_domain(name)
        self.discard_files_of(name)

    @with_deadline
    def destroy_domain(self, name: str) -> None:
        """Destroy the domain; one already gone is no error."""
        try:
            with libvirt_errors(f"cannot destroy VM {name}"):
                self.domain(name).destroy()
        except NoSuchDomain:
            pass
        except HypervisorError:
            if self.domain_exists(name):
                raise

    @with_deadline
    def domain_exists(self, name: str) -> bool:
        try:
            self.domain(name)
            return True
        except NoSuchDomain:
            return False

    def discard_files_of(self, name: str) -> None:
        """Every file named after the VM: overlay, channel socket, console log, QMP socket."""
        for directory in (self.overlay_dir, self.run_dir, self.monitor_dir):
            for path in directory.glob(glob.escape(name) + ".*"):
                remove_quietly(path)

    def new_name(self) -> str:
        return self.prefix + uuid.uuid4().hex[:12]

    # --- this instance's VMs --------------------------------------------------------

    def _instance_domains(self) -> list:
        try:
            domains = self.conn.listAllDomains()
        except libvirt_module().libvirtError:
            self._reconnect()
            domains = self.conn.listAllDomains()
        return [d for d in domains if re.fullmatch(re.escape(self.prefix) + r"[0-9a-f]{12}", d.name())]

    @with_deadline
    def corral_domains(self) -> list[str]:
        """Names of this instance's domains."""
        return sorted(d.name() for d in self._instance_domains())

    @with_deadline
    def domain_states(self) -> dict[str, str]:
        """This instance's domains -> running, paused, or another libvirt state."""
        libvirt = libvirt_module()
        names = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused"}
        states = {}
        for domain in self._instance_domains():
            try:
                states[domain.name()] = names.get(domain.state()[0], "other")
            except libvirt.libvirtError:
                pass  # destroyed since it was listed
        return states

    @with_deadline
    def reap_leftovers(self, keep: frozenset[str] = frozenset()) -> list[str]:
        """Destroy corral domains not in `keep` and delete every overlay, socket
        and console log that no kept VM owns: what a crashed daemon left behind."""
        reaped = [name for name in self.corral_domains() if name not in keep]
        for name in reaped:
            self.destroy_domain(name)
        for directory in (self.overlay_dir, self.run_dir, self.monitor_dir):
            for path in directory.glob(glob.escape(self.prefix) + "*"):
                if path.name.split(".", 1)[0] not in keep:
                    remove_quietly(path)
        return reaped
