"""The hypervisor layer: libvirt domains built from typed data, per-VM overlays,
accelerator choice. No actor logic here; the per-VM Supervisor owns the calls.

Every VM is a transient libvirt domain named ``corral-<id>`` with:
  - a qcow2 overlay on the read-only gold image (deleted with the VM),
  - the agent ISO as a read-only virtio disk (read-only at the hypervisor),
  - one virtio-serial port whose host end is a unix socket QEMU listens on,
  - no network interface unless asked for,
  - with vm.fast_resume, a QMP socket of corral's own (actors/vm/qmp.py): the
    Supervisor pauses and resumes through it, ~3 ms faster than libvirt.

Every call that can block on libvirtd runs on a worker thread and is waited
for at most `call_timeout_s` (monotonic): a hung libvirtd (or a QEMU monitor
that never answers) becomes a HypervisorError in the calling Supervisor,
which then gives its VM up, instead of a Supervisor thread stuck forever with
a task nobody answers. The stuck call stays on its worker (a daemon thread)
until libvirt returns; nothing waits for it.
"""

from __future__ import annotations

import concurrent.futures
import functools
import glob
import grp
import logging
import queue
import os
import pwd
import re
import subprocess
import threading
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from actors.errors import HypervisorError
from actors.vm.qmp import QmpMonitor
from guest.image.paths import GuestImage

log = logging.getLogger("corral.hypervisor")

DOMAIN_PREFIX = "corral-"
AGENT_PORT_NAME = "org.corral.agent.0"
ROOT_DISK_SERIAL = "corral-root"
# The CFS period the vCPU quota is a share of: the longest libvirt allows (1 s), so
# a throttled VM still runs a short task (a `true`, a reset) at full speed and only
# sustained CPU use is held to the quota.
CPU_PERIOD_US = 1_000_000
AGENT_DISK_SERIAL = "corral-agent"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"  # libvirt's <qemu:commandline>
ET.register_namespace("qemu", QEMU_NS)
# Measured to shorten TCG boots (GUEST-NOTES.md).
FAST_BOOT_CMDLINE = (
    "panic=-1 init_on_alloc=0 cryptomgr.notests mitigations=off audit=0 tsc=reliable "
    "no_timer_check rcupdate.rcu_expedited=1 i8042.noaux i8042.nokbd i8042.nopnp "
    # Keep the SMP lock prefixes on a 1-vCPU guest: rewriting ~9000 of them, each
    # write a self-modifying-code event for TCG, cost ~0.1-0.15 s of boot.
    "noreplace-smp "
    # Built-in initcalls nothing here uses, 50-200 ms together under TCG (initcall_debug):
    # the kprobe_events tracefs files, and a KDF self-test that cryptomgr.notests does not skip.
    "initcall_blacklist=init_kprobe_trace,crypto_kdf108_init"
)


# --- accelerator -------------------------------------------------------------------

def cpu_has_hardware_virtualization(cpuinfo: str) -> bool:
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"vmx", "svm"})


def detect_accelerator(choice: str = "auto", cpuinfo_path: str = "/proc/cpuinfo",
                       kvm_path: str = "/dev/kvm") -> str:
    """'kvm' only with vmx/svm in the CPU flags and a /dev/kvm that opens; else 'tcg'.

    A /dev/kvm without vmx/svm (kvm_pvm on the build machines) hangs stock
    kernels, so the device alone proves nothing.
    """
    if choice == "tcg":
        return "tcg"
    with open(cpuinfo_path) as f:
        hardware = cpu_has_hardware_virtualization(f.read())
    try:
        os.close(os.open(kvm_path, os.O_RDWR))
        usable = True
    except OSError:
        usable = False
    if choice == "kvm":
        if not (hardware and usable):
            raise HypervisorError(
                f"vm.accelerator = 'kvm' but this host has {'no vmx/svm CPU flag' if not hardware else 'no usable ' + kvm_path}; "
                "set vm.accelerator = 'auto' or 'tcg'")
        return "kvm"
    return "kvm" if hardware and usable else "tcg"


