"""The VM layer without booting: accelerator choice, the domain XML, libvirt's
acceptance of it, overlays, and libvirt's errors as the layer's own (the last
two against libvirt's test:///default driver: nothing runs)."""

import dataclasses
import json
import logging
import os
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from actors.vm.accelerator import detect_accelerator, qemu_user_can_open, warn_if_kvm_closed_to_qemu
from actors.vm.domain import AGENT_PORT_NAME, EGRESS_PORT_NAME
from actors.vm.errors import HypervisorError, LibvirtDeadline, NoSuchDomain
from actors.vm.host import REFILL_CPU_SHARES, Hypervisor
from actors.vm.libvirt_calls import DeadlineCalls, libvirt_errors
from actors.vm.overlays import create_overlay
from guest.image.paths import GuestImage
from tests.support.vm import make_spec

INTEL = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr vmx sse2\n"
NO_VIRT = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr sse2 hypervisor\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return str(path)
    return write


@pytest.fixture
def usable_kvm(tmp_path):
    path = tmp_path / "kvm"
    path.write_text("")
    return str(path)


def test_kvm_needs_both_cpu_flag_and_usable_device(cpuinfo, usable_kvm, tmp_path):
    absent = str(tmp_path / "no-kvm")
    assert detect_accelerator("auto", cpuinfo(INTEL), usable_kvm) == "kvm"
    assert detect_accelerator("auto", cpuinfo(INTEL), absent) == "tcg"
    # /dev/kvm without vmx/svm: the paravirtual kvm_pvm of the build machines.
    assert detect_accelerator("auto", cpuinfo(NO_VIRT), usable_kvm) == "tcg"
    assert detect_accelerator("tcg", cpuinfo(INTEL), usable_kvm) == "tcg"


def test_forcing_kvm_without_support_is_a_clear_error(cpuinfo, usable_kvm):
    with pytest.raises(HypervisorError, match="no vmx/svm CPU flag.*vm.accelerator"):
        detect_accelerator("kvm", cpuinfo(NO_VIRT), usable_kvm)


def test_this_host_uses_tcg_when_it_has_no_hardware_virtualization():
    flags = Path("/proc/cpuinfo").read_text()
    expected = "kvm" if (" vmx" in flags or " svm" in flags) and Path("/dev/kvm").exists() else "tcg"
    assert detect_accelerator("auto") == expected


def test_domain_xml_structure(tmp_path):
    root = ET.fromstring(make_spec(tmp_path).to_xml())
    assert root.get("type") == "qemu"
    assert root.findtext("memory") == "512" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("os/kernel") == str(tmp_path / "vmlinux")
    assert root.find("devices/interface") is None  # no network unless asked for
    root_disk, iso = root.findall("devices/disk")
    assert root_disk.find("driver").get("type") == "qcow2"
    assert root_disk.find("backingStore/format").get("type") == "qcow2"
    assert root_disk.find("readonly") is None
    assert iso.find("readonly") is not None and iso.findtext("serial") == "corral-agent"
    assert root.find("devices/controller[@type='virtio-serial']").get("ports") == "2"
    channel = root.find("devices/channel")
    assert channel.get("type") == "unix"
    assert channel.find("source").get("mode") == "bind"
    assert channel.find("target").get("name") == AGENT_PORT_NAME
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_network_and_kvm_variants(tmp_path):
    root = ET.fromstring(make_spec(tmp_path, accelerator="kvm", network=True).to_xml())
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    # net:egress: no NIC, a third virtio-serial port whose host end is the egress socket
    assert root.find("devices/interface") is None
    assert root.find("devices/controller[@type='virtio-serial']").get("ports") == "3"
    ports = {c.find("target").get("name"): c.find("source").get("path") for c in root.iterfind("devices/channel")}
    assert ports == {AGENT_PORT_NAME: str(tmp_path / "vm.sock"), EGRESS_PORT_NAME: str(tmp_path / "vm.egress")}


