"""Snapshot templates without a VM (actors/vm/snapshots.py): libvirt's save
image header read and rewritten in place on a synthetic image, a clone's XML,
the template key, and the store's validation, publishing and stale removal.
The real-VM side (build, restore, clones) is tests/vm/test_snapshots.py."""

import dataclasses
import hashlib
import logging
import os
import random
import struct
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from actors.vm.domain import QEMU_NS
from actors.vm.errors import LibvirtDeadline, RestoreFailed, TemplateGone
from actors.vm.host import Hypervisor
from actors.vm.libvirt_calls import DeadlineCalls
from actors.vm.snapshots import (IMAGE_FILE, META_FILE, XML_FILE, SaveHeader, SnapshotStore, TemplateInvalid,
                                 TemplateKey, clone_xml, fingerprint, stream_digest,
                                 template_meta)
from guest.image.paths import GuestImage
from tests.support.vm import make_spec

DATA_LEN = 64 * 1024  # libvirt pads its header's XML area to this
COOKIE = b"<qemu-migration>\n  <name>corral-0123456789ab</name>\n</qemu-migration>\n"
STREAM = random.Random(13).randbytes(3 << 20)  # stands in for QEMU's migration stream
KEY = TemplateKey(gold="gold-1/aaaa", agent="agent-1/bbbb", host="libvirt 9000000, qemu/cccc",
                  domain="dddd", network=False, memory_mib=512)


def template_xml(tmp_path, network: bool = False) -> str:
    """A domain XML as libvirt saves it: generation id filled in, the serial file
    shown again as <console>, corral's QMP socket on QEMU's command line."""
    spec = dataclasses.replace(make_spec(tmp_path, network=network), genid=True,
                               console_log=tmp_path / "vm.console.log", monitor_socket=tmp_path / "vm.qmp")
    root = ET.fromstring(spec.to_xml())
    root.find("genid").text = "fa5735e5-8cbd-408d-ab72-a21309fca189"
    console = ET.SubElement(root.find("devices"), "console", type="file")
    ET.SubElement(console, "source", path=str(tmp_path / "vm.console.log"))
    return ET.tostring(root, encoding="unicode")


def write_save_image(path: Path, xml: str, *, magic=b"LibvirtQemudSave", version=2, fmt=0,
                     stream: bytes = STREAM) -> None:
    """A save image laid out as libvirt writes one (qemu_saveimage.h), built by
    hand here, not with SaveHeader, so the parser is checked against the format."""
    body = xml.encode() + b"\0" + COOKIE + b"\0"
    fixed = struct.pack("=16sIIIII", magic, version, DATA_LEN, 1, fmt, len(xml.encode()) + 1) + bytes(56)
    assert len(fixed) == 92
    path.write_bytes(fixed + body + bytes(DATA_LEN - len(body)) + stream)


# --- the header ---------------------------------------------------------------------

def test_header_is_read_as_libvirt_writes_it(tmp_path):
    image = tmp_path / "memory.save"
    xml = template_xml(tmp_path)
    write_save_image(image, xml)
    with open(image, "rb") as f:
        header = SaveHeader.read(f)
    assert header.xml == xml and header.cookie == COOKIE.rstrip(b"\0")
    assert (header.version, header.data_len, header.was_running, header.format) == (2, DATA_LEN, 1, 0)
    assert header.stream_offset == 92 + DATA_LEN
    assert len(header.to_bytes()) == header.stream_offset


