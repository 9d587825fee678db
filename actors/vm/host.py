"""The Hypervisor: corral's VMs on one libvirt connection. It creates each VM
(overlay, then a transient domain named ``corral-<instance>-<id>``) by a cold
boot or by restoring a clone of a snapshot template (actors/vm/snapshots.py),
destroys it, pauses and resumes it, sets its CPU, saves a session's VM into a
snapshot of its own (restored as a template's clones are), and reaps what a
crashed daemon left behind. No actor logic here; the per-VM Supervisor owns the calls.

Every method that can block on libvirtd runs under the call deadline
(actors/vm/libvirt_calls.py); a lost connection is reconnected on the next
call. The domain itself is typed data (actors/vm/domain.py).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from actors.vm.accelerator import detect_accelerator, warn_if_kvm_closed_to_qemu
from actors.vm.domain import (AGENT_DISK_SERIAL, FAST_BOOT_CMDLINE, ROOT_DISK_SERIAL, Disk, DomainSpec,
                              qemu_confinement)
from actors.errors import CorralError
from actors.vm.errors import (HypervisorError, LibvirtDeadline, NoSuchDomain, RestoreFailed, SessionSaveFailed,
                               TemplateBuildFailed, TemplateGone)
from actors.vm.faults import FaultInjector
from actors.vm.guest_link import GuestLink
from actors.vm.handle import LibvirtRunControl, VmHandle
from actors.vm.libvirt_calls import DeadlineCalls, libvirt_errors, libvirt_module, with_deadline
from actors.vm.overlays import create_overlay, give_back_to_root, overlay_data_bytes, remove_quietly
from actors.vm.qmp import QmpMonitor
from actors.vm.snapshots import (IMAGE_FILE, MIN_STREAM_BYTES, XML_FILE, SaveHeader, SessionSnapshots, SnapshotStore,
                                 Template, TemplateInvalid, TemplateKey, clone_xml, fingerprint,
                                 stream_digest, template_meta, xml_digest)
from guest.image.paths import GuestImage, guest_image
from protocol.channel.errors import ProtocolError

log = logging.getLogger("corral.hypervisor")

DOMAIN_PREFIX = "corral-"
# The CFS period the vCPU quota is a share of: the longest libvirt allows (1 s), so
# a throttled VM still runs a short task (a `true`, a reset) at full speed and only
# sustained CPU use is held to the quota.
CPU_PERIOD_US = 1_000_000
# cpu.shares of a VM from its creation until it is offered (a default task's are
# 1024): a boot, restore or warm-up in progress yields the CPU to running tasks.
REFILL_CPU_SHARES = 64
# A template VM idles this long after its Hello before it is saved: the guest
# finishes what its start queued, so every clone starts from a quiet guest.
TEMPLATE_SETTLE_S = 1.0
# After the host closes the template's channel, QEMU tells the guest's port;
# the save waits this long so the agent is back to polling for a host.
TEMPLATE_CLOSE_S = 0.1


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
        self.snapshots = SnapshotStore(Path(state_dir) / "snapshots", instance)
        self.session_snapshots = SessionSnapshots(Path(state_dir) / "sessions" / "snapshots", instance)
        # A restart ends every session: no one will restore what a predecessor saved.
        removed = self.session_snapshots.remove_all()
        if removed:
            log.info("removed %d session snapshot(s) a previous run left", len(removed))
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
                 memory_mib: int | None = None, genid: bool = False) -> DomainSpec:
        console = self.run_dir / f"{name}.console.log" if self.console_log else None
        monitor = self.monitor_dir / f"{name}.qmp" if self.fast_resume else None
        cmdline = FAST_BOOT_CMDLINE + f" corral.tmpfs={self.tmpfs_size}"
        if self.accelerator == "tcg":
            # Tasks without address space randomisation: TCG translates a randomised
            # exec's code anew every time (guest/image/init explains).
            cmdline += " corral.aslr=off"
        cmdline += " console=ttyS0" if console else " quiet"
        if network:
            cmdline += " corral.egress=1"  # the agent starts the egress relay (docs/egress.md)
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
            channel_socket=socket, egress_socket=self.run_dir / f"{name}.egress" if network else None,
            console_log=console, monitor_socket=monitor,
            qemu_owner=self.qemu_owner, genid=genid, cpu_shares=REFILL_CPU_SHARES,
        )

    @with_deadline
    def create(self, name: str | None = None, network: bool = False,
               memory_mib: int | None = None) -> VmHandle:
        """Overlay, then a transient domain; on any failure nothing is left behind."""
        name = name or self.new_name()
        spec = self.spec_for(name, self.overlay_dir / f"{name}.qcow2", self.run_dir / f"{name}.sock",
                             network, memory_mib)
        self._start(spec)
        return VmHandle(name=name, overlay=spec.disks[0].path, socket=spec.channel_socket,
                        console_log=spec.console_log, spec=spec, monitor=spec.monitor_socket,
                        egress_socket=spec.egress_socket)

    def _start(self, spec: DomainSpec) -> None:
        """Boot `spec` on a fresh overlay; on any failure nothing is left behind."""
        self._fresh_overlay(spec.name, spec.disks[0].path)
        try:
            with libvirt_errors(f"cannot start VM {spec.name}"):
                self.conn.createXML(spec.to_xml(), 0)
        except HypervisorError:
            self.discard_files_of(spec.name)
            raise

    def _fresh_overlay(self, name: str, overlay: Path) -> None:
        create_overlay(self.image.disk, overlay)
        if self.qemu_owner is not None:  # libvirt relabels nothing: the overlay is QEMU's to write
            try:
                os.chown(overlay, *self.qemu_owner)
            except OSError as e:
                self.discard_files_of(name)
                raise HypervisorError(f"cannot give VM {name}'s overlay to QEMU's user: {e}") from None

    # --- snapshot templates and their clones (actors/vm/snapshots.py) ----------------

    def template_key(self, network: bool = False, memory_mib: int | None = None) -> TemplateKey:
        """The key of this Hypervisor's template for a tier: its images, QEMU and
        libvirt, the domain every VM of it gets (stat and string work only)."""
        placeholder = self.spec_for(f"{self.prefix}template", Path("/overlay"), Path("/socket"), genid=True)
        placeholder = dataclasses.replace(placeholder, uuid="00000000-0000-0000-0000-000000000000")
        qemu = shutil.which("qemu-system-x86_64")
        host = f"libvirt {libvirt_module().getVersion()}, " + (fingerprint(Path(qemu)) if qemu else "no qemu")
        return TemplateKey(
            gold=fingerprint(self.image.disk, self.image.kernel, self.image.initrd),
            agent=fingerprint(self.image.agent_iso), host=host, domain=xml_digest(placeholder.to_xml()),
            network=network, memory_mib=memory_mib or self.memory_mib)

    def template(self, network: bool = False, memory_mib: int | None = None) -> Template | None:
        """The valid template of this tier on disk, or None: none was built, or the
        one there was stale or broken (removed with a warning). Cheap: stat, its
        small files and the image's header; the image's whole stream is read once
        per process, on its first load."""
        return self.snapshots.load(self.template_key(network, memory_mib))

    def build_template(self, network: bool = False, memory_mib: int | None = None, *,
                       name: str | None = None, boot_timeout_s: float = 60.0,
                       settle_s: float = TEMPLATE_SETTLE_S) -> Template:
        """Boot a template VM of this tier (SeaBIOS, a generation id), wait for its
        Hello, let it settle, close the channel without a host frame, save it
        running, and publish the image whole. Slow (a boot and a save, ~5 s under
        TCG). `name`: the template VM's domain name, so a caller can count it as
        its own while it runs (the watchdog reaps unowned domains). This tier's
        templates of another build are removed first. TemplateBuildFailed, with
        nothing left behind, where any step fails."""
        key = self.template_key(network, memory_mib)
        self.snapshots.remove_stale(key)
        name = name or self.new_name()
        overlay, socket = self.overlay_dir / f"{name}.qcow2", self.run_dir / f"{name}.sock"
        spec = self.spec_for(name, overlay, socket, network, memory_mib, genid=True)
        with self.snapshots.building() as build:
            image = build / IMAGE_FILE
            link = GuestLink(socket)
            try:
                started = time.monotonic()
                self.calls.run("starting a template VM", self._start, spec)
                deadline = started + boot_timeout_s
                link.connect(deadline)
                link.wait_hello(deadline)
                boot_s = time.monotonic() - started
                time.sleep(settle_s)
                guest_next_seq, host_next_seq = link.decoder.expected_seq, link.encoder.next_seq
                link.close()  # saved with no host on the channel: each clone's host connects anew
                time.sleep(TEMPLATE_CLOSE_S)
                saving = time.monotonic()
                self.calls.run("saving a template VM", self._save, name, image)
                save_s = time.monotonic() - saving
                os.chown(image, 0, 0)
                os.chmod(image, 0o600)
                # Clones get a fresh, empty overlay: a saved guest whose root took a
                # write would read zeros there after a restore (GUEST-NOTES.md).
                written = overlay_data_bytes(overlay)
                if written:
                    raise TemplateBuildFailed(f"template VM {name} wrote {written} bytes to its overlay; "
                                              "its clones would not see them")
                with open(image, "rb") as f:
                    header = SaveHeader.read(f)
                    image_bytes = os.fstat(f.fileno()).st_size
                    if image_bytes - header.stream_offset < MIN_STREAM_BYTES:
                        raise TemplateBuildFailed(f"template VM {name}'s save image is only {image_bytes} bytes")
                    digest = stream_digest(f, header.stream_offset)
                (build / XML_FILE).write_text(header.xml)
                meta = template_meta(name=name, header=header, image_bytes=image_bytes, stream_sha256=digest,
                                     guest_next_seq=guest_next_seq, host_next_seq=host_next_seq,
                                     boot_s=boot_s, save_s=save_s)
                template = self.snapshots.publish(build, key, meta)
            except (CorralError, ProtocolError, TemplateInvalid, OSError) as e:
                link.close()
                self._discard_vm(name)
                raise (e if isinstance(e, TemplateBuildFailed) else
                       TemplateBuildFailed(f"cannot build a snapshot template ({name}): {e}")) from None
            finally:
                self.discard_files_of(name)
        log.info("snapshot template %s built: boot %.2f s, save %.2f s, %d MiB",
                 template.directory.name, boot_s, save_s, image_bytes >> 20)
        return template

    def _save(self, name: str, image: Path) -> None:
        """Save the running domain into `image` (the domain is gone after): it
        restores running."""
        libvirt = libvirt_module()
        with libvirt_errors(f"cannot save VM {name}"):
            self.domain(name).saveFlags(str(image), None, libvirt.VIR_DOMAIN_SAVE_RUNNING)

    def save_session(self, handle: VmHandle, session_id: str, guest_next_seq: int,
                     host_next_seq: int) -> Template:
        """Save a session's running VM whole (memory, devices: its files are in
        the guest's tmpfs) into a snapshot of its own (SessionSnapshots); the
        domain is gone after. The caller closed the channel first, with no
        exec running; the two sequences are the channel's next frame in each
        direction, which the restored agent expects. Returns the snapshot as a
        Template of the VM's tier, for restore() to clone. SessionSaveFailed,
        with nothing of the snapshot left behind, where libvirt cannot save the
        VM, the image does not read back, or the VM wrote to its overlay (a
        restore gives a fresh one: those writes would be lost)."""
        network, memory_mib = handle.egress_socket is not None, handle.spec.memory_mib
        directory = self.session_snapshots.new_directory(session_id)
        image = directory / IMAGE_FILE
        try:
            self.calls.run(f"saving VM {handle.name}", self._save, handle.name, image)
            os.chown(image, 0, 0)
            os.chmod(image, 0o600)
            written = overlay_data_bytes(handle.overlay)
            if written:
                raise SessionSaveFailed(f"it wrote {written} bytes to its overlay, which a restore would lose")
            with open(image, "rb") as f:
                header = SaveHeader.read(f)
                st = os.fstat(f.fileno())
            if st.st_size - header.stream_offset < MIN_STREAM_BYTES:
                raise SessionSaveFailed(f"its save image is only {st.st_size} bytes")
            key = self.template_key(network, memory_mib)
        except (CorralError, TemplateInvalid, OSError) as e:
            shutil.rmtree(directory, ignore_errors=True)
            raise SessionSaveFailed(f"cannot save VM {handle.name} of session {session_id}: {e}") from None
        return Template(key=key, directory=directory, xml=header.xml, name=handle.name, inode=st.st_ino,
                        data_len=header.data_len, guest_next_seq=guest_next_seq, host_next_seq=host_next_seq)

    def restore(self, template: Template, name: str | None = None, private_copy: bool = False) -> VmHandle:
        """A clone of `template` (a refill's, or a session's snapshot), running: a
        fresh overlay, the image's header rewritten to the clone's identity and
        restoreFlags, under the image's lock. Its handle says restored, and the
        sequences its guest's next frame and the host's first carry.
        RestoreFailed, with nothing of the clone left behind, where any step fails;
        template_removed where the template was at fault; may_finish_late where
        libvirt may still create the clone's domain under `name` after a deadline.
        TemplateGone (a RestoreFailed) where the template was removed or rebuilt
        before libvirt read it: no fault of anyone's, the caller looks again.

        The caller's thread waits for the image's lock (other clones restoring,
        ~0.5 s each under TCG); only restoreFlags itself runs under the libvirt
        call deadline, so clones queued on one template hold no call worker.
        `private_copy`: the clone restores from a copy of the image of its own
        (<name>.save beside its overlay, removed after), made under a shared
        lock, so clones of one image restore side by side (a fork's sessions:
        4 restores took 0.98 s so against 2.45 s one after the other)."""
        name = name or self.new_name()
        overlay, socket = self.overlay_dir / f"{name}.qcow2", self.run_dir / f"{name}.sock"
        spec = self.spec_for(name, overlay, socket, template.key.network, template.key.memory_mib, genid=True)
        handle = VmHandle(name=name, overlay=overlay, socket=socket, console_log=spec.console_log, spec=spec,
                          monitor=spec.monitor_socket, restored=True, guest_first_seq=template.guest_next_seq,
                          host_first_seq=template.host_next_seq, egress_socket=spec.egress_socket)
        removed = late = False
        try:
            xml = clone_xml(template.xml, name=name, uuid=spec.uuid, overlay=overlay, socket=socket,
                            monitor=spec.monitor_socket, console=spec.console_log, egress=spec.egress_socket)
            self._fresh_overlay(name, overlay)
            with self._image_to_restore(template, name, private_copy) as (image, path):
                header = SaveHeader.read(image)
                if header.data_len != template.data_len:
                    raise TemplateInvalid("memory.save's header changed size")
                image.seek(0)
                image.write(header.with_xml(xml).to_bytes())
                image.flush()
                try:
                    self.calls.run(f"restoring VM {name}", self._restore_image, name, template, path)
                except LibvirtDeadline as e:
                    if e.started:  # one that never started read nothing: the template is fine
                        # libvirt may still read this header late, so no other clone may
                        # rewrite it; and create the domain late, so no one may take the name.
                        late = True
                        removed = self.snapshots.remove_template(template, f"libvirt did not restore it: {e}")
                    raise
                except HypervisorError as e:
                    if not self.snapshots.is_current(template):
                        # Removed (swept, found broken by a loader) before libvirt opened it.
                        raise TemplateGone(f"template {template.directory.name} was removed "
                                           f"before libvirt read it ({e})") from None
                    # A save image libvirt or QEMU cannot load (a corrupt stream) fails every
                    # restore alike: rebuild it rather than fail each refill.
                    removed = self.snapshots.remove_template(template, f"libvirt could not restore it: {e}")
                    raise
        except TemplateGone as e:
            self._discard_vm(name)
            raise TemplateGone(f"cannot restore VM {name}: {e}") from None
        except TemplateInvalid as e:
            removed = self.snapshots.remove_template(template, str(e))
            self._discard_vm(name)
            raise RestoreFailed(f"cannot restore VM {name}: {e}", template_removed=removed) from None
        except (HypervisorError, OSError) as e:
            self._discard_vm(name)
            raise RestoreFailed(f"cannot restore VM {name}: {e}", template_removed=removed,
                                may_finish_late=late) from None
        return handle

    @contextmanager
    def _image_to_restore(self, template: Template, name: str, private_copy: bool):
        """(open file, path) of the image a clone is restored from, its header
        to rewrite: the template's own, held exclusively until the block ends;
        or a private copy (<name>.save, 0600, removed at the end)."""
        if not private_copy:
            with self.snapshots.locked_image(template) as image:
                yield image, template.image
            return
        copy = self.overlay_dir / f"{name}.save"
        try:
            with open(os.open(copy, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), "r+b") as image:
                with self.snapshots.locked_image(template, shared=True) as source:  # no header rewrite meanwhile
                    size = os.fstat(source.fileno()).st_size
                    copied = 0
                    while copied < size:  # in the kernel, no bytes through Python
                        done = os.copy_file_range(source.fileno(), image.fileno(), size - copied, copied, copied)
                        if not done:
                            raise OSError(f"copying {template.image} stopped at {copied} of {size} bytes")
                        copied += done
                yield image, copy
        finally:
            remove_quietly(copy)

    def _restore_image(self, name: str, template: Template, image: Path) -> None:
        with libvirt_errors(f"cannot restore VM {name} from {template.directory.name}"):
            self.conn.restoreFlags(str(image), None, 0)

    def _discard_vm(self, name: str) -> None:
        """What a failed build or restore leaves: domain and files."""
        try:
            self.destroy_domain(name)
        except HypervisorError as e:
            log.warning("VM %s: destroy after a failure failed: %s (the watchdog will reap it)", name, e)
        self.discard_files_of(name)

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
