"""A hostile guest on the real virtio-serial channel, against the real daemon.

VMs here boot the test-only hostile agent ISO (guest/hostile_agent.py, built by
guest/image/build.py like the real one). It behaves until an Exec names an
attack in argv[0], or attacks instead of its Hello when the test puts
corral.hostile=<attack> on the kernel command line. Every attack must end in:
the VM destroyed and replaced, the violation counted by kind, the task (if
any) answered once with a clear code, and corrald still serving. A session's
VM runs several execs at once: a message naming an exec that does not run
ends the session, every exec in it answered once.
"""

import dataclasses
import time

import pytest

from actors.messages import SessionEnded
from actors.vm.accelerator import detect_accelerator
from actors.vm.host import Hypervisor
from guest.image.build import build_agent_iso
from guest.image.paths import guest_image
from protocol.client.api import Client
from tests.support.host import STATE_DIR, TEST_INSTANCE
from tests.support.service import counter, operator, pool_vms, running_service, service_config, wait_ready
from tests.support.sessions import Session, standing_in
from tests.support.waiting import wait_until

INSTANCE = f"{TEST_INSTANCE}h"[:16]  # its own VMs: no other service reaps them, nor they others'


@pytest.fixture(scope="module")
def hostile_hypervisor(cfg):
    iso = build_agent_iso(STATE_DIR, hostile=True)
    image = dataclasses.replace(guest_image(STATE_DIR), agent_iso=iso)
    hv = Hypervisor(uri=cfg.libvirt_uri, state_dir=cfg.state_dir, image=image,
                    accelerator=detect_accelerator(cfg.vm.accelerator), memory_mib=256, vcpus=1,
                    tmpfs_size=cfg.vm.tmpfs_size, instance=INSTANCE)
    yield hv
    hv.close()


@pytest.fixture(scope="module")
def service(hostile_hypervisor, tmp_path_factory):
    # Booted VMs only: the hostile agent speaks no Resume, so a clone of it would
    # only wait out its resume deadline before the pool booted one anyway.
    cfg = service_config(tmp_path_factory.mktemp("hostile"), INSTANCE, snapshots={"enabled": False})
    with running_service(cfg, hostile_hypervisor) as svc:
        yield svc
        # Every attack ended a VM, never an actor of the host.
        assert svc.metrics.counter_total(svc.metrics.actor_restarts) == 0 and not svc.gave_up.is_set()
    assert hostile_hypervisor.corral_domains() == []  # nothing left behind


@pytest.fixture
def client(service):
    wait_ready(service, timeout_s=180)  # each test starts from a healed pool
    with Client(service.cfg.daemon.endpoint) as c:
        yield c


def no_stray_domains(service) -> None:
    """Every domain of this instance belongs to a VM the pool knows."""
    wait_until(lambda: set(service.hypervisor.corral_domains()) <= set(pool_vms(service)), 15,
               "no domain outside the pool")


def test_the_hostile_agent_behaves_until_told_otherwise(client):
    reply = client.run(["ok"], timeout_s=10)
    assert (reply.error_code, reply.stdout, reply.exit_code) == ("", b"ok\n", 0)


# attack named in the Exec -> the violation kind the host must count
EXEC_ATTACKS = [
    ("bad_magic", "bad_magic"),
    ("oversize", "frame_too_large"),
    ("crc_mismatch", "crc_mismatch"),
    ("seq_gap", "bad_sequence"),
    ("replay", "bad_sequence"),
    ("unknown_type", "unknown_message_type"),
    ("malformed", "malformed_payload"),
    ("field_too_long", "field_too_long"),
    ("host_message", "unexpected_message"),
    ("host_stdin", "unexpected_message"),  # Stdin is the host's
    ("output_gap", "output_out_of_order"),  # the first chunk at offset 1
    ("output_overlap", "output_out_of_order"),  # the second chunk inside the first
    ("output_repeat", "output_out_of_order"),  # a chunk twice
    ("output_other_exec", "wrong_exec"),
    ("wrong_state", "unexpected_message"),  # Hello while running
    ("truncated_eof", "truncated_frame"),  # half a header, then the VM powers off
    ("stall_header", "stalled_frame"),  # half a header, then nothing: the VM lives on
    ("trickle_frame", "stalled_frame"),  # 1 MiB declared, sent at 1 KiB/s
]


@pytest.mark.parametrize("attack, kind", EXEC_ATTACKS)
def test_channel_attack_mid_task_ends_the_vm_and_answers_protocol_violation(service, client, attack, kind):
    ends_the_vm_as_a_violation(service, client, [attack], kind, timeout_s=20)