def test_rewrite_in_place_changes_the_xml_and_not_one_stream_byte(tmp_path):
    image = tmp_path / "memory.save"
    write_save_image(image, template_xml(tmp_path))
    size = image.stat().st_size
    clone = clone_xml(template_xml(tmp_path), name="corral-test-c10e00000001",
                      uuid="11111111-2222-3333-4444-555555555555", overlay=Path("/vms/c1.qcow2"),
                      socket=Path("/run/c1.sock"), monitor=Path("/run/qmp/c1.qmp"),
                      console=Path("/run/c1.console.log"))
    with open(image, "r+b") as f:
        header = SaveHeader.read(f)
        f.seek(0)
        f.write(header.with_xml(clone).to_bytes())
    assert image.stat().st_size == size
    raw = image.read_bytes()
    assert raw[92 + DATA_LEN:] == STREAM
    magic, version, data_len, running, fmt, cookie_offset = struct.unpack_from("=16sIIIII", raw)
    assert (magic, version, data_len, running, fmt) == (b"LibvirtQemudSave", 2, DATA_LEN, 1, 0)
    assert cookie_offset == len(clone.encode()) + 1  # libvirt finds the cookie where it moved
    assert raw[92 + cookie_offset:].startswith(COOKIE + b"\0")
    with open(image, "rb") as f:
        again = SaveHeader.read(f)
    assert again.xml == clone and again.cookie == header.cookie
    assert stream_digest(open(image, "rb"), again.stream_offset) == hashlib.sha256(STREAM).hexdigest()


def test_an_xml_too_long_for_the_header_is_refused(tmp_path):
    image = tmp_path / "memory.save"
    write_save_image(image, template_xml(tmp_path))
    with open(image, "rb") as f:
        header = SaveHeader.read(f)
    with pytest.raises(TemplateInvalid, match="does not fit"):
        header.with_xml("<domain>" + "x" * DATA_LEN + "</domain>")


@pytest.mark.parametrize("damage, why", [
    (lambda p, xml: p.write_bytes(p.read_bytes()[:50]), "header truncated"),
    (lambda p, xml: p.write_bytes(p.read_bytes()[:92 + 100]), "truncated"),
    (lambda p, xml: write_save_image(p, xml, magic=b"LibvirtQemudPart"), "partial"),
    (lambda p, xml: write_save_image(p, xml, magic=b"NotLibvirtAtAll!"), "not a libvirt save image"),
    (lambda p, xml: write_save_image(p, xml, version=3), "version 3"),
    (lambda p, xml: write_save_image(p, xml, fmt=1), "format 1"),
    (lambda p, xml: write_save_image(p, xml.replace("</domain>", "</dom")), "does not parse"),
])
def test_a_broken_header_is_template_invalid(tmp_path, damage, why):
    image = tmp_path / "memory.save"
    xml = template_xml(tmp_path)
    write_save_image(image, xml)
    damage(image, xml)
    with open(image, "rb") as f, pytest.raises(TemplateInvalid, match=why):
        SaveHeader.read(f)


# --- a clone's XML --------------------------------------------------------------------

