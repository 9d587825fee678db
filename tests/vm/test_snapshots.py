"""Snapshot templates and their clones against the real libvirtd and guest
image (actors/vm/snapshots.py, Hypervisor.build_template/template/restore).
Few VMs: one template built per module (and one of the network tier), clones
two at a time at most."""

import concurrent.futures
import os
import shutil
import stat
import time
import xml.etree.ElementTree as ET

import pytest

from actors.egress.proxy import EgressProxy, EgressSettings, TaskEgress
from actors.vm.domain import EGRESS_PORT_NAME
from actors.vm.errors import RestoreFailed, TemplateBuildFailed
from actors.vm.guest_link import GuestLink
from actors.vm.snapshots import IMAGE_FILE
from protocol.channel import messages
from tests.support.vm import live_identity

BOOT_S = 90  # a template's boot under TCG on a loaded host


def clone_link(handle, timeout_s: float = 20) -> GuestLink:
    """A connected host end for a clone. Its agent said Hello before the template
    was saved, so its next frame carries handle.guest_first_seq, not 0."""
    link = GuestLink(handle.socket, guest_first_seq=handle.guest_first_seq)
    link.connect(time.monotonic() + timeout_s)
    return link


def heartbeat(link: GuestLink, nonce: int, timeout_s: float = 20) -> None:
    link.send(messages.Heartbeat(nonce=nonce))
    ack = link.receive(frozenset({messages.HeartbeatAck}), time.monotonic() + timeout_s)
    assert ack.nonce == nonce


def files_named_after(hypervisor, name: str) -> list:
    return [p for d in (hypervisor.overlay_dir, hypervisor.run_dir, hypervisor.monitor_dir)
            for p in d.glob(name + ".*")]


@pytest.fixture(scope="module")
def template(hypervisor):
    """A template of the default tier built by this module (any older one removed
    first); this instance's templates are removed at the end (~80 MiB each)."""
    shutil.rmtree(hypervisor.snapshots.directory(hypervisor.template_key()), ignore_errors=True)
    yield hypervisor.build_template(boot_timeout_s=BOOT_S)
    for path in hypervisor.snapshots.root.glob(f"{hypervisor.snapshots.instance}-*"):
        shutil.rmtree(path, ignore_errors=True)


def restore_clone(hypervisor, template, made: list):
    handle = hypervisor.restore(template)
    link = None
    try:
        link = clone_link(handle)
    finally:
        made.append((handle, link or GuestLink(handle.socket)))
    return handle, link


def test_a_template_is_private_complete_and_leaves_no_vm(hypervisor, template):
    image = template.image
    st = image.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert stat.S_IMODE(template.directory.parent.stat().st_mode) == 0o700
    assert st.st_size > 16 << 20  # the guest's RAM in use, saved
    root = ET.fromstring(template.xml)
    assert root.findtext("genid") and root.find("os/loader") is None
    assert (template.guest_next_seq, template.host_next_seq) == (1, 0)  # Hello was frame 0
    assert template.name not in hypervisor.corral_domains()  # saved: the template VM is gone
    assert files_named_after(hypervisor, template.name) == []
    assert hypervisor.template() == template


def test_a_failed_build_leaves_no_vm_and_no_template(hypervisor, template):
    name = hypervisor.prefix + "b0170000dead"
    with pytest.raises(TemplateBuildFailed, match="did not"):
        hypervisor.build_template(network=True, memory_mib=256, name=name, boot_timeout_s=0.5)
    assert name not in hypervisor.corral_domains()
    assert files_named_after(hypervisor, name) == []
    assert hypervisor.template(network=True, memory_mib=256) is None
    # This instance's: other runs sharing the state directory may be building now.
    builds = f".build-{hypervisor.snapshots.instance}-"
    assert not [p for p in hypervisor.snapshots.root.iterdir() if p.name.startswith(builds)]
    assert hypervisor.template() == template  # another tier's template is untouched


def test_two_clones_alive_at_once_each_answer_on_their_own_channel(hypervisor, template, clones):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # restored at once: the image's lock orders them
        handles = list(pool.map(lambda _: hypervisor.restore(template), range(2)))
    for handle in handles:
        clones.append((handle, clone_link(handle)))
    for nonce, (handle, link) in enumerate(clones, start=1):
        assert handle.restored and handle.guest_first_seq == 1
        heartbeat(link, nonce)
    assert {h.name for h in handles} <= set(hypervisor.corral_domains())  # both alive together
    for handle, link in clones:  # each still answers after the other restored
        assert link.run([b"true"], time.monotonic() + 30).exit.exit_code == 0
    a, b = (live_identity(hypervisor, h.name) for h in handles)
    for field in ("name", "uuid", "genid", "overlay", "channel", "qmp"):
        assert a[field] != b[field], field
    for handle, identity in zip(handles, (a, b)):
        assert identity["name"] == handle.name
        assert identity["uuid"] == handle.spec.uuid
        assert identity["overlay"] == str(handle.overlay) and handle.overlay.is_file()
        assert identity["channel"] == str(handle.socket)
        assert identity["qmp"] == f"unix:{handle.monitor},server=on,wait=off"
        assert template.name not in ET.tostring(ET.fromstring(
            hypervisor.conn.lookupByName(handle.name).XMLDesc(0)), encoding="unicode")