def test_a_frame_that_stalls_mid_task_is_a_violation_within_seconds_not_the_timeout(service, client):
    # 1 MiB declared (under the cap), 10 bytes sent, then nothing. Allowed:
    # ioguard.frame_stall_s (1 s) + 1 MiB at rate_bytes_per_s (1 MiB/s) = 2 s,
    # where the dead-man's switch alone would take the timeout + 5 s (65 s here).
    reply, answered = ends_the_vm_as_a_violation(service, client, ["stall_frame", "10"], "stalled_frame",
                                                 timeout_s=60)
    assert "stalled_frame" in reply.error_message
    assert answered < 20, answered
    print(f"FIGURE stall_frame (1 MiB declared, 10 bytes sent): answered protocol_violation "
          f"(stalled_frame) {answered:.2f} s after submit (task timeout 60 s)")


def test_a_scram_stops_the_clock_of_a_frame_in_progress(service, client):
    # Paused by the host mid-frame, a guest cannot send: that time is not its
    # fault. The frame (10 bytes of 1 MiB, then nothing) is ended only after
    # the resume, with what was left of its 2 s.
    ioguard = service.directory.get("ioguard").proxy()
    future = client.submit(["stall_frame", "10"], timeout_s=60)
    wait_until(lambda: ioguard.stats().get(timeout=5)["total"]["partial_bytes"] == 1 << 20, 30,
               "the 1 MiB frame admitted")
    assert operator(service, "scram", "frame in progress").ok
    time.sleep(4)  # twice the frame's deadline
    assert not future.done()
    resumed = time.monotonic()
    assert operator(service, "resume").ok
    reply = future.result(timeout=30)
    answered = time.monotonic() - resumed
    assert reply.error_code == "protocol_violation" and "stalled_frame" in reply.error_message, reply
    assert answered < 10, answered
    print(f"FIGURE stall_frame across a 4 s SCRAM: not ended while paused; answered {answered:.2f} s "
          f"after the resume")
    wait_ready(service, timeout_s=180)
    no_stray_domains(service)


def ends_the_vm_as_a_violation(service, client, argv, kind, timeout_s, **submit_args) -> float:
    """Run `argv` on the hostile agent: one protocol_violation answer naming
    `kind`, the violation counted, the VM destroyed and the pool refilled. The
    reply and the seconds from submit to it."""
    metrics = service.metrics
    violations_before = counter(metrics.violations, kind=kind)
    destroyed_before = counter(metrics.vms_destroyed, reason="protocol_violation")
    before = set(pool_vms(service))
    started = time.monotonic()
    reply = client.run(argv, timeout_s=timeout_s, wait_s=timeout_s + 40, **submit_args)
    answered = time.monotonic() - started
    assert reply.error_code == "protocol_violation", reply
    assert reply.error_message and reply.stdout == b""
    assert counter(metrics.violations, kind=kind) == violations_before + 1
    wait_until(lambda: counter(metrics.vms_destroyed, reason="protocol_violation") == destroyed_before + 1,
               10, "the pool to count the destroyed VM")
    gone = wait_until(lambda: before - set(pool_vms(service)), 10, "the violating VM gone")
    for vm in gone:
        assert not service.hypervisor.domain_exists(vm)
        assert not (service.hypervisor.overlay_dir / f"{vm}.qcow2").exists()
    no_stray_domains(service)
    wait_ready(service, timeout_s=180)
    assert client.run(["ok"], timeout_s=10).stdout == b"ok\n"
    assert counter(metrics.duplicate_answers) == 0
    return reply, answered


def test_output_after_the_exit_while_files_are_collected_answers_protocol_violation(service, client):
    # The task's answer waits for its files: the late chunk comes before it.
    reply, _ = ends_the_vm_as_a_violation(service, client, ["output_after_exit"], "output_after_exit",
                                          timeout_s=20, collect=["/tmp/never"])
    assert "output_after_exit" in reply.error_message


def test_output_after_the_exit_of_an_answered_task_ends_the_vm_and_answers_nothing_more(service, client):
    # Answered at its Exit, before the late chunk: the answer stands, the VM goes.
    metrics = service.metrics
    violations_before = counter(metrics.violations, kind="output_after_exit")
    destroyed_before = counter(metrics.vms_destroyed, reason="protocol_violation")
    reply = client.run(["output_after_exit"], timeout_s=20, wait_s=60)
    assert (reply.error_code, reply.stdout, reply.exit_code) == ("", b"ok\n", 0), reply
    wait_until(lambda: counter(metrics.vms_destroyed, reason="protocol_violation") == destroyed_before + 1,
               10, "the pool to count the destroyed VM")
    assert counter(metrics.violations, kind="output_after_exit") == violations_before + 1
    no_stray_domains(service)
    wait_ready(service, timeout_s=180)
    assert counter(metrics.duplicate_answers) == 0


