"""Hostile commands in a normal guest (real agent, real VMs) through the real
daemon: fork bomb, memory exhaustion, a full disk, a busy loop, and what an
unprivileged task cannot do (power off, panic, kill the agent). Each caller
gets a clear answer and the pool heals. (Output floods and sleeping forever:
tests/vm/test_service.py.)"""

import time

import pytest

import config
from actors.vm.host import Hypervisor
from tests.support.host import STATE_DIR, TEST_INSTANCE
from tests.support.service import counter, pool_vms, wait_ready
from tests.support.vm import BootedVm
from tests.support.waiting import wait_until

SH = "sh"


def healed(service, client) -> None:
    wait_ready(service, timeout_s=180)
    assert set(service.hypervisor.corral_domains()) <= set(pool_vms(service))
    assert client.run(["echo", "ok"], timeout_s=30).stdout == b"ok\n"


RUNAWAYS = {
    "fork bomb": ("b() { b | b & }; b; sleep 100", 5),
    "busy loop": ("while :; do :; done", 2),
}


@pytest.mark.parametrize("script, timeout_s", RUNAWAYS.values(), ids=RUNAWAYS.keys())
def test_runaway_command_is_answered_timeout_and_its_vm_replaced(service, client, script, timeout_s):
    destroyed = service.metrics.vms_destroyed
    destroyed_before = counter(destroyed, reason="timed_out") + counter(destroyed, reason="deadman")
    started = time.monotonic()
    reply = client.run([SH, "-c", script], timeout_s=timeout_s, wait_s=60)
    took = time.monotonic() - started
    # The agent kills the process group at the timeout or, if the guest is too
    # swamped to answer (a fork bomb can be), the dead-man's switch destroys the
    # VM 5 s later. Either way the VM is never reused.
    assert reply.error_code == "timeout", reply
    assert took <= timeout_s + service.cfg.tasks.deadman_grace_s + 2
    print(f"FIGURE {script!r}: answered timeout after {took:.2f} s (killed by the agent: {reply.timed_out})")
    wait_until(lambda: counter(destroyed, reason="timed_out") + counter(destroyed, reason="deadman")
               == destroyed_before + 1, 10, "the runaway's VM destroyed")
    healed(service, client)


def test_memory_exhaustion_kills_the_task_not_the_agent(service, client):
    hog = "a = []\nwhile True: a.append(bytearray(1 << 20))"
    reply = client.run(["python3", "-c", hog], capabilities=["dev:python"], timeout_s=60)
    assert reply.error_code == "", reply
    # The OOM killer (SIGKILL) or Python's MemoryError: either way the task, never PID 1.
    assert reply.signal == 9 or (reply.exit_code == 1 and b"MemoryError" in reply.stderr), reply
    print(f"FIGURE memory hog: signal {reply.signal}, exit {reply.exit_code}, max RSS {reply.max_rss_kib} KiB")
    healed(service, client)


def test_filling_the_disk_fills_guest_memory_only_and_the_host_overlay_stays_small(service, client):
    fill = "dd if=/dev/zero of=/tmp/fill bs=1M 2>&1; echo dd=$?; du -k /tmp/fill"
    reply = client.run([SH, "-c", fill], capabilities=["fs:write_tmp"], timeout_s=60)
    assert reply.error_code == "", reply
    assert b"No space left on device" in reply.stdout and b"dd=1" in reply.stdout, reply.stdout
    filled_kib = int(reply.stdout.split(b"dd=1\n")[1].split()[0])
    # Every write lands in the guest's tmpfs (the root disk is mounted read-only):
    # the host's qcow2 overlays of this instance do not grow.
    overlays = list(service.hypervisor.overlay_dir.glob(f"{service.hypervisor.prefix}*.qcow2"))
    assert overlays
    biggest = max(p.stat().st_blocks * 512 for p in overlays)
    assert biggest < 4 << 20, f"an overlay uses {biggest} bytes on the host"
    print(f"FIGURE disk fill: {filled_kib} KiB written in the guest before ENOSPC; "
          f"largest host overlay {biggest / 1024:.0f} KiB")
    # Reset wiped /tmp: the next task on any VM sees room again.
    assert client.run([SH, "-c", "dd if=/dev/zero of=/tmp/x bs=1M count=8 2>/dev/null; echo $?"],
                      capabilities=["fs:write_tmp"], timeout_s=30).stdout == b"0\n"
    healed(service, client)


