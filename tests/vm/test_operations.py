"""Operations end to end: the control socket, SCRAM and safe mode (across a
restart too), pool size, drain, /metrics through promtool, SIGTERM and
SIGKILL of a real corrald. Real daemon, real VMs, real sockets."""

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import config
from protocol.client import admin
from protocol.client.api import Client
from tests.support.corrald import corrald, daemon_ready, status_once_up, write_site_config
from tests.support.host import NOBODY, OTHER_INSTANCE, STATE_DIR, TEST_INSTANCE, as_user
from tests.support.service import (POOL_SIZE, operator, pool_vms, running_service, scrape, service_config,
                                   start_service, wait_ready)
from tests.support.waiting import wait_until


def fields(reply) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in reply.fields}


@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory):
    with running_service(service_config(tmp_path_factory.mktemp("ops")), hypervisor) as svc:
        yield svc


@pytest.fixture
def client(service):
    if service.mode.name != "serving":
        operator(service, "resume")
    wait_ready(service)
    with Client(service.cfg.daemon.endpoint) as c:
        yield c


# --- the control socket --------------------------------------------------------

def test_control_socket_is_for_corralds_user_only(service):
    path = Path(service.cfg.control.endpoint[len("ipc://"):])
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Another local user: the kernel refuses the connection, and the CLI's probe says why.
    assert "permission denied" in as_user(NOBODY, admin.probe, service.cfg.control.endpoint)
    # Its callers' socket is not the control socket: an admin request there gets nothing.
    with pytest.raises(admin.AdminError):
        admin.request(service.cfg.daemon.endpoint, "status", [], timeout_s=1)