def test_clone_xml_gives_every_per_vm_file_and_id_its_own(tmp_path):
    xml = template_xml(tmp_path)
    clone = ET.fromstring(clone_xml(
        xml, name="corral-test-c10e00000001", uuid="11111111-2222-3333-4444-555555555555",
        overlay=Path("/vms/c1.qcow2"), socket=Path("/run/c1.sock"), monitor=Path("/run/qmp/a,b.qmp"),
        console=Path("/run/c1.console.log")))
    template = ET.fromstring(xml)
    assert clone.findtext("name") == "corral-test-c10e00000001"
    assert clone.findtext("uuid") == "11111111-2222-3333-4444-555555555555"
    assert clone.findtext("genid") not in ("", template.findtext("genid"))
    vda, iso = clone.findall("devices/disk")
    assert vda.find("source").get("file") == "/vms/c1.qcow2"
    assert vda.find("backingStore/source").get("file") == str(tmp_path / "gold.qcow2")  # shared, read-only
    assert iso.find("source").get("file") == str(tmp_path / "agent.iso")
    assert clone.find("devices/channel/source").get("path") == "/run/c1.sock"
    args = [a.get("value") for a in clone.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args == ["-qmp", "unix:/run/qmp/a,,b.qmp,server=on,wait=off"]
    assert clone.find("devices/serial/source").get("path") == "/run/c1.console.log"
    assert clone.find("devices/console/source").get("path") == "/run/c1.console.log"
    assert [e.tag for e in clone.iter()] == [e.tag for e in template.iter()]  # nothing added or lost


def test_clone_xml_refuses_a_template_naming_itself_where_it_rewrites_nothing(tmp_path):
    root = ET.fromstring(template_xml(tmp_path))
    ET.SubElement(root.find("devices"), "filesystem").text = f"/x/{root.findtext('name')}.img"
    with pytest.raises(TemplateInvalid, match="does not rewrite"):
        clone_xml(ET.tostring(root, encoding="unicode"), name="corral-test-c10e00000001", uuid="u",
                  overlay=Path("/o"), socket=Path("/s"), monitor=Path("/m"), console=Path("/c"))


def test_clone_xml_refuses_a_template_of_other_settings(tmp_path):
    args = dict(name="corral-test-c10e00000001", uuid="u", overlay=Path("/o"), socket=Path("/s"))
    with pytest.raises(TemplateInvalid, match="QMP"):
        clone_xml(template_xml(tmp_path), monitor=None, console=Path("/c"), **args)
    with pytest.raises(TemplateInvalid, match="console"):
        clone_xml(template_xml(tmp_path), monitor=Path("/m"), console=None, **args)


def test_clone_xml_gives_a_net_egress_clone_its_own_egress_socket_and_nothing_else_more(tmp_path):
    xml = template_xml(tmp_path, network=True)
    args = dict(uuid="u", overlay=Path("/o"), socket=Path("/s"), monitor=Path("/m"), console=Path("/c"))
    a = ET.fromstring(clone_xml(xml, name="corral-test-c10e00000001", egress=Path("/e1"), **args))
    b = ET.fromstring(clone_xml(xml, name="corral-test-c10e00000002", egress=Path("/e2"), **args))
    for clone, egress in ((a, "/e1"), (b, "/e2")):
        ports = {c.find("target").get("name"): c.find("source").get("path") for c in clone.iterfind("devices/channel")}
        assert ports == {"org.corral.agent.0": "/s", "org.corral.egress.0": egress}
    assert [e.tag for e in a.iter()] == [e.tag for e in ET.fromstring(xml).iter()]


def test_clone_xml_refuses_an_egress_socket_where_the_template_has_no_egress_port_and_none_where_it_has(tmp_path):
    args = dict(name="corral-test-c10e00000001", uuid="u", overlay=Path("/o"), socket=Path("/s"),
                monitor=Path("/m"), console=Path("/c"))
    with pytest.raises(TemplateInvalid, match="org.corral.egress.0"):
        clone_xml(template_xml(tmp_path), egress=Path("/e"), **args)
    with pytest.raises(TemplateInvalid, match="org.corral.egress.0"):
        clone_xml(template_xml(tmp_path, network=True), egress=None, **args)


def test_a_template_domain_has_a_generation_id_and_no_qboot(tmp_path):
    root = ET.fromstring(dataclasses.replace(make_spec(tmp_path), genid=True).to_xml())
    assert root.find("genid") is not None and not root.findtext("genid")  # libvirt picks the value
    assert root.find("os/loader") is None  # qboot with a generation id never reaches the kernel
    assert ET.fromstring(make_spec(tmp_path).to_xml()).find("genid") is None


# --- the key --------------------------------------------------------------------------

def hypervisor_on_test_driver(tmp_path) -> Hypervisor:
    """A Hypervisor on libvirt's test driver (nothing boots), with a real qcow2 gold image."""
    files = {name: tmp_path / "images" / name for name in ("kernel", "initrd", "disk", "agent_iso")}
    files["disk"].parent.mkdir()
    for path in files.values():
        path.write_text("")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(files["disk"]), "16M"], check=True)
    return Hypervisor(uri="test:///default", state_dir=tmp_path / "state", image=GuestImage(**files),
                      accelerator="tcg", memory_mib=256, vcpus=1, call_timeout_s=5)