def test_libvirt_accepts_the_domain_xml():
    """libvirt's own parser (test driver: nothing is booted) takes our XML as written."""
    conn = libvirt.open("test:///default")
    try:
        spec = make_spec(Path("/nonexistent"))
        domain = conn.defineXML(spec.to_xml())
        parsed = ET.fromstring(domain.XMLDesc(0))
        assert parsed.findtext("name") == spec.name
        assert parsed.findtext("uuid") == spec.uuid
        assert len(parsed.findall("devices/disk")) == 2
        assert parsed.find("devices/channel/target").get("name") == AGENT_PORT_NAME
        domain.undefine()
    finally:
        conn.close()


def test_overlay_records_backing_file_and_format(tmp_path):
    gold = tmp_path / "gold.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(gold), "16M"], check=True)
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(gold, overlay)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     check=True, capture_output=True).stdout)
    assert info["backing-filename"] == str(gold)
    assert info["backing-filename-format"] == "qcow2"


def test_overlay_failure_is_a_hypervisor_error(tmp_path):
    with pytest.raises(HypervisorError, match="cannot create overlay"):
        create_overlay(tmp_path / "missing-gold.qcow2", tmp_path / "o.qcow2")


def test_with_qemus_user_known_no_file_is_relabelled(tmp_path):
    root = ET.fromstring(dataclasses.replace(make_spec(tmp_path), qemu_owner=(64055, 107)).to_xml())
    seclabel = root.find("seclabel")
    assert seclabel.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert seclabel.findtext("label") == "+64055:+107"
    assert ET.fromstring(make_spec(tmp_path).to_xml()).find("seclabel") is None


def test_kvm_device_closed_to_qemus_user_is_one_warning(tmp_path, caplog):
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    qemu = (64055, 107)
    os.chown(kvm, 0, 0)
    kvm.chmod(0o600)  # a bare machine without udev
    assert not qemu_user_can_open(str(kvm), *qemu)
    with caplog.at_level(logging.WARNING, logger="corral.hypervisor"):
        assert warn_if_kvm_closed_to_qemu(qemu, str(kvm))
    assert "chgrp kvm" in caplog.text and "re-probes" in caplog.text
    os.chown(kvm, 0, 107)
    kvm.chmod(0o660)  # as udev leaves it
    assert qemu_user_can_open(str(kvm), *qemu)
    assert not warn_if_kvm_closed_to_qemu(qemu, str(kvm))
    assert not warn_if_kvm_closed_to_qemu(qemu, str(tmp_path / "absent"))



def test_the_users_passwd_group_counts_though_libvirt_names_another(tmp_path):
    """Debian's libvirt-qemu: passwd group kvm (listed in no /etc/group member
    list), while libvirt's capabilities may name the user's own group."""
    import pwd

    user = next(u for u in pwd.getpwall() if u.pw_uid != 0 and u.pw_gid != 0)
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    os.chown(kvm, 0, user.pw_gid)
    kvm.chmod(0o660)
    other_gid = user.pw_gid + 1
    assert qemu_user_can_open(str(kvm), user.pw_uid, other_gid)
    kvm.chmod(0o600)
    assert not qemu_user_can_open(str(kvm), user.pw_uid, other_gid)

# --- libvirt's errors as the VM layer's (test:///default: one running domain, "test") ---

@pytest.fixture
def test_driver(tmp_path):
    """A Hypervisor on libvirt's test driver, with empty stand-ins for the image files."""
    files = {name: tmp_path / name for name in ("kernel", "initrd", "disk", "agent_iso")}
    for path in files.values():
        path.write_text("")
    hv = Hypervisor(uri="test:///default", state_dir=tmp_path / "state", image=GuestImage(**files),
                    accelerator="tcg", memory_mib=256, vcpus=1, call_timeout_s=5)
    yield hv
    hv.close()