# What a task that got root could do to its VM; the hostile agent is root (PID 1).
@pytest.mark.parametrize("attack", ["panic", "poweroff", "reboot", "die"])
def test_vm_killed_from_inside_mid_task_answers_vm_lost_and_heals(service, client, attack):
    lost_before = counter(service.metrics.vms_destroyed, reason="vm_lost")
    started = time.monotonic()
    reply = client.run([attack], timeout_s=30, wait_s=60)
    answered = time.monotonic() - started
    assert reply.error_code == "vm_lost", reply
    wait_until(lambda: counter(service.metrics.vms_destroyed, reason="vm_lost") == lost_before + 1,
               10, "the pool to count the lost VM")
    no_stray_domains(service)
    wait_ready(service, timeout_s=180)
    healed = time.monotonic() - started
    print(f"FIGURE {attack}: answered vm_lost after {answered:.2f} s, pool full again after {healed:.1f} s")
    assert client.run(["ok"], timeout_s=10).stdout == b"ok\n"


def test_silent_guest_mid_task_is_killed_by_the_deadman_switch(service, client):
    kills_before = counter(service.metrics.deadman_kills)
    started = time.monotonic()
    reply = client.run(["silent"], timeout_s=2, wait_s=60)
    assert reply.error_code == "timeout", reply
    assert time.monotonic() - started <= 2 + service.cfg.tasks.deadman_grace_s + 2
    assert counter(service.metrics.deadman_kills) == kills_before + 1
    no_stray_domains(service)


# attack instead of the Hello -> violation kind (None: no violation, a lost VM or a timeout)
HELLO_ATTACKS = [
    ("bad_magic", "bad_magic"),
    # (A replayed Hello is not here: the host reads frame by frame, so the Hello is
    # taken, the VM counts as booted, and the replay is a violation of a ready VM.
    # test_channel_attack_mid_task... covers replay.)
    ("wrong_state", "unexpected_message"),  # HeartbeatAck before any Hello
    ("unknown_type", "unknown_message_type"),
    ("truncated_eof", "truncated_frame"),
    ("stall_frame", "stalled_frame"),  # 1 MiB declared instead of a Hello, 10 bytes sent
    ("die", None),  # PID 1 exits at boot: kernel panic, QEMU gone
    ("silent", None),  # never says Hello: the boot deadline ends it
]


@pytest.mark.parametrize("attack, kind", HELLO_ATTACKS)
def test_boot_stage_attack_is_a_failed_boot_and_the_pool_backs_off_then_heals(service, client, attack, kind):
    metrics = service.metrics
    hv = service.hypervisor
    failed_before = counter(metrics.vms_destroyed, reason="boot_failed")
    violations_before = counter(metrics.violations, kind=kind) if kind else 0
    hv.faults.extra_cmdline = f"corral.hostile={attack}"
    try:
        # One VM goes; its replacement boots with the attack.
        assert client.run(["die"], timeout_s=30, wait_s=60).error_code == "vm_lost"
        wait_until(lambda: counter(metrics.vms_destroyed, reason="boot_failed") > failed_before,
                   service.cfg.vm.boot_timeout_s + 60, f"a boot failed by {attack}")
        # The failed boot is backed off (>= 1 s), not retried in a tight loop.
        assert service.directory.get("pool").proxy().state.get(timeout=5).boot_failures >= 1
    finally:
        hv.faults.extra_cmdline = ""
    if kind:
        assert counter(metrics.violations, kind=kind) >= violations_before + 1
    # Meanwhile the other VM still serves.
    assert client.run(["ok"], timeout_s=10, wait_s=60).stdout == b"ok\n"
    wait_ready(service, timeout_s=180)
    no_stray_domains(service)
    assert counter(metrics.duplicate_answers) == 0


# --- a session's VM: several execs at once, each message naming one --------------------------

# attack of a session's third exec (the first answered, the second held running) -> violation kind
SESSION_ATTACKS = [
    ("exit_answered", "wrong_exec"),  # the first exec's Exit again
    ("output_answered", "output_after_exit"),  # more output of the first exec
    ("error_answered", "wrong_exec"),  # a refusal of the first exec
    ("output_other_exec", "wrong_exec"),  # output of an exec never started
]


@pytest.mark.parametrize("attack, kind", SESSION_ATTACKS)
def test_a_session_guest_naming_an_exec_that_does_not_run_ends_the_session(service, attack, kind):
    wait_ready(service, timeout_s=180)
    metrics = service.metrics
    violations_before = counter(metrics.violations, kind=kind)
    with standing_in(service) as board:
        session = Session(service, board)
        assert session.run([b"ok"], timeout_s=30).stdout == b"ok\n"
        held = session.exec([b"hold"])
        attacking = session.exec([attack.encode()])
        for ticket in (held, attacking):
            reply = session.answer(ticket, timeout_s=30)
            assert reply.error_code == "session_lost" and kind in reply.error_message, reply
        assert session.ended() == SessionEnded(session.session_id, "protocol_violation")
        wait_until(lambda: session.vm_id not in pool_vms(service), 15, "the session's VM out of the pool")
        assert not service.hypervisor.domain_exists(session.vm_id)
        assert session.execs_done() == 1
    assert counter(metrics.violations, kind=kind) == violations_before + 1
    no_stray_domains(service)
    assert counter(metrics.duplicate_answers) == 0