def qemu_user_can_open(path: str, uid: int, gid: int) -> bool:
    """Whether a process of uid (primary group gid, plus that user's supplementary
    groups) may open `path` read-write, by its owner, group and mode."""
    st = os.stat(path)
    if uid == 0:
        return True
    try:
        groups = {g.gr_gid for g in grp.getgrall() if pwd.getpwuid(uid).pw_name in g.gr_mem} | {gid}
    except KeyError:  # no such user in the passwd database: its primary group only
        groups = {gid}
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid in groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 0o6 == 0o6


def warn_if_kvm_closed_to_qemu(owner: tuple[int, int] | None, kvm_path: str = "/dev/kvm") -> bool:
    """One warning when /dev/kvm exists but QEMU's user cannot open it: libvirtd
    then re-probes QEMU at every domain start (GUEST-NOTES.md). True if warned."""
    if owner is None or not os.path.exists(kvm_path) or qemu_user_can_open(kvm_path, *owner):
        return False
    st = os.stat(kvm_path)
    log.warning("%s is %s:%s %o and QEMU's user (uid %d) cannot open it: libvirtd then re-probes "
                "QEMU at every domain start (2-4 s each, also under TCG). Fix it as udev would: "
                "chgrp kvm %s; chmod 0660 %s (scripts/setup-host does this)",
                kvm_path, _user_name(st.st_uid), _group_name(st.st_gid), st.st_mode & 0o7777,
                owner[0], kvm_path, kvm_path)
    return True


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- domain definition as typed data --------------------------------------------

@dataclass(frozen=True)
class Disk:
    path: Path
    format: str  # qcow2 | raw
    serial: str
    target: str
    readonly: bool = False
    backing: Path | None = None  # backing file of a qcow2 overlay (always qcow2)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    accelerator: str  # kvm | tcg
    memory_mib: int
    vcpus: int
    kernel: Path
    initrd: Path
    cmdline: str
    disks: tuple[Disk, ...]
    channel_socket: Path | None
    network: bool = False
    console_log: Path | None = None
    monitor_socket: Path | None = None  # corral's own QMP socket, QEMU listening
    # QEMU's (uid, gid) under libvirt's DAC driver. Given, QEMU runs as that user and
    # libvirt relabels no file: the shared gold image, agent ISO, kernel and initrd
    # stay root's (a QEMU escape cannot chmod them writable), and the Hypervisor
    # hands the VM's own files (its overlay) to that user itself.
    qemu_owner: tuple[int, int] | None = None
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def to_xml(self) -> str:
        domain = ET.Element("domain", type="kvm" if self.accelerator == "kvm" else "qemu")
        _sub(domain, "name", self.name)
        _sub(domain, "uuid", self.uuid)
        _sub(domain, "memory", str(self.memory_mib), unit="MiB")
        _sub(domain, "vcpu", str(self.vcpus))
        os_el = _sub(domain, "os")
        _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
        # qboot, shipped with QEMU, does little more than start the kernel: the guest
        # reaches its kernel ~0.1 s sooner than with SeaBIOS under TCG. SeaBIOS if absent.
        qboot = "/usr/share/qemu/qboot.rom"
        if os.path.isfile(qboot):
            _sub(os_el, "loader", qboot, readonly="yes", type="rom")
        _sub(os_el, "kernel", str(self.kernel))
        _sub(os_el, "initrd", str(self.initrd))
        _sub(os_el, "cmdline", self.cmdline)
        _sub(os_el, "bootmenu", enable="no")
        features = _sub(domain, "features")
        _sub(features, "acpi")
        if self.accelerator == "kvm":
            _sub(domain, "cpu", mode="host-passthrough")
        _sub(domain, "clock", offset="utc")
        if self.qemu_owner is not None:
            seclabel = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
            _sub(seclabel, "label", "+{}:+{}".format(*self.qemu_owner))
        # A guest that powers off, reboots or crashes is gone: the host replaces it.
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            _sub(domain, event, "destroy")
        devices = _sub(domain, "devices")
        # Every PCI device sits on the root complex (pcie.0) itself, so libvirt adds no
        # PCIe root port per device: the guest kernel then enumerates, ACPI-describes
        # and drives no bridges, ~0.3 s less boot under TCG. The price: no PCI hotplug
        # (that would need a root port added back).
        slots = iter(range(2, 0x1F))  # 0: the host bridge, 0x1f: the ICH9 functions

        def on_root_bus(element: ET.Element) -> None:
            _sub(element, "address", type="pci", domain="0x0000", bus="0x00",
                 slot=f"0x{next(slots):02x}", function="0x0")

        for disk in self.disks:
            _disk_xml(devices, disk)
            on_root_bus(devices[-1])
        if self.channel_socket is not None:  # None only for the benchmark's bare-kernel baseline
            # Two ports (0 is reserved for a console; the agent's is 1) instead of QEMU's
            # 31: every pause and resume restarts each port's queue notifiers, and 64
            # queues cost ~0.9 ms of each resume under TCG (QEMU trace, 2026-11-29).
            on_root_bus(_sub(devices, "controller", type="virtio-serial", index="0", ports="2"))
            channel = _sub(devices, "channel", type="unix")
            _sub(channel, "source", mode="bind", path=str(self.channel_socket))
            _sub(channel, "target", type="virtio", name=AGENT_PORT_NAME)
        if self.network:
            # User-mode networking: outbound only, no host bridge to configure.
            nic = _sub(devices, "interface", type="user")
            _sub(nic, "model", type="virtio")
            _sub(nic, "rom", enabled="no")
            on_root_bus(nic)
        if self.console_log is not None:
            serial = _sub(devices, "serial", type="file")
            _sub(serial, "source", path=str(self.console_log))
        # Entropy: without it Python blocks ~1 s at start-up in the guest.
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")
        on_root_bus(rng)
        _sub(devices, "controller", type="usb", model="none")
        _sub(devices, "memballoon", model="none")
        video = _sub(devices, "video")
        _sub(video, "model", type="none")
        if self.monitor_socket is not None:
            # QEMU option syntax: a comma inside a value is written twice.
            path = str(self.monitor_socket).replace(",", ",,")
            commandline = _sub(domain, f"{{{QEMU_NS}}}commandline")
            for arg in ("-qmp", f"unix:{path},server=on,wait=off"):
                _sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)
        return ET.tostring(domain, encoding="unicode")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def _disk_xml(devices: ET.Element, disk: Disk) -> None:
    el = _sub(devices, "disk", type="file", device="disk")
    _sub(el, "driver", name="qemu", type=disk.format)
    _sub(el, "source", file=str(disk.path))
    if disk.backing is not None:
        backing = _sub(el, "backingStore", type="file")
        _sub(backing, "format", type="qcow2")
        _sub(backing, "source", file=str(disk.backing))
    _sub(el, "target", dev=disk.target, bus="virtio")
    _sub(el, "serial", disk.serial)
    if disk.readonly:
        _sub(el, "readonly")