def test_a_new_vm_starts_with_few_cpu_shares_which_libvirt_accepts(test_driver, tmp_path):
    """Booted or restored, a VM not yet offered yields the CPU to VMs running tasks."""
    spec = test_driver.spec_for("corral-shares", tmp_path / "o.qcow2", tmp_path / "vm.sock")
    assert spec.cpu_shares == REFILL_CPU_SHARES < 1024
    assert ET.fromstring(spec.to_xml()).findtext("cputune/shares") == str(REFILL_CPU_SHARES)
    assert ET.fromstring(dataclasses.replace(spec, cpu_shares=None).to_xml()).find("cputune") is None
    conn = libvirt.open("test:///default")
    try:
        domain = conn.defineXML(spec.to_xml())
        assert ET.fromstring(domain.XMLDesc(0)).findtext("cputune/shares") == str(REFILL_CPU_SHARES)
        domain.undefine()
    finally:
        conn.close()


def test_an_unknown_domain_is_no_such_domain(test_driver):
    with pytest.raises(NoSuchDomain, match="cannot find VM corral-nope: Domain not found"):
        test_driver.suspend("corral-nope")
    assert issubclass(NoSuchDomain, HypervisorError)  # callers catching the root keep working
    assert not test_driver.domain_exists("corral-nope")
    assert test_driver.domain_exists("test")
    test_driver.destroy_domain("corral-nope")  # already gone: no error


def test_libvirt_errors_maps_by_error_code():
    conn = libvirt.open("test:///default")
    try:
        with pytest.raises(NoSuchDomain, match="^looking: Domain not found"):
            with libvirt_errors("looking"):
                conn.lookupByName("corral-nope")
        stopped = conn.defineXML(make_spec(Path("/nonexistent")).to_xml())
        try:
            # Any other libvirt error is the root class, with libvirt's message and the hint.
            with pytest.raises(HypervisorError, match="^pausing: .*not running.*; try later$") as info:
                with libvirt_errors("pausing", hint="try later"):
                    stopped.suspend()
            assert type(info.value) is HypervisorError
        finally:
            stopped.undefine()
    finally:
        conn.close()


def test_a_dropped_connection_is_reconnected_on_the_next_call(test_driver):
    test_driver.faults.drop_libvirt()
    assert test_driver.domain_exists("test")
    assert test_driver.conn.isAlive() == 1


def test_a_call_past_its_deadline_is_libvirt_deadline():
    calls = DeadlineCalls(0.2, workers=1)
    started = time.monotonic()
    with pytest.raises(LibvirtDeadline, match="did not finish sleeping within 0.2 s"):
        calls.run("sleeping", time.sleep, 2)
    assert time.monotonic() - started < 1
    assert issubclass(LibvirtDeadline, HypervisorError)


def test_a_hypervisor_starting_removes_its_instances_session_snapshots_only(tmp_path):
    """A restart ends every session: nothing will restore what the last run saved."""
    files = {name: tmp_path / name for name in ("kernel", "initrd", "disk", "agent_iso")}
    for path in files.values():
        path.write_text("")
    root = tmp_path / "state" / "sessions" / "snapshots"
    mine = [root / "main-s-0123456789abcdef-0123456789ab", root / ".build-main-rm-0123456789ab"]
    theirs = [root / "other-s-0123456789abcdef-0123456789ab", root / "main-x-s-0123456789abcdef-0123456789ab",
              root / "main.json"]  # another instance, one whose name starts with this one's, not a snapshot
    for directory in mine + theirs[:2]:
        directory.mkdir(parents=True)
        (directory / "memory.save").write_bytes(b"saved")
    theirs[2].write_text("{}")
    hv = Hypervisor(uri="test:///default", state_dir=tmp_path / "state", image=GuestImage(**files),
                    accelerator="tcg", memory_mib=256, vcpus=1, call_timeout_s=5, instance="main")
    try:
        assert sorted(root.iterdir()) == sorted(theirs)
        made = hv.session_snapshots.new_directory("s-0123456789abcdef")
        assert made.parent == root and made.name.startswith("main-s-0123456789abcdef-")
        assert (os.stat(made).st_mode & 0o777, os.stat(root).st_mode & 0o777) == (0o700, 0o700)
    finally:
        hv.close()