# what an unprivileged task tries -> what it must get (never a lost VM)
PRIVILEGED = {
    "power off": (("python3", "-c", "import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
                   "print(libc.reboot(0x4321FEDC), os.strerror(ctypes.get_errno()))"),
                  lambda r: r.stdout == b"-1 Operation not permitted\n"),
    "kernel panic": ((SH, "-c", "echo c > /proc/sysrq-trigger"),
                     lambda r: r.exit_code != 0 and b"Permission denied" in r.stderr),
    "kill the agent": ((SH, "-c", "kill -KILL 1"),
                       lambda r: r.exit_code != 0 and b"not permitted" in r.stderr),
    # kill(-1) reaches every process the task user may signal: its own, not PID 1.
    "kill everything": ((SH, "-c", "sleep 100 & kill -KILL -1; wait; echo survived"),
                        lambda r: r.stdout == b"survived\n"),
    "remount root": ((SH, "-c", "mount -o remount,rw /"), lambda r: r.exit_code != 0),
}


@pytest.mark.parametrize("argv, refused", PRIVILEGED.values(), ids=PRIVILEGED.keys())
def test_an_unprivileged_task_cannot_stop_its_vm(service, client, argv, refused):
    vms_before = set(pool_vms(service))
    reply = client.run(list(argv), capabilities=["dev:python"] if argv[0] == "python3" else [],
                       timeout_s=20)
    assert reply.error_code == "" and refused(reply), reply
    # The VM was not lost: it went back to the pool.
    time.sleep(0.5)
    assert set(pool_vms(service)) == vms_before
    assert client.run(["echo", "ok"], timeout_s=30).stdout == b"ok\n"


def test_root_panic_mid_exec_is_a_lost_channel_and_a_gone_domain(cfg):
    """The test-only as_root Exec on a real agent: a kernel panic reboots the
    guest, the domain's on_reboot=destroy ends QEMU, the host sees EOF.
    (Through the daemon, with a task waiting: tests/vm/test_hostile_guest.py.)"""
    from actors.vm.errors import ChannelClosed

    # Its own instance: the service of this module would reap a VM it does not own.
    own = Hypervisor.from_config(config.load(overrides={
        "state_dir": str(STATE_DIR), "daemon": {"instance": f"{TEST_INSTANCE}p"[:16]}}))
    vm = BootedVm(own, cfg.vm.boot_timeout_s)
    hypervisor = own
    try:
        started = time.monotonic()
        with pytest.raises(ChannelClosed):
            vm.run(SH, "-c", "echo c > /proc/sysrq-trigger", as_root=True, timeout_s=30)
        wait_until(lambda: not hypervisor.domain_exists(vm.handle.name), 10, "the domain gone")
        print(f"FIGURE root panic: channel closed and domain gone after {time.monotonic() - started:.2f} s")
    finally:
        vm.destroy()
        own.close()


def test_invalid_utf8_in_argv_and_env_reaches_the_command_unchanged(service, client):
    """argv and env are bytes end to end: nothing on the way decodes them."""
    reply = client.run([SH, "-c", b'printf "%s|%s" "$1" "$X"', b"sh", b"\xff\xfe\x80"],
                       env={b"X": b"\xc3\x28\xf5"}, timeout_s=30)
    assert (reply.error_code, reply.stdout) == ("", b"\xff\xfe\x80|\xc3\x28\xf5"), reply