def test_a_clones_run_control_pauses_and_resumes_it_on_its_own_qmp_socket(hypervisor, template, clones):
    handle, link = restore_clone(hypervisor, template, clones)
    assert handle.monitor is not None and handle.monitor.exists()
    control = hypervisor.run_control(handle)
    try:
        control.pause()
        assert hypervisor.domain_states()[handle.name] == "paused"
        control.resume()
        assert hypervisor.domain_states()[handle.name] == "running"
    finally:
        control.close()
    heartbeat(link, 7)


def test_a_destroyed_clone_leaves_nothing_and_the_template_stays_valid(hypervisor, template):
    handle = hypervisor.restore(template)
    link = clone_link(handle)
    try:
        heartbeat(link, 1)
        assert files_named_after(hypervisor, handle.name)  # overlay, channel and QMP sockets
    finally:
        link.close()
        hypervisor.destroy(handle)
    assert handle.name not in hypervisor.corral_domains()
    assert files_named_after(hypervisor, handle.name) == []
    again = hypervisor.template()
    assert again is not None and again.xml == template.xml  # the pristine XML, not the last clone's


def test_net_egress_clones_restore_each_with_its_own_egress_port(hypervisor, clones):
    """Each clone of the net:egress template has its own egress socket (the path
    rewritten in its saved XML), and its guest's relay answers through it: a
    CONNECT from the guest reaches the proxy serving that socket, which refuses
    it (the task has no rules)."""
    net = hypervisor.build_template(network=True, boot_timeout_s=BOOT_S)
    assert net.key.network and net.directory != hypervisor.snapshots.directory(hypervisor.template_key())
    for _ in range(2):
        restore_clone(hypervisor, net, clones)
    proxy = EgressProxy(EgressSettings(resolver=None))
    proxy.start()
    try:
        sockets = set()
        for handle, link in clones:
            ports = {c.find("target").get("name"): c.find("source").get("path") for c in
                     ET.fromstring(hypervisor.conn.lookupByName(handle.name).XMLDesc(0)).iterfind("devices/channel")}
            assert ports[EGRESS_PORT_NAME] == str(handle.egress_socket)
            sockets.add(ports[EGRESS_PORT_NAME])
            proxy.attach(handle.name, handle.egress_socket, lambda code, detail: None)
            proxy.begin_task(handle.name, TaskEgress("t", "test", ()))
            link.resume(time.monotonic() + 30)
            result = link.run([b"python3", b"-c", CONNECT_PROBE], time.monotonic() + 60)
            assert result.stdout == b"HTTP/1.1 403 Forbidden\n", (result.stdout, result.stderr)
        assert len(sockets) == 2 and not any(s.endswith(f"{net.name}.egress") for s in sockets)
    finally:
        proxy.stop()


CONNECT_PROBE = (b"import socket; s = socket.create_connection(('127.0.0.1', 3128), timeout=30); "
                 b"s.sendall(b'CONNECT x.invalid:443 HTTP/1.1\\r\\n\\r\\n'); "
                 b"print(s.recv(200).split(b'\\r\\n')[0].decode())")


def test_a_default_clone_has_no_nic_and_resumes(hypervisor, template, clones):
    _, link = restore_clone(hypervisor, template, clones)
    link.resume(time.monotonic() + 30)
    result = link.run([b"/bin/sh", b"-c", b"echo /sys/class/net/*"], time.monotonic() + 30)
    assert result.stdout == b"/sys/class/net/lo\n"


def test_a_truncated_image_is_detected_rebuilt_and_never_restored(hypervisor, template, clones):
    os.truncate(template.image, template.image.stat().st_size // 2)
    assert hypervisor.template() is None  # detected, removed
    assert not template.directory.exists()
    rebuilt = hypervisor.build_template(boot_timeout_s=BOOT_S)
    assert rebuilt.directory == template.directory and rebuilt.inode != template.inode
    _, link = restore_clone(hypervisor, rebuilt, clones)
    heartbeat(link, 1)
    # Truncated behind a Template already handed out: the restore fails cleanly.
    os.truncate(rebuilt.image, rebuilt.image.stat().st_size - (1 << 20))
    before = set(hypervisor.corral_domains())
    with pytest.raises(RestoreFailed) as failed:
        hypervisor.restore(rebuilt, name=hypervisor.prefix + "c10e0000dead")
    assert failed.value.template_removed
    assert set(hypervisor.corral_domains()) == before
    assert files_named_after(hypervisor, hypervisor.prefix + "c10e0000dead") == []
    assert hypervisor.template() is None and not (rebuilt.directory / IMAGE_FILE).exists()
