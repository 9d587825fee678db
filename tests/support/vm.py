"""Real VMs for tests: BootedVm boots one through the Hypervisor and talks to
its agent over the GuestLink; live_identity is what a running domain's own XML
says it is; make_spec is a DomainSpec whose files all live under one
directory, for tests of the domain XML (nothing is booted)."""

import time
import xml.etree.ElementTree as ET

from actors.vm.guest_link import GuestLink
from actors.vm.domain import QEMU_NS, Disk, DomainSpec


class BootedVm:
    def __init__(self, hypervisor, boot_timeout_s: float, **create_args):
        self.hypervisor = hypervisor
        self.handle = hypervisor.create(**create_args)
        self.link = GuestLink(self.handle.socket)
        deadline = time.monotonic() + boot_timeout_s
        try:
            self.link.connect(deadline)
            self.hello = self.link.wait_hello(deadline)
        except BaseException:
            self.destroy()
            raise

    def run(self, *argv: str | bytes, timeout_s: float = 30, **kwargs):
        args = [a.encode() if isinstance(a, str) else a for a in argv]
        return self.link.run(args, time.monotonic() + timeout_s, **kwargs)

    def destroy(self) -> None:
        self.link.close()
        self.hypervisor.destroy(self.handle)


def live_identity(hypervisor, name: str) -> dict:
    """What the running domain itself says of its per-VM identity and files."""
    root = ET.fromstring(hypervisor.conn.lookupByName(name).XMLDesc(0))
    vda = next(d for d in root.iterfind("devices/disk") if d.find("target").get("dev") == "vda")
    args = [a.get("value") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    return {"name": root.findtext("name"), "uuid": root.findtext("uuid"), "genid": root.findtext("genid"),
            "overlay": vda.find("source").get("file"),
            "channel": root.find("devices/channel/source").get("path"),
            "qmp": args[args.index("-qmp") + 1] if "-qmp" in args else None,
            "xml": ET.tostring(root, encoding="unicode")}


def make_spec(tmp_path, accelerator="tcg", network=False):
    return DomainSpec(
        name="corral-0123456789ab", accelerator=accelerator, memory_mib=512, vcpus=1,
        kernel=tmp_path / "vmlinux", initrd=tmp_path / "initrd.img", cmdline="quiet",
        disks=(Disk(path=tmp_path / "o.qcow2", format="qcow2", serial="corral-root", target="vda",
                    backing=tmp_path / "gold.qcow2"),
               Disk(path=tmp_path / "agent.iso", format="raw", serial="corral-agent",
                    target="vdb", readonly=True)),
        channel_socket=tmp_path / "vm.sock", egress_socket=tmp_path / "vm.egress" if network else None)
