"""A clone restored from a snapshot template is as clean as a fresh boot, proved
against real VMs through the real service (corrald's pool in strict mode:
every task on a VM of its own, each restored by actors/refill.py and resumed
and warmed up by its Supervisor):

- randomness: clones of one template never share the kernel's random pool nor
  what a new process seeds from it;
- wall clock: a clone shows the host's time within 1 s, even from a template
  an hour old;
- identity: each clone has its own name, uuid, generation id, overlay, channel
  and QMP socket in its live domain XML;
- channel: a frame recorded from one clone is refused by another, both ways;
- a truncated template is rebuilt and no task fails meanwhile; a restore that
  fails falls back to a cold boot with one warning and a count;
- the hard-capability tiers restore from templates of their own.
"""

import concurrent.futures
import dataclasses
import logging
import os
import shutil
import time

import pytest

import config
from actors.vm.domain import DomainSpec
from actors.vm.errors import ChannelClosed
from actors.vm.guest_link import GUEST_FRAME_CAP, GuestLink
from actors.vm.host import REFILL_CPU_SHARES, Hypervisor
from actors.vm.snapshots import SaveHeader
from protocol.channel import codec, messages
from protocol.channel.errors import SequenceError
from protocol.channel.frame import FrameDecoder
from protocol.client.api import Client
from protocol.hostcrc import crc32
from tests.support.host import STATE_DIR, TEST_INSTANCE
from tests.support.service import counter, pool_vms, running_service, service_config, wait_ready
from tests.support.vm import live_identity
from tests.support.waiting import wait_until

BOOT_S = 90  # a template's boot under TCG on a loaded host
# A task's view of the kernel's random pool, of what a new process seeds from it, and a fresh uuid.
RANDOMNESS = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
              "python3 -c 'import random; print(random.random())'; cat /proc/sys/kernel/random/uuid")
CLOCK_INSTANCE = f"{TEST_INSTANCE}c"[:16]  # the stale template's own VMs and templates
HOUR_S = 3600


def remove_templates(hypervisor) -> None:
    for path in hypervisor.snapshots.root.glob(f"{hypervisor.snapshots.instance}-*"):
        shutil.rmtree(path, ignore_errors=True)


def refills(service, kind: str) -> int:
    """VMs the service has offered so far that were made as `kind` (restore, build, boot)."""
    for metric in service.metrics.refill_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels["kind"] == kind:
                return int(sample.value)
    return 0


def connected_clone(hypervisor, template, made: list) -> tuple:
    """A clone restored and resumed as a Supervisor does it, but driven from here."""
    handle = hypervisor.restore(template)
    link = GuestLink(handle.socket, guest_first_seq=handle.guest_first_seq)
    made.append((handle, link))
    link.connect(time.monotonic() + 20)
    return handle, link


@pytest.fixture(scope="module")
def template(hypervisor):
    """This instance's default template, there before any service starts (so
    every VM of the module's services is a clone); removed at the end (~80 MiB)."""
    yield hypervisor.template() or hypervisor.build_template(boot_timeout_s=BOOT_S)
    remove_templates(hypervisor)


# --- the channel, on bare clones (before the module's service: its watchdog would
# reap VMs its pool does not own) --------------------------------------------------------