def test_admin_status_and_clear_errors(service, client):
    done = subprocess.run([sys.executable, "-m", "protocol.client", "admin", "--control",
                           service.cfg.control.endpoint, "status"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("corrald is serving")
    assert "queue_normal" in done.stdout and "ready" in done.stdout
    for command, code in ((["launch"], "unknown_command"), (["pool-size", "many"], "invalid_argument"),
                          (["pool-size"], "invalid_argument"), (["fault", "melt", "x"], "invalid_argument"),
                          (["fault", "kill_qemu", "corral-nope-000000000000"], "invalid_argument")):
        reply = operator(service, *command)
        assert (reply.ok, reply.error_code) == (False, code), command


def test_faults_are_refused_unless_enabled(tmp_path):
    svc = start_service(service_config(tmp_path, OTHER_INSTANCE, pool={"size": 0}, control={"faults": False}))
    try:
        reply = operator(svc, "fault", "crash", "scheduler")
        assert (reply.ok, reply.error_code) == (False, "faults_disabled")
    finally:
        svc.stop()


def test_fault_through_the_control_plane_heals(service, client):
    vm = next(iter(pool_vms(service)))
    reply = operator(service, "fault", "kill_qemu", vm)
    assert reply.ok, reply.message
    wait_until(lambda: vm not in pool_vms(service), 30, "the killed VM gone")
    wait_ready(service)
    assert client.run(["echo", "healed"]).stdout == b"healed\n"


# --- SCRAM ---------------------------------------------------------------------

def test_scram_pauses_flushes_refuses_and_resume_restores(service, client):
    running = [client.submit(["sh", "-c", "sleep 4; echo survived"], timeout_s=60) for _ in range(POOL_SIZE)]
    wait_until(lambda: list(pool_vms(service).values()).count("busy") == POOL_SIZE, 30, "pool busy")
    time.sleep(0.5)  # the commands are running in the guests
    queued = [client.submit(["echo", "never"], priority=p) for p in ("critical", "normal", "low")]
    wait_until(lambda: sum(int(v) for _, v in client.status().queue_depth) == 3, 10, "3 queued")

    reply = operator(service, "scram", "drill")
    assert reply.ok, reply.message
    assert float(fields(reply)["paused_in_ms"]) < 10_000
    for future in queued:
        assert future.result(timeout=10).error_code == "cancelled_scram"
    states = service.hypervisor.domain_states()
    assert len(states) == POOL_SIZE and set(states.values()) == {"paused"}
    refused = client.run(["echo", "refused"])
    assert refused.error_code == "safe_mode" and "SCRAM" in refused.error_message
    assert fields(operator(service, "status"))["mode"] == "safe_mode"
    assert scrape(service)["corral_safe_mode"] == 1
    time.sleep(5)  # longer than the commands had left: they are frozen, not running
    assert not any(f.done() for f in running)
    assert set(service.hypervisor.domain_states().values()) == {"paused"}

    assert operator(service, "resume").ok
    for future in running:
        reply = future.result(timeout=60)
        assert (reply.error_code, reply.exit_code, reply.stdout) == ("", 0, b"survived\n")
    assert client.run(["echo", "back"]).stdout == b"back\n"
    assert scrape(service)["corral_safe_mode"] == 0


def test_a_released_vm_is_offered_settling_then_paused(tmp_path, monkeypatch):
    """pool.settle_ms: after its reset a VM is offered while it runs on; a task
    that comes then takes it without a resume; otherwise it is paused when the
    settle time is up. A SCRAM while it settles pauses it, and resume carries on."""
    from actors.vm.qmp import QmpMonitor

    resumes = []
    real_resume = QmpMonitor.resume
    monkeypatch.setattr(QmpMonitor, "resume", lambda monitor: resumes.append(1) or real_resume(monitor))
    # Settle long enough that a loaded host's slow checks still see it settling.
    cfg = service_config(tmp_path, OTHER_INSTANCE, pool={"size": 1, "settle_ms": 3000})
    svc = start_service(cfg)

    def vm_is(pool_state, domain_state):
        return pool_vms(svc)[vm] == pool_state and svc.hypervisor.domain_states()[vm] == domain_state

    try:
        wait_ready(svc, 1)
        (vm,) = pool_vms(svc)
        wait_until(lambda: vm_is("ready", "paused"), 5, "paused after its boot's settle")
        with Client(cfg.daemon.endpoint) as client:
            assert client.run(["echo", "one"]).stdout == b"one\n"
            wait_until(lambda: vm_is("ready", "running"), 1, "offered, settling")
            time.sleep(0.5)
            assert vm_is("ready", "running")
            resumed_before = len(resumes)
            assert client.run(["echo", "two"]).stdout == b"two\n"
            assert len(resumes) == resumed_before, "a settling VM is taken running, not resumed"
            wait_until(lambda: vm_is("ready", "paused"), 8, "paused once settled")

            assert client.run(["echo", "three"]).stdout == b"three\n"
            assert len(resumes) == resumed_before + 1, "a paused VM is resumed"
            wait_until(lambda: vm_is("ready", "running"), 1, "settling again")
            assert operator(svc, "scram", "drill").ok  # answers once every VM is paused
            assert svc.hypervisor.domain_states()[vm] == "paused"
            time.sleep(3.5)  # past the settle time: frozen, its clock stopped
            assert svc.hypervisor.domain_states()[vm] == "paused"
            assert operator(svc, "resume").ok
            wait_until(lambda: vm_is("ready", "running"), 2, "settling on after the resume")
            wait_until(lambda: vm_is("ready", "paused"), 8, "then paused")
            assert client.run(["echo", "four"]).stdout == b"four\n"
    finally:
        svc.stop()


def test_safe_mode_survives_a_restart_until_resumed(tmp_path):
    cfg = service_config(tmp_path, OTHER_INSTANCE, pool={"size": 1})
    svc = start_service(cfg)
    try:
        wait_ready(svc, 1)
        assert operator(svc, "scram", "before restart").ok
    finally:
        svc.stop()
    svc = start_service(cfg)
    hypervisor = svc.hypervisor
    try:
        assert not hypervisor.domain_states()
        assert svc.mode.name == "safe_mode" and svc.mode.reason == "before restart"
        with Client(cfg.daemon.endpoint) as c:
            assert c.run(["echo", "x"]).error_code == "safe_mode"
        time.sleep(2)
        assert not hypervisor.domain_states(), "no VM boots in safe mode"
        assert operator(svc, "resume").ok
        wait_ready(svc, 1)
        with Client(cfg.daemon.endpoint) as c:
            assert c.run(["echo", "serving"]).stdout == b"serving\n"
    finally:
        svc.stop()
    # Resumed means resumed: the next start serves at once.
    svc = start_service(cfg)
    try:
        assert svc.mode.name == "serving"
    finally:
        svc.stop()


# --- pool size, drain ------------------------------------------------------------

def test_pool_size_shrinks_and_grows(service, client):
    assert operator(service, "pool-size", "1").ok
    wait_until(lambda: len(pool_vms(service)) == 1, 30, "one VM left")
    assert client.run(["echo", "one"]).stdout == b"one\n"
    assert operator(service, "pool-size", str(POOL_SIZE)).ok
    wait_ready(service)


def test_drain_finishes_tasks_and_refuses_new_ones(service, client):
    running = client.submit(["sh", "-c", "sleep 1; echo finished"])
    wait_until(lambda: "busy" in pool_vms(service).values(), 30, "a busy VM")
    assert operator(service, "drain").ok
    assert client.run(["echo", "late"]).error_code == "draining"
    assert running.result(timeout=60).stdout == b"finished\n"
    assert operator(service, "resume").ok
    assert client.run(["echo", "again"]).stdout == b"again\n"


# --- metrics ---------------------------------------------------------------------

def promtool() -> str:
    found = shutil.which("promtool") or str(STATE_DIR / "tools" / "promtool")
    assert os.access(found, os.X_OK), "promtool missing: scripts/setup-host unpacks it"
    return found


def test_metrics_pass_promtool_and_track_vms(service, client):
    assert client.run(["echo", "x"]).exit_code == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read()
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    samples = scrape(service)
    vm_series = {name for name in samples if name.startswith("corral_vm_state{")}
    assert len(vm_series) == POOL_SIZE
    gone = next(iter(pool_vms(service)))
    assert operator(service, "fault", "kill_qemu", gone).ok
    wait_until(lambda: gone not in pool_vms(service), 30, "the VM gone")
    assert not any(gone in name for name in scrape(service)), "a gone VM's series must go"
    wait_ready(service)


# --- a real corrald process: SIGTERM and SIGKILL -----------------------------------

def test_sigkill_then_restart_reaps_and_refills(hypervisor, tmp_path):
    instance = (TEST_INSTANCE + "k")[:16]
    site = write_site_config(tmp_path, instance)
    cfg = config.load(site)
    overlays = STATE_DIR / "vms"
    first = corrald(site)
    watcher = None
    try:
        daemon_ready(cfg.daemon.endpoint)
        prefix = f"corral-{instance}-"
        before = [d for d in hypervisor.conn.listAllDomains() if d.name().startswith(prefix)]
        assert len(before) == 1
        old = before[0].name()
        watcher = Client(cfg.daemon.endpoint)
        lost = watcher.submit(["sleep", "60"])
        wait_until(lambda: dict(watcher.status().pool).get(b"busy") == b"1", 30, "the task running")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert hypervisor.domain_exists(old), "libvirt keeps the domain of a killed corrald"
        assert list(overlays.glob(old + "*"))
        # A caller whose task was in flight learns that it is lost, at once.
        assert lost.result(timeout=10).error_code == "connection_lost"

        second = corrald(site)
        try:
            daemon_ready(cfg.daemon.endpoint)
            assert not hypervisor.domain_exists(old)
            assert not list(overlays.glob(old + "*")) and not list((STATE_DIR / "run").glob(old + "*"))
            now = [d.name() for d in hypervisor.conn.listAllDomains() if d.name().startswith(prefix)]
            assert len(now) == 1 and now[0] != old
            with Client(cfg.daemon.endpoint) as c:
                in_flight = c.submit(["sh", "-c", "sleep 1; echo done"])
                time.sleep(0.3)
                second.send_signal(signal.SIGTERM)  # the grace period lets it finish
                assert in_flight.result(timeout=60).stdout == b"done\n"
            assert second.wait(60) == 0, second.stderr.read().decode()
            assert not [d for d in hypervisor.conn.listAllDomains() if d.name().startswith(prefix)]
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
        if watcher is not None:
            watcher.close()


def admin_cli(control_endpoint: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protocol.client", "admin", "--control", control_endpoint,
                           *command], capture_output=True, text=True, timeout=60)


def test_real_corrald_restarted_after_scram_stays_in_safe_mode(tmp_path):
    site = write_site_config(tmp_path, (TEST_INSTANCE + "s")[:16])
    cfg = config.load(site)
    first = corrald(site)
    try:
        daemon_ready(cfg.daemon.endpoint)
        assert admin_cli(cfg.control.endpoint, "scram", "drill").returncode == 0
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    finally:
        if first.poll() is None:
            first.kill()
    second = corrald(site)
    try:
        with Client(cfg.daemon.endpoint) as c:
            wait_until(lambda: status_once_up(c), 30, "corrald answering")
            assert c.run(["echo", "x"]).error_code == "safe_mode"
        status = admin_cli(cfg.control.endpoint, "status")
        assert "corrald is safe_mode" in status.stdout and "drill" in status.stdout
        assert admin_cli(cfg.control.endpoint, "resume").returncode == 0
        daemon_ready(cfg.daemon.endpoint)
        with Client(cfg.daemon.endpoint) as c:
            assert c.run(["echo", "resumed"]).stdout == b"resumed\n"
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
    finally:
        if second.poll() is None:
            second.kill()


# --- host memory pressure ----------------------------------------------------------

def test_memory_pressure_sheds_idle_vms_and_the_pool_regrows(tmp_path):
    from actors.watchdog import available_mib

    margin_mib = 2000
    floor = available_mib() - margin_mib  # pressure comes when we take 2 x margin below
    cfg = service_config(tmp_path, OTHER_INSTANCE, watchdog={"interval_s": 0.5, "min_available_mib": floor})
    svc = start_service(cfg)
    try:
        wait_ready(svc)
        destroyed = svc.metrics.vms_destroyed.labels("retired_memory")
        hog = subprocess.Popen([sys.executable, "-c", f"import sys, time; hog = b'x' * ({2 * margin_mib} << 20); "
                                "print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE)
        try:
            assert hog.stdout.readline() == b"held\n"
            wait_until(lambda: not pool_vms(svc), 30, "every idle VM shed under memory pressure")
            assert destroyed._value.get() >= POOL_SIZE
        finally:
            hog.kill()
            hog.wait()
        wait_ready(svc, POOL_SIZE, timeout_s=180)  # memory is back: the pool regrows
    finally:
        svc.stop()