@pytest.fixture
def test_driver(tmp_path):
    hv = hypervisor_on_test_driver(tmp_path)
    yield hv
    hv.close()


def test_the_key_changes_with_each_of_its_parts(test_driver, tmp_path):
    hv = test_driver
    base = hv.template_key()
    assert hv.template_key() == base  # stable while nothing changes
    assert hv.template_key(memory_mib=256) == base  # the default size, named
    assert hv.template_key(network=True).digest != base.digest
    assert hv.template_key(memory_mib=4096).digest != base.digest
    keys = {base.digest}
    # Each image rebuilt in place (same path): the saved guest's page cache would be wrong.
    for name in ("disk", "kernel", "initrd", "agent_iso"):
        path = getattr(hv.image, name)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        keys.add(hv.template_key().digest)
    assert len(keys) == 5
    # Another guest setting (tmpfs size) is another domain.
    hv.tmpfs_size = "25%"
    assert hv.template_key().domain != base.domain
    # Another agent ISO by path.
    other = tmp_path / "images2" / "agent.iso"
    other.parent.mkdir()
    other.write_text("")
    hv.image = dataclasses.replace(hv.image, agent_iso=other)
    assert hv.template_key().agent != base.agent and hv.template_key().agent.startswith("images2/")


def test_fingerprint_names_the_image_directory_and_follows_the_file(tmp_path):
    a = tmp_path / "gold-1234" / "gold.qcow2"
    a.parent.mkdir()
    a.write_text("one")
    first = fingerprint(a)
    assert first.startswith("gold-1234/")
    a.unlink()
    a.write_text("two")  # replaced: another inode
    assert fingerprint(a) != first


# --- the store ------------------------------------------------------------------------

def publish_synthetic(store: SnapshotStore, tmp_path, key: TemplateKey = KEY):
    """A template published as build_template would, from a synthetic image."""
    xml = template_xml(tmp_path)
    with store.building() as build:
        write_save_image(build / IMAGE_FILE, xml)
        (build / XML_FILE).write_text(xml)
        with open(build / IMAGE_FILE, "rb") as f:
            header = SaveHeader.read(f)
        meta = template_meta(name=ET.fromstring(xml).findtext("name"), header=header,
                             image_bytes=(build / IMAGE_FILE).stat().st_size,
                             stream_sha256=hashlib.sha256(STREAM).hexdigest(),
                             guest_next_seq=1, host_next_seq=0, boot_s=3.0, save_s=2.0)
        return store.publish(build, key, meta)