def test_a_frame_recorded_from_one_clone_is_refused_by_another_both_ways(hypervisor, template, clones):
    (_, a), (b_handle, b) = (connected_clone(hypervisor, template, clones) for _ in range(2))
    for link in (a, b):
        link.resume(time.monotonic() + 20)
    # Fresh random bases on each: the template's counts (guest 1, host 0) are gone.
    assert (a.encoder.next_seq, a.decoder.expected_seq) != (b.encoder.next_seq, b.decoder.expected_seq)
    # A host frame, recorded on its way to clone A, and A's answer, recorded raw.
    recorded = a.encoder.encode(codec.encode(messages.Heartbeat(nonce=7)))
    b_expects = b.decoder.expected_seq
    a.sock.sendall(recorded)
    answer, payloads = b"", []
    a.sock.settimeout(20)
    while not payloads:
        chunk = a.sock.recv(4096)
        assert chunk, "clone A closed its channel"
        answer += chunk
        payloads = a.decoder.feed(chunk)
    assert codec.decode(payloads[0], messages.GUEST_TO_HOST) == messages.HeartbeatAck(nonce=7)
    # A's answer played to B's host end: refused on its sequence id.
    with pytest.raises(SequenceError):
        FrameDecoder(crc32, max_payload=GUEST_FRAME_CAP, first_seq=b_expects).feed(answer)
    # A's host frame played into B's channel: B's agent refuses it and powers its VM off.
    b.sock.sendall(recorded)
    with pytest.raises(ChannelClosed):
        b.receive(frozenset({messages.HeartbeatAck}), time.monotonic() + 20)
    wait_until(lambda: not hypervisor.domain_exists(b_handle.name), 20, "clone B powered off")
    a.run([b"true"], time.monotonic() + 20)  # A goes on


def test_a_clone_not_yet_offered_yields_the_cpu_to_running_tasks(hypervisor, template, clones):
    """Restored with few cpu.shares (the template's XML carries them); the
    Supervisor gives an offered VM the task's (test_capabilities checks 1024)."""
    handle, _ = connected_clone(hypervisor, template, clones)
    assert hypervisor.cpu_setting(handle.name)["cpu_shares"] == REFILL_CPU_SHARES


# --- through the service ---------------------------------------------------------------

@pytest.fixture(scope="module")
def service(hypervisor, template, tmp_path_factory):
    """Strict mode: each task on a fresh clone, retired after it."""
    with running_service(service_config(tmp_path_factory.mktemp("clones"), pool={"strict": True}),
                         hypervisor) as svc:
        yield svc
        assert counter(svc.metrics.duplicate_answers) == 0


@pytest.fixture
def client(service):
    wait_ready(service, timeout_s=180)
    with Client(service.cfg.daemon.endpoint) as c:
        yield c


def ready_vms(service) -> list[str]:
    """Two VMs the pool offers now (others may be leaving or on their way)."""
    return sorted(vm_id for vm_id, state in pool_vms(service).items() if state == "ready")[:2]


def test_the_pool_is_filled_with_clones_each_resumed_on_its_own_sequence_bases(service, client):
    assert refills(service, "boot") == refills(service, "build") == 0
    assert refills(service, "restore") >= 2
    vms = service.directory.get("pool").proxy().state.get(timeout=5).vms
    links = [vms[vm_id].supervisor.proxy().link.get(timeout=5) for vm_id in ready_vms(service)]
    bases = {(link.encoder.next_seq, link.decoder.expected_seq) for link in links}
    assert len(bases) == len(links) == 2


def test_clones_of_one_template_never_share_randomness(service, client):
    restored = refills(service, "restore")
    runs = [client.run(["sh", "-c", RANDOMNESS], capabilities=["dev:python"], wait_s=60) for _ in range(4)]
    for reply in runs:
        assert (reply.error_code, reply.exit_code) == ("", 0), reply
    lines = [reply.stdout.decode().split("\n")[:3] for reply in runs]
    for what, values in zip(("/dev/urandom", "random.random()", "random/uuid"), zip(*lines)):
        assert len(set(values)) == len(runs), f"two clones share {what}: {values}"
        assert all(values), what
    # Strict mode: four VMs, each a clone of the same template (none booted).
    wait_until(lambda: refills(service, "restore") >= restored + 2, 60, "the pool refilled")
    assert refills(service, "boot") == 0


