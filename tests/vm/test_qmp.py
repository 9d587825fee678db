"""Pausing and resuming real QEMU under libvirt, through QEMU's own monitor
(vm.fast_resume) and, with it off, through libvirt, checking that libvirt's
view of the domain follows what we do behind its back. (The monitor's
protocol and error paths, without a VM: tests/unit/test_qmp.py.)"""

import time
import xml.etree.ElementTree as ET

import pytest

from actors.vm.errors import GuestTimeout
from actors.vm.domain import QEMU_NS, qemu_confinement
from actors.vm.handle import LibvirtRunControl
from actors.vm.host import Hypervisor
from actors.vm.qmp import QmpMonitor
from protocol.channel import messages
from tests.support.vm import BootedVm
from tests.support.waiting import wait_until


def libvirt_state(hypervisor, name):
    return hypervisor.domain_states().get(name)


def heartbeat_answered(vm, nonce):
    vm.link.send(messages.Heartbeat(nonce=nonce))
    answer = vm.link.receive(frozenset({messages.HeartbeatAck}), time.monotonic() + 10)
    return answer.nonce == nonce


def test_pause_and_resume_through_qemus_monitor(hypervisor, cfg):
    confining, _ = qemu_confinement(hypervisor.conn.getCapabilities(), hypervisor.accelerator)
    # Off only where libvirt confines QEMU (then the libvirt test below is the path).
    assert hypervisor.fast_resume == (confining is None), confining
    if confining:
        return
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
    control = None
    try:
        assert vm.handle.monitor is not None and vm.handle.monitor.exists()
        control = hypervisor.run_control(vm.handle)
        assert isinstance(control, QmpMonitor)
        assert not vm.handle.monitor.exists(), "the socket is unlinked once we hold it"
        for nonce in (1, 2, 3):
            control.pause()
            # libvirt learns of it from QEMU's STOP event.
            wait_until(lambda: libvirt_state(hypervisor, vm.handle.name) == "paused", 5, "libvirt sees paused")
            vm.link.send(messages.Heartbeat(nonce=nonce))
            with pytest.raises(GuestTimeout):  # a paused guest does not answer
                vm.link.receive(frozenset({messages.HeartbeatAck}), time.monotonic() + 0.5)
            control.resume()
            assert vm.link.receive(frozenset({messages.HeartbeatAck}), time.monotonic() + 10).nonce == nonce
            wait_until(lambda: libvirt_state(hypervisor, vm.handle.name) == "running", 5, "libvirt sees running")
    finally:
        if control is not None:
            control.close()
        vm.destroy()
    assert not list(hypervisor.monitor_dir.glob(vm.handle.name + "*"))


def test_without_fast_resume_libvirt_pauses_and_resumes(cfg):
    import dataclasses

    plain_cfg = dataclasses.replace(cfg, vm=dataclasses.replace(cfg.vm, fast_resume=False))
    hypervisor = Hypervisor.from_config(plain_cfg)
    vm = None
    try:
        vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
        assert vm.handle.monitor is None
        assert f"{{{QEMU_NS}}}commandline" not in {e.tag for e in ET.fromstring(vm.handle.spec.to_xml())}
        control = hypervisor.run_control(vm.handle)
        assert isinstance(control, LibvirtRunControl)
        control.pause()
        assert libvirt_state(hypervisor, vm.handle.name) == "paused"
        control.resume()
        assert heartbeat_answered(vm, 7)
    finally:
        if vm is not None:
            vm.destroy()
        hypervisor.close()
