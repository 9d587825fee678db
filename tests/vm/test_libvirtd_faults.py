"""libvirtd misbehaving under a running corrald.

Hung (SIGSTOPped): a warm pool keeps serving, since a default task's acquire
and release go through QEMU's monitor (vm.fast_resume), not libvirtd. Where a
libvirt call is on the path (here: resuming through libvirt), it has a
deadline: the VM whose call ran past it is given up, its task is requeued (its
command had not started) and runs once libvirtd is back; the daemon answers
its callers throughout.

Restarted mid-task: the task's channel is QEMU's socket, not libvirtd's, so
the command finishes and is answered; corrald reconnects on its next call,
and the domains are found again by name."""

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from protocol.client.api import Client
from tests.support.host import OTHER_INSTANCE, STATE_DIR
from tests.support.service import pool_vms, service_config, start_service, wait_ready
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]

CALL_TIMEOUT_S = 2.0


def libvirtd_pid() -> int:
    return int(subprocess.run(["pgrep", "-xo", "libvirtd"], capture_output=True, text=True,
                              check=True).stdout.split()[0])


@contextmanager
def one_vm_service(tmp_path, **vm):
    """A corrald with one ready VM, paused (past its settle time), and a client:
    (service, client, the VM, libvirtd's pid). libvirtd is let go again whatever
    happens."""
    cfg = service_config(tmp_path, OTHER_INSTANCE, pool={"size": 1},
                         vm={"libvirt_call_timeout_s": CALL_TIMEOUT_S, **vm})
    svc = start_service(cfg)
    pid = libvirtd_pid()
    try:
        wait_ready(svc, 1)
        vm = next(iter(pool_vms(svc)))
        wait_until(lambda: svc.hypervisor.domain_states().get(vm) == "paused", 10, "the VM paused")
        with Client(cfg.daemon.endpoint) as client:
            yield svc, client, vm, pid
    finally:
        os.kill(pid, signal.SIGCONT)
        svc.stop()


def test_a_warm_pool_serves_on_while_libvirtd_hangs(tmp_path):
    with one_vm_service(tmp_path) as (svc, client, vm, libvirtd):
        os.kill(libvirtd, signal.SIGSTOP)
        for n in range(3):  # each one resumes, runs, resets and pauses the same VM
            reply = client.run(["echo", f"task {n}"], wait_s=30)
            assert (reply.error_code, reply.stdout) == ("", f"task {n}\n".encode()), reply
            wait_until(lambda: pool_vms(svc).get(vm) == "ready", 10, "the VM back in the pool")
        os.kill(libvirtd, signal.SIGCONT)
        # libvirtd, back, catches up with QEMU's events: the pool's VM is paused.
        wait_until(lambda: svc.hypervisor.domain_states().get(vm) == "paused", 10, "libvirt sees it paused")


def test_hung_libvirtd_loses_no_task_and_heals(tmp_path):
    # Resuming through libvirt puts a libvirt call on every acquire.
    with one_vm_service(tmp_path, fast_resume=False) as (svc, client, hung_vm, libvirtd):
        os.kill(libvirtd, signal.SIGSTOP)
        task = client.submit(["echo", "after the hang"])
        # The resume hangs; past its deadline the Supervisor gives the VM up.
        wait_until(lambda: hung_vm not in pool_vms(svc), 4 * CALL_TIMEOUT_S + 2,
                   "the VM with the hung call given up")
        assert not task.done(), "the task's command never started: it waits, not fails"
        started = time.monotonic()
        client.status()  # corrald still answers while libvirtd is stopped
        assert time.monotonic() - started < 1
        os.kill(libvirtd, signal.SIGCONT)
        reply = task.result(timeout=120)
        assert (reply.error_code, reply.stdout) == ("", b"after the hang\n"), reply
        # The domain whose destroy timed out is reaped as a zombie once libvirtd answers.
        wait_until(lambda: not svc.hypervisor.domain_exists(hung_vm), 30, "the hung VM reaped")


def restart_libvirtd() -> None:
    pid = libvirtd_pid()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "libvirtd stopped")
    # As scripts/setup-host starts it: under the subreaper, so later tests' QEMUs are reaped at once.
    subprocess.run([str(REPO / "scripts" / "subreaper"), str(STATE_DIR / "libvirtd.log"), "libvirtd"], check=True)
    wait_until(lambda: subprocess.run(["virsh", "-q", "-c", "qemu:///system", "version"],
                                      capture_output=True).returncode == 0, 30, "libvirtd answering")


def test_libvirtd_restarted_mid_task_loses_nothing(tmp_path):
    cfg = service_config(tmp_path, OTHER_INSTANCE, pool={"size": 1})
    svc = start_service(cfg)
    try:
        wait_ready(svc, 1)
        with Client(cfg.daemon.endpoint) as client:
            task = client.submit(["sh", "-c", "sleep 3; echo through"])
            wait_until(lambda: "busy" in pool_vms(svc).values(), 30, "the task running")
            restart_libvirtd()
            reply = task.result(timeout=60)
            assert (reply.error_code, reply.stdout) == ("", b"through\n"), reply
            wait_ready(svc, 1)
            assert client.run(["echo", "after"]).stdout == b"after\n"
        # Whatever VM had to be given up while libvirtd was away is gone again.
        wait_until(lambda: len(svc.hypervisor.domain_states()) == 1, 30, "one domain, the pool's")
    finally:
        svc.stop()