def qemu_confinement(capabilities_xml: str, accelerator: str) -> tuple[str | None, tuple[int, int] | None]:
    """From libvirt's host capabilities: the security driver that confines QEMU
    to its domain XML's files (apparmor, selinux; None if only DAC), and the
    uid, gid QEMU runs as (None: as libvirt's own user)."""
    host = ET.fromstring(capabilities_xml).find("host")
    models = [m.text for m in host.iterfind("secmodel/model")]
    confining = next((m for m in models if m not in ("none", "dac")), None)
    if confining:
        return confining, None
    kind = "kvm" if accelerator == "kvm" else "qemu"
    label = host.find(f"secmodel[model='dac']/baselabel[@type='{kind}']")
    if label is None or label.text is None:
        return None, None
    user, _, group = label.text.partition(":")  # "+64055:+64055", or names
    uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
    gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    return None, (uid, gid)


# --- overlays ----------------------------------------------------------------------

def create_overlay(gold: Path, overlay: Path) -> None:
    """A qcow2 overlay on the gold image with an explicit backing format:
    every write lands here, never in the gold image."""
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(gold), "-F", "qcow2", str(overlay)],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise HypervisorError(f"cannot create overlay {overlay}: {result.stderr.strip()}")


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --- libvirt connection ---------------------------------------------------------