def test_each_clone_has_its_own_name_uuid_genid_overlay_channel_and_qmp_socket(service, template, client):
    vm_ids = ready_vms(service)
    a, b = (live_identity(service.hypervisor, vm_id) for vm_id in vm_ids)
    for field in ("name", "uuid", "genid", "overlay", "channel", "qmp"):
        assert a[field] != b[field], field
        assert a[field] and b[field], field
    hv = service.hypervisor
    for vm_id, identity in zip(vm_ids, (a, b)):
        assert identity["name"] == vm_id
        assert identity["overlay"] == str(hv.overlay_dir / f"{vm_id}.qcow2")
        assert identity["channel"] == str(hv.run_dir / f"{vm_id}.sock")
        if hv.fast_resume:
            assert identity["qmp"] == f"unix:{hv.monitor_dir / vm_id}.qmp,server=on,wait=off"
        assert template.name not in identity["xml"]  # nothing per-VM left of the template


def test_a_truncated_template_is_rebuilt_and_no_task_fails_meanwhile(service, client, template):
    built = counter(service.metrics.snapshot_builds, result="ok")
    os.truncate(template.image, template.image.stat().st_size // 2)
    # Strict: each of these needs a new VM; the first refill finds the template
    # broken and builds a new one, the others boot meanwhile.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda i: client.run(["echo", str(i)], wait_s=120), range(6)))
    assert [(r.error_code, r.stdout) for r in replies] == [("", f"{i}\n".encode()) for i in range(6)]
    wait_until(lambda: counter(service.metrics.snapshot_builds, result="ok") == built + 1, 120,
               "the template rebuilt")
    rebuilt = service.hypervisor.template()
    assert rebuilt is not None and rebuilt.inode != template.inode
    assert counter(service.metrics.snapshot_builds, result="failed") == 0


def test_a_failed_restore_falls_back_to_a_boot_with_one_warning_and_a_count(service, client, caplog):
    caplog.set_level(logging.WARNING, logger="corral")
    wait_until(lambda: service.hypervisor.template() is not None, 120, "a template")
    current = service.hypervisor.template()
    failures = counter(service.metrics.restore_failures, stage="restore")
    booted = refills(service, "boot")
    # QEMU's stream made unreadable in place: same size, so only libvirt's restore can tell.
    with open(current.image, "r+b") as f:
        f.seek(SaveHeader.read(f).stream_offset)
        f.write(bytes(64))
    reply = client.run(["echo", "still served"], wait_s=120)  # strict: its VM is refilled at once
    assert (reply.error_code, reply.stdout) == ("", b"still served\n")
    wait_until(lambda: counter(service.metrics.restore_failures, stage="restore") == failures + 1, 60,
               "the failed restore counted")
    wait_until(lambda: refills(service, "boot") > booted, 120, "the fallback boot offered")
    warnings = [r.getMessage() for r in caplog.records if "snapshot clone" in r.getMessage()]
    assert len(warnings) == 1 and "falling back to cold boots" in warnings[0], warnings
    assert counter(service.metrics.vms_destroyed, reason="boot_failed") == 0
    # libvirt refused the image: the template is gone, and the next builder makes a new one.
    assert service.hypervisor.template() is None or service.hypervisor.template().inode != current.inode
    wait_ready(service, timeout_s=120)


def test_hard_capability_tiers_restore_from_templates_of_their_own(service, client):
    hv = service.hypervisor
    large = service.cfg.vm.large_memory_mib
    for capability, network, memory in (("net:egress", True, None), ("res:large_mem", False, large)):
        built = counter(service.metrics.snapshot_builds, result="ok")
        # An earlier test of this instance (test_capabilities' tiers) may have left one.
        existed = hv.template(network=network, memory_mib=memory) is not None
        restored = refills(service, "restore") + refills(service, "build")
        seen = set()
        for _ in range(2):  # strict: the second task gets another VM of the tier
            # net:egress: the egress relay answers on the proxy address (the clone's own port,
            # its socket rewritten per clone); the other tiers have none (a shell builtin only).
            reply = client.run(["sh", "-c", "echo ${https_proxy:-none}; echo /sys/class/net/*"],
                               capabilities=[capability], wait_s=180)
            assert (reply.error_code, reply.exit_code) == ("", 0), (capability, reply)
            seen.add(reply.stdout.decode())
        assert seen == {("http://127.0.0.1:3128" if network else "none") + "\n/sys/class/net/lo\n"}, seen
        tier_template = hv.template(network=network, memory_mib=memory)
        assert tier_template is not None, capability
        assert (tier_template.key.network, tier_template.key.memory_mib) == (network, memory or hv.memory_mib)
        assert tier_template.directory != hv.snapshots.directory(hv.template_key())
        assert counter(service.metrics.snapshot_builds, result="ok") == built + (not existed), capability
        assert refills(service, "restore") + refills(service, "build") >= restored + 2, capability


# --- the wall clock, from a template an hour old ---------------------------------------

class HourBehindSpec(DomainSpec):
    """A domain whose real-time clock reads an hour behind the host's (libvirt's
    clock adjustment): a guest booted on it sets its wall clock an hour back."""

    def to_xml(self) -> str:
        xml = super().to_xml()
        assert xml.count('<clock offset="utc" />') == 1
        return xml.replace('<clock offset="utc" />',
                           f'<clock offset="variable" adjustment="-{HOUR_S}" basis="utc" />')


@pytest.fixture(scope="module")
def hour_old_template_hypervisor():
    """A Hypervisor of its own instance whose VMs keep time an hour behind, and
    its template, whose guest's clock is an hour stale when it is saved."""
    cfg = config.load(overrides={"state_dir": str(STATE_DIR), "daemon": {"instance": CLOCK_INSTANCE}})
    hv = Hypervisor.from_config(cfg)
    spec_for = hv.spec_for

    def hour_behind(*args, **kwargs) -> HourBehindSpec:
        spec = spec_for(*args, **kwargs)
        return HourBehindSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})

    hv.spec_for = hour_behind  # its templates' key says so too: they are its own
    try:
        remove_templates(hv)
        hv.build_template(boot_timeout_s=BOOT_S)
        yield hv
    finally:
        remove_templates(hv)
        hv.close()


