"""A VM's libvirt domain as typed data (DomainSpec, Disk) and its domain XML,
and how libvirt confines QEMU on this host (qemu_confinement).

Every VM is a transient libvirt domain with:
  - a qcow2 overlay on the read-only gold image (deleted with the VM),
  - the agent ISO as a read-only virtio disk (read-only at the hypervisor),
  - one virtio-serial port whose host end is a unix socket QEMU listens on,
  - no network interface, ever: a net:egress VM gets a second virtio-serial port
    (the egress port, host end a unix socket QEMU listens on) whose streams end
    at the host's EgressProxy (actors/egress/, docs/egress.md),
  - with vm.fast_resume, a QMP socket of corral's own (actors/vm/qmp.py): the
    Supervisor pauses and resumes through it, ~3 ms faster than libvirt,
  - for a snapshot template and its clones (actors/vm/snapshots.py), a VM
    generation id (<genid/>) and SeaBIOS instead of qboot.
"""

from __future__ import annotations

import grp
import os
import pwd
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

AGENT_PORT_NAME = "org.corral.agent.0"
EGRESS_PORT_NAME = "org.corral.egress.0"  # protocol/channel/egress.py PORT_NAME
ROOT_DISK_SERIAL = "corral-root"
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


@dataclass(frozen=True)
class Disk:
    path: Path
    format: str  # qcow2 | raw
    serial: str
    target: str
    readonly: bool = False
    backing: Path | None = None  # backing file of a qcow2 overlay (always qcow2)


@dataclass(frozen=True, kw_only=True)  # 16 fields: named at every construction
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
    egress_socket: Path | None = None  # net:egress: the egress port's host end
    console_log: Path | None = None
    monitor_socket: Path | None = None  # corral's own QMP socket, QEMU listening
    # QEMU's (uid, gid) under libvirt's DAC driver. Given, QEMU runs as that user and
    # libvirt relabels no file: the shared gold image, agent ISO, kernel and initrd
    # stay root's (a QEMU escape cannot chmod them writable), and the Hypervisor
    # hands the VM's own files (its overlay) to that user itself.
    qemu_owner: tuple[int, int] | None = None
    # A VM generation id device: each clone of a snapshot gets a new value
    # (snapshots.clone_xml), and its kernel then reseeds its random pool ("crng
    # reseeded due to virtual machine fork"), so clones never share that. SeaBIOS then, not
    # qboot: with qboot and a generation id the guest never reaches its kernel.
    genid: bool = False
    # cgroup cpu.shares from the first instruction (None: libvirt's 1024). A new VM
    # boots or restores with few, so that under contention the VMs running tasks
    # win the CPU; the Supervisor gives it the task's shares when it is offered.
    cpu_shares: int | None = None
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def to_xml(self) -> str:
        domain = ET.Element("domain", type="kvm" if self.accelerator == "kvm" else "qemu")
        _sub(domain, "name", self.name)
        _sub(domain, "uuid", self.uuid)
        if self.genid:
            _sub(domain, "genid")  # empty: libvirt chooses the value
        _sub(domain, "memory", str(self.memory_mib), unit="MiB")
        _sub(domain, "vcpu", str(self.vcpus))
        if self.cpu_shares is not None:
            _sub(_sub(domain, "cputune"), "shares", str(self.cpu_shares))
        os_el = _sub(domain, "os")
        _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")
        # qboot, shipped with QEMU, does little more than start the kernel: the guest
        # reaches its kernel ~0.1 s sooner than with SeaBIOS under TCG. SeaBIOS if absent.
        qboot = "/usr/share/qemu/qboot.rom"
        if os.path.isfile(qboot) and not self.genid:
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
            # A net:egress VM has a third, the egress port.
            ports = "3" if self.egress_socket is not None else "2"
            on_root_bus(_sub(devices, "controller", type="virtio-serial", index="0", ports=ports))
            for path, port_name in ((self.channel_socket, AGENT_PORT_NAME), (self.egress_socket, EGRESS_PORT_NAME)):
                if path is not None:
                    channel = _sub(devices, "channel", type="unix")
                    _sub(channel, "source", mode="bind", path=str(path))
                    _sub(channel, "target", type="virtio", name=port_name)
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