def test_a_published_template_loads_with_its_sequence_numbers(tmp_path):
    store = SnapshotStore(tmp_path / "snapshots", "t1")
    template = publish_synthetic(store, tmp_path)
    assert template.directory == tmp_path / "snapshots" / f"t1-{KEY.digest}"
    assert (template.guest_next_seq, template.host_next_seq) == (1, 0)
    assert store.load(KEY) == template
    assert oct((tmp_path / "snapshots").stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == [template.directory.name]  # no build left
    assert store.load(dataclasses.replace(KEY, memory_mib=4096)) is None  # another key: none built


@pytest.mark.parametrize("damage, why", [
    (lambda d: os.truncate(d / IMAGE_FILE, (d / IMAGE_FILE).stat().st_size - 4096), "bytes, not the"),
    (lambda d: os.truncate(d / IMAGE_FILE, 60), "bytes, not the"),
    (lambda d: (d / IMAGE_FILE).unlink(), "FileNotFoundError"),
    (lambda d: ((d / IMAGE_FILE).unlink(), (d / IMAGE_FILE).mkdir()), "IsADirectoryError"),
    (lambda d: (d / XML_FILE).unlink(), "FileNotFoundError"),
    (lambda d: (d / META_FILE).write_text("{not json"), "JSONDecodeError"),
    (lambda d: (d / XML_FILE).write_text("<domain><name>other</name></domain>"), "names another VM"),
    (lambda d: flip_byte(d / IMAGE_FILE, 16), "version"),
    (lambda d: flip_byte(d / IMAGE_FILE, 20), "header differs"),  # data_len
    (lambda d: flip_byte(d / IMAGE_FILE, 92 + DATA_LEN + 12345), "corrupt"),
])
def test_a_broken_template_is_removed_with_a_warning_and_reads_as_none(tmp_path, caplog, damage, why):
    template = publish_synthetic(SnapshotStore(tmp_path / "snapshots", "t1"), tmp_path)
    damage(template.directory)
    store = SnapshotStore(tmp_path / "snapshots", "t1")  # a new process: the stream is checked once
    with caplog.at_level(logging.WARNING, logger="corral.snapshots"):
        assert store.load(KEY) is None
    assert why in caplog.text and "removed, a new one will be built" in caplog.text
    assert list((tmp_path / "snapshots").iterdir()) == []
    assert publish_synthetic(store, tmp_path) == store.load(KEY)  # and it can be rebuilt


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_loosened_image_is_made_private_again(tmp_path):
    store = SnapshotStore(tmp_path / "snapshots", "t1")
    template = publish_synthetic(store, tmp_path)
    template.image.chmod(0o644)
    assert store.load(KEY) == template
    assert template.image.stat().st_mode & 0o777 == 0o600


def test_a_build_that_never_published_leaves_nothing_that_loads(tmp_path):
    store = SnapshotStore(tmp_path / "snapshots", "t1")
    with pytest.raises(RuntimeError):
        with store.building() as build:
            write_save_image(build / IMAGE_FILE, template_xml(tmp_path))
            raise RuntimeError("the build died here")
    assert list((tmp_path / "snapshots").iterdir()) == []
    assert store.load(KEY) is None


def test_stale_templates_and_dead_builds_go_other_tiers_and_instances_stay(tmp_path):
    root = tmp_path / "snapshots"
    store = SnapshotStore(root, "t1")
    old = publish_synthetic(store, tmp_path, dataclasses.replace(KEY, agent="agent-0/0000"))
    tier = publish_synthetic(store, tmp_path, dataclasses.replace(KEY, network=True))
    theirs = publish_synthetic(SnapshotStore(root, "t2"), tmp_path, dataclasses.replace(KEY, agent="agent-0/0000"))
    dead = root / ".build-t1-0123456789ab"  # a crashed build: nobody holds it
    dead.mkdir()
    with store.building() as running:  # a build in progress: flocked
        removed = store.remove_stale(KEY)
        assert running.is_dir()
    assert sorted(removed) == sorted([old.directory.name, dead.name])
    assert tier.directory.is_dir() and theirs.directory.is_dir()


def test_a_sweep_waits_for_a_build_between_its_mkdir_and_its_flock(tmp_path, monkeypatch):
    """Another tier's build sweeps first (build_template): it must not take a
    build directory made a moment ago and not yet flocked for a crashed one."""
    store = SnapshotStore(tmp_path / "snapshots", "t1")
    made, may_lock = threading.Event(), threading.Event()
    mkdir = Path.mkdir

    def mkdir_then_pause(self, *args, **kwargs):
        mkdir(self, *args, **kwargs)
        if self.name.startswith(".build-"):  # between the build's mkdir and its flock
            made.set()
            assert may_lock.wait(5)

    monkeypatch.setattr(Path, "mkdir", mkdir_then_pause)
    swept: list[str] = []
    sweeper = threading.Thread(target=lambda: swept.extend(store.remove_stale(KEY)))
    seen: dict = {}

    def build() -> None:
        try:
            with store.building() as directory:
                seen["locked"] = True
                sweeper.join(5)  # the sweep ran while this build holds its directory
                seen["after sweep"] = directory.is_dir()
        except Exception as e:  # before the fix: the sweep took the directory, the flock found none
            seen["error"] = e

    builder = threading.Thread(target=build)
    builder.start()
    assert made.wait(5)
    sweeper.start()
    sweeper.join(0.3)
    assert sweeper.is_alive(), f"the sweep did not wait for the build (removed {swept})"
    may_lock.set()
    builder.join(10)
    assert seen == {"locked": True, "after sweep": True}
    assert not sweeper.is_alive() and swept == []


def test_a_second_publish_of_one_key_keeps_the_first(tmp_path):
    store = SnapshotStore(tmp_path / "snapshots", "t1")
    first = publish_synthetic(store, tmp_path)
    second = publish_synthetic(store, tmp_path)
    assert second == first
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == [first.directory.name]


def test_a_restore_libvirt_refuses_leaves_nothing_and_removes_the_template(test_driver, tmp_path, caplog):
    """libvirt's test driver cannot load a QEMU save image: the restore fails as a
    corrupt image would, after the overlay was made."""
    hv = test_driver
    hv.fast_resume, hv.console_log = True, True  # as the synthetic template: a QMP socket, a console log
    publish_synthetic(hv.snapshots, tmp_path, hv.template_key())
    template = hv.template()
    assert template is not None
    with caplog.at_level(logging.WARNING, logger="corral.snapshots"):
        with pytest.raises(RestoreFailed, match="cannot restore VM corral-main-c10e00000001") as failed:
            hv.restore(template, name="corral-main-c10e00000001")
    assert failed.value.template_removed
    assert "libvirt could not restore it" in caplog.text
    assert hv.template() is None
    leftovers = [p for d in (hv.overlay_dir, hv.run_dir, hv.monitor_dir) for p in d.glob("corral-main-c10e*")]
    assert leftovers == []
    assert "corral-main-c10e00000001" not in hv.corral_domains()


def test_a_restore_past_its_deadline_gives_the_template_up(test_driver, tmp_path):
    """A libvirtd that hangs in restoreFlags may read the image's header late: no
    other clone may rewrite that header, so the template goes with the clone."""
    hv = test_driver
    hv.fast_resume, hv.console_log = True, True
    publish_synthetic(hv.snapshots, tmp_path, hv.template_key())
    template = hv.template()
    hv.calls.timeout_s = 0.2
    hv._restore_image = lambda name, template, image: time.sleep(1)  # hung libvirtd
    with pytest.raises(RestoreFailed, match="did not finish restoring VM") as failed:
        hv.restore(template, name="corral-main-c10e00000002")
    assert failed.value.template_removed and hv.template() is None
    assert failed.value.may_finish_late  # libvirt may still create corral-main-c10e00000002
    assert [p for d in (hv.overlay_dir, hv.run_dir) for p in d.glob("corral-main-c10e*")] == []


def test_an_image_removed_or_rebuilt_before_its_lock_is_template_gone_not_invalid(tmp_path):
    """Clones wait on the image's lock; one ahead of them may remove the template
    (found broken) and a build replace it: theirs is gone, nothing is broken."""
    store = SnapshotStore(tmp_path / "snapshots", "t1")
    removed = publish_synthetic(store, tmp_path)
    assert store.remove_template(removed, "found broken")
    with pytest.raises(TemplateGone, match="was removed meanwhile"):
        with store.locked_image(removed):
            pass
    template = publish_synthetic(store, tmp_path)
    outcome: dict = {}

    def waiting_clone() -> None:
        try:
            with store.locked_image(template):
                outcome["locked"] = True
        except Exception as e:
            outcome["error"] = e

    with store.locked_image(template):  # the clone ahead of it
        waiter = threading.Thread(target=waiting_clone)
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive()  # waits for the lock
        assert store.remove_template(template, "libvirt could not restore it")
        rebuilt = publish_synthetic(store, tmp_path)
    waiter.join(5)
    assert isinstance(outcome.get("error"), TemplateGone), outcome
    assert store.load(KEY) == rebuilt and rebuilt.inode != template.inode  # the rebuilt one stays


def test_a_clone_whose_template_goes_while_it_waits_is_template_gone_and_leaves_nothing(test_driver, tmp_path):
    hv = test_driver
    hv.fast_resume, hv.console_log = True, True
    template = publish_synthetic(hv.snapshots, tmp_path, hv.template_key())
    name = "corral-main-c10e00000003"
    outcome: dict = {}

    def restore() -> None:
        try:
            hv.restore(template, name=name)
        except Exception as e:
            outcome["error"] = e

    with hv.snapshots.locked_image(template):
        clone = threading.Thread(target=restore)
        clone.start()
        deadline = time.monotonic() + 5
        while not (hv.overlay_dir / f"{name}.qcow2").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # its overlay is made before it waits for the lock
        clone.join(0.1)
        assert hv.snapshots.remove_template(template, "swept as stale")
    clone.join(5)
    error = outcome.get("error")
    assert isinstance(error, TemplateGone), outcome
    assert not error.template_removed and not error.may_finish_late
    assert [p for d in (hv.overlay_dir, hv.run_dir, hv.monitor_dir) for p in d.glob(name + ".*")] == []
    assert name not in hv.corral_domains()


def test_a_template_removed_under_the_lock_before_libvirt_opened_it_is_template_gone(test_driver, tmp_path):
    """A sweep or a loader takes no image lock to remove a template: libvirt then
    finds no file. That clone's template is gone; no one's restore failed."""
    hv = test_driver
    hv.fast_resume, hv.console_log = True, True
    template = publish_synthetic(hv.snapshots, tmp_path, hv.template_key())
    restore_image = hv._restore_image

    def removed_first(name, template, image):
        hv.snapshots.remove_template(template, "swept as stale")
        restore_image(name, template, image)

    hv._restore_image = removed_first
    with pytest.raises(TemplateGone, match="removed before libvirt read it") as gone:
        hv.restore(template, name="corral-main-c10e00000004")
    assert not gone.value.template_removed
    assert [p for d in (hv.overlay_dir, hv.run_dir) for p in d.glob("corral-main-c10e*")] == []


def test_a_restore_call_that_never_started_before_its_deadline_leaves_the_template(test_driver, tmp_path):
    """Every call worker busy (a hung libvirtd): the restore never left the queue,
    so it read nothing and will not finish late; the template is not at fault."""
    hv = test_driver
    hv.fast_resume, hv.console_log = True, True
    template = publish_synthetic(hv.snapshots, tmp_path, hv.template_key())
    hv.calls = DeadlineCalls(0.2, workers=1)
    hung = threading.Event()
    threading.Thread(target=lambda: pytest.raises(LibvirtDeadline, hv.calls.run, "hanging", hung.wait),
                     daemon=True).start()
    try:
        time.sleep(0.05)  # the only worker is taken
        with pytest.raises(RestoreFailed, match="did not start restoring VM") as failed:
            hv.restore(template, name="corral-main-c10e00000005")
    finally:
        hung.set()
    assert not failed.value.template_removed and not failed.value.may_finish_late
    assert hv.template() == template


def test_a_template_rebuilt_while_a_remover_checked_the_old_one_stays(tmp_path, monkeypatch):
    """Two clones find one template broken; the first removes it and a build
    publishes a new one while the second is between its check and its removal:
    the second must not remove the new template."""
    store = SnapshotStore(tmp_path / "snapshots", "t1")
    broken = publish_synthetic(store, tmp_path)
    checked, may_remove = threading.Event(), threading.Event()
    is_current = SnapshotStore.is_current

    def check_then_pause(template):
        current = is_current(template)
        if threading.current_thread().name == "second clone":
            checked.set()
            may_remove.wait(1)
        return current

    monkeypatch.setattr(SnapshotStore, "is_current", staticmethod(check_then_pause))
    second = threading.Thread(target=store.remove_template, args=(broken, "libvirt could not restore it"),
                              name="second clone")
    second.start()
    assert checked.wait(5)

    def first_clone_and_builder() -> None:
        store.remove_template(broken, "libvirt could not restore it")
        publish_synthetic(store, tmp_path)

    rebuild = threading.Thread(target=first_clone_and_builder)
    rebuild.start()
    rebuild.join(0.3)
    may_remove.set()
    second.join(5)
    rebuild.join(5)
    rebuilt = store.load(KEY)
    assert rebuilt is not None and rebuilt.inode != broken.inode


def test_a_loader_that_found_a_template_broken_leaves_the_one_rebuilt_meanwhile(tmp_path, monkeypatch):
    """Validating reads the whole image once per process (~1 s for a real one);
    the template it is reading may be replaced by a good one meanwhile. Found
    broken, it removes only what it read."""
    store = SnapshotStore(tmp_path / "snapshots", "t1")
    broken = publish_synthetic(store, tmp_path)
    flip_byte(broken.image, 92 + DATA_LEN + 12345)  # a corrupt stream: only the digest tells
    reading, may_finish = threading.Event(), threading.Event()
    digest = stream_digest

    def slow_digest(f, offset):
        reading.set()
        may_finish.wait(5)
        return digest(f, offset)

    monkeypatch.setattr("actors.vm.snapshots.stream_digest", slow_digest)
    loader_store = SnapshotStore(tmp_path / "snapshots", "t1")  # its first look at the image: a full read
    loaded: list = []
    loader = threading.Thread(target=lambda: loaded.append(loader_store.load(KEY)))
    loader.start()
    assert reading.wait(5)
    assert store.remove_template(broken, "found broken by another")
    rebuilt = publish_synthetic(store, tmp_path)  # this store checked its stream: no digest read
    may_finish.set()
    loader.join(5)
    assert loaded == [None]  # what it read was broken
    assert store.load(KEY) == rebuilt  # and the good one there now stays


def test_a_private_copy_restore_rewrites_its_own_copy_and_leaves_the_image_as_it_was(test_driver, tmp_path):
    """A session's clones restore from copies of their own (side by side): each
    copy, 0600 beside the clone's overlay, carries the clone's identity in its
    header; the snapshot's own image is not touched and no copy outlives its
    restore."""
    hv = test_driver
    hv.fast_resume, hv.console_log = True, True
    template = publish_synthetic(hv.snapshots, tmp_path, hv.template_key())
    pristine = template.image.read_bytes()
    seen = []

    def restore_image(name, restored_from, image):
        with open(image, "rb") as f:
            seen.append((name, restored_from, image, SaveHeader.read(f).xml, os.stat(image).st_mode & 0o777,
                         os.path.getsize(image)))
        hv.conn.createXML(f"<domain type='test'><name>{name}</name><memory>1024</memory>"
                          "<os><type>hvm</type></os></domain>", 0)

    hv._restore_image = restore_image
    names = ["corral-main-c10e00000006", "corral-main-c10e00000007"]
    for name in names:
        hv.restore(template, name=name, private_copy=True)
    assert [(name, frm) for name, frm, *_ in seen] == [(name, template) for name in names]
    for name, _, image, xml, mode, size in seen:
        assert image == hv.overlay_dir / f"{name}.save" and not image.exists()
        assert ET.fromstring(xml).findtext("name") == name
        assert (mode, size) == (0o600, len(pristine))
    assert template.image.read_bytes() == pristine
    for name in names:
        hv.destroy_by_name(name)