def guest_time(run) -> tuple[float, float, float]:
    """(host before, guest's `date`, host after): the guest read its clock in between."""
    before = time.time()
    guest = float(run())
    return before, guest, time.time()


def test_a_clone_shows_the_hosts_time_within_a_second_even_from_an_hour_old_template(
        hour_old_template_hypervisor, tmp_path):
    """Waiting an hour is no test. What ages a template is that its guest's
    wall clock stops at the save and its clones wake up with it (the RTC does
    not help: the guest reads it only at boot). So the template here is built
    from a guest whose clock was honestly an hour behind from its boot on
    (libvirt's clock adjustment of its RTC, which its clones keep too). First
    a bare clone, restored without corrald's Resume, shows the hour; then a
    clone that corrald's pool restored, resumed and offered shows the host's
    time within a second."""
    hv = hour_old_template_hypervisor
    template = hv.template()
    bare = hv.restore(template)
    link = GuestLink(bare.socket, guest_first_seq=bare.guest_first_seq)
    try:
        link.connect(time.monotonic() + 20)
        before, guest, after = guest_time(lambda: link.run([b"date", b"+%s.%N"], time.monotonic() + 30).stdout)
    finally:
        link.close()
        hv.destroy(bare)
    assert before - HOUR_S - 600 < guest < after - HOUR_S + 1, (before, guest, after)

    with running_service(service_config(tmp_path, CLOCK_INSTANCE, pool={"size": 1}), hv) as svc:
        with Client(svc.cfg.daemon.endpoint) as client:
            client.run(["true"], wait_s=60)  # the first command's binaries are slow to translate
            for _ in range(3):
                before, guest, after = guest_time(lambda: client.run(["date", "+%s.%N"], wait_s=60).stdout)
                assert before - 1 <= guest <= after + 1, (before, guest, after)
        assert refills(svc, "boot") == 0 and refills(svc, "restore") >= 1  # clones, not boots