class DeadlineCalls:
    """Runs blocking calls on daemon worker threads, waiting at most timeout_s each."""

    def __init__(self, timeout_s: float, workers: int = 16):
        self.timeout_s = timeout_s
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._inside = threading.local()
        for n in range(workers):
            threading.Thread(target=self._worker, name=f"hypervisor-call-{n}", daemon=True).start()

    def _worker(self) -> None:
        self._inside.active = True
        while True:
            future, fn, args, kwargs = self._work.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)

    def run(self, what: str, fn, *args, **kwargs):
        if getattr(self._inside, "active", False):  # nested: already under a deadline
            return fn(*args, **kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._work.put((future, fn, args, kwargs))
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # if it has not started yet, it never will
            raise HypervisorError(f"libvirt did not finish {what} within {self.timeout_s:g} s "
                                  "(is libvirtd hung?)") from None


def with_deadline(method):
    """A Hypervisor method that talks to libvirtd: run it under the call deadline."""

    @functools.wraps(method)
    def under_deadline(self, *args, **kwargs):
        return self.calls.run(method.__name__, method, self, *args, **kwargs)

    return under_deadline


def _libvirt():
    import libvirt  # imported late so a missing binding is a clear error, not an import crash
    return libvirt


@dataclass(frozen=True)
class VmHandle:
    """One running VM and the files that are its alone."""

    name: str
    overlay: Path
    socket: Path
    console_log: Path | None
    spec: DomainSpec
    monitor: Path | None = None  # corral's QMP socket, until the Supervisor connects


@dataclass(frozen=True)
class LibvirtRunControl:
    """Pause and resume through libvirt: where a VM has no QMP socket of ours."""

    hypervisor: "Hypervisor"
    name: str

    def pause(self) -> None:
        self.hypervisor.suspend(self.name)

    def resume(self) -> None:
        self.hypervisor.resume(self.name)

    def close(self) -> None:
        pass


class Hypervisor:
    """Creates and destroys corral VMs on one libvirt connection."""

    def __init__(self, uri: str, state_dir: Path, image: GuestImage, accelerator: str,
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
        # Appended to every VM's kernel command line. Tests only (e.g. the hostile
        # agent's corral.hostile=<attack>); no config key reaches it.
        self.extra_cmdline = ""
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
        (DomainSpec.qemu_owner), after giving the shared image files back to root
        (an older corrald let libvirt chown them to QEMU's user). None where
        libvirt's own labelling stays: another security driver confines QEMU, or
        QEMU's user is unknown or root."""
        if isinstance(self._confinement, str) or self._confinement[0] or self._confinement[1] is None:
            return None
        owner = self._confinement[1]
        if owner[0] == 0:
            return None
        for path in (self.image.kernel, self.image.initrd, self.image.disk, self.image.agent_iso):
            st = path.stat()
            if (st.st_uid, st.st_gid) != (0, 0):
                os.chown(path, 0, 0)
                log.warning("gave %s back to root (it belonged to uid %d): QEMU only reads it", path, st.st_uid)
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

    def _connect(self):
        libvirt = _libvirt()
        libvirt.registerErrorHandler(lambda *_: None, None)  # no error spam on stderr
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise HypervisorError(
                f"cannot connect to libvirt at {self.uri} ({e.get_error_message()}); "
                "is libvirtd running? scripts/setup-host starts it") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass

    def drop_connection(self) -> None:
        """Fault injection: lose the libvirt connection; the next call reconnects."""
        self.close()

    def _domain(self, name: str):
        """The domain, reconnecting once if the connection was lost."""
        libvirt = _libvirt()
        for attempt in (1, 2):
            try:
                return self.conn.lookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(f"VM {name} does not exist") from None
                if attempt == 2 or self._alive():
                    raise HypervisorError(f"libvirt failed on {name}: {e.get_error_message()}") from None
                self._reconnect()

    def _alive(self) -> bool:
        try:
            return self.conn.isAlive() == 1
        except _libvirt().libvirtError:
            return False

    def _reconnect(self) -> None:
        """Many Supervisor threads may notice at once: one reconnects, the rest reuse it."""
        with self._reconnect_lock:
            if not self._alive():
                log.warning("libvirt connection lost; reconnecting to %s", self.uri)
                self.conn = self._connect()

    @with_deadline
    def suspend(self, name: str) -> None:
        self._call(name, "suspend")

    @with_deadline
    def resume(self, name: str) -> None:
        self._call(name, "resume")

    def _call(self, name: str, method: str) -> None:
        libvirt = _libvirt()
        try:
            getattr(self._domain(name), method)()
        except libvirt.libvirtError as e:
            raise HypervisorError(f"cannot {method} VM {name}: {e.get_error_message()}") from None

    @with_deadline
    def set_cpu(self, name: str, shares: int, quota_pct: int) -> None:
        """CPU shares and vCPU quota (% of one CPU, 0: no quota) of a running or
        paused VM, live: they apply from its next instruction (res:high_cpu)."""
        libvirt = _libvirt()
        quota = CPU_PERIOD_US * quota_pct // 100 if quota_pct else -1  # negative: unlimited
        params = {"cpu_shares": shares, "vcpu_period": CPU_PERIOD_US, "vcpu_quota": quota}
        try:
            self._domain(name).setSchedulerParametersFlags(params, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"cannot set the CPU of VM {name}: {e.get_error_message()}") from None

    @with_deadline
    def cpu_setting(self, name: str) -> dict:
        """The VM's live scheduler parameters as libvirt reads them from its cgroup."""
        try:
            return self._domain(name).schedulerParametersFlags(_libvirt().VIR_DOMAIN_AFFECT_LIVE)
        except _libvirt().libvirtError as e:
            raise HypervisorError(f"cannot read the CPU of VM {name}: {e.get_error_message()}") from None

    def kill_qemu(self, name: str) -> None:
        """Fault injection: SIGKILL the VM's QEMU process, as a crash would."""
        pid_file = Path("/run/libvirt/qemu") / f"{name}.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), 9)
        except (OSError, ValueError) as e:
            raise HypervisorError(f"cannot kill QEMU of {name}: {e}") from None

    @with_deadline
    def throttle_vcpus(self, name: str, quota_us: int, period_us: int = 1_000_000) -> None:
        """Fault injection: the VM's vCPUs get `quota_us` of host CPU time per
        `period_us` (CPU bandwidth in the domain's cgroup): a guest made very slow."""
        libvirt = _libvirt()
        try:
            self._domain(name).setSchedulerParametersFlags(
                {"vcpu_period": period_us, "vcpu_quota": quota_us}, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"cannot throttle VM {name}: {e.get_error_message()}") from None

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
        if self.extra_cmdline:
            cmdline += " " + self.extra_cmdline
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
            self.conn.createXML(spec.to_xml(), 0)
        except _libvirt().libvirtError as e:
            self.discard_files_of(name)
            raise HypervisorError(f"cannot start VM {name}: {e.get_error_message()}") from None
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
        libvirt = _libvirt()
        try:
            self._domain(name).destroy()
        except HypervisorError:
            if self.domain_exists(name):
                raise
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN and self.domain_exists(name):
                raise HypervisorError(f"cannot destroy VM {name}: {e.get_error_message()}") from None

    @with_deadline
    def domain_exists(self, name: str) -> bool:
        try:
            self._domain(name)
            return True
        except HypervisorError as e:
            if str(e).endswith("does not exist"):
                return False
            raise

    def discard_files_of(self, name: str) -> None:
        """Every file named after the VM: overlay, channel socket, console log, QMP socket."""
        for directory in (self.overlay_dir, self.run_dir, self.monitor_dir):
            for path in directory.glob(glob.escape(name) + ".*"):
                remove_quietly(path)

    def new_name(self) -> str:
        return self.prefix + uuid.uuid4().hex[:12]

    def _instance_domains(self) -> list:
        libvirt = _libvirt()
        try:
            domains = self.conn.listAllDomains()
        except libvirt.libvirtError:
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
        libvirt = _libvirt()
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


def hypervisor_from_config(cfg) -> Hypervisor:
    """The Hypervisor a config describes: accelerator chosen and logged, image checked."""
    from guest.image.paths import guest_image

    accelerator = detect_accelerator(cfg.vm.accelerator)
    log.info("accelerator: %s (vm.accelerator = %s)", accelerator, cfg.vm.accelerator)
    return Hypervisor(cfg.libvirt_uri, cfg.state_dir, guest_image(cfg.state_dir), accelerator,
                      cfg.vm.memory_mib, cfg.vm.vcpus, cfg.vm.tmpfs_size, cfg.vm.console_log,
                      cfg.daemon.instance, cfg.vm.libvirt_call_timeout_s, cfg.vm.fast_resume)
