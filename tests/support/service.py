"""corrald's supervision tree inside the test process, built the one way every
test builds it: service_config (a config isolated from any other corrald on
this host, with a test's overrides), then start_service, or running_service
to have its pool ready and have it stopped on the way out. Below: what tests
read from a running service, and how they poke it."""

import contextlib
import time
import urllib.request

import config
from actors.messages import InjectFault
from protocol.client import admin
from tests.support.host import STATE_DIR, TEST_INSTANCE
from tests.support.waiting import wait_until

POOL_SIZE = 2


def service_config(run_dir, instance: str = TEST_INSTANCE, **sections) -> config.Config:
    """Its sockets in `run_dir` (the control socket in run_dir/control/, the
    directory corrald makes 0700), its VMs named by `instance`, a pool of
    POOL_SIZE, metrics on any free port, faults allowed on the control socket.
    Each keyword is a config table whose keys it adds or changes:
    service_config(tmp_path, pool={"size": 1})."""
    overrides = {"state_dir": str(STATE_DIR),
                 "daemon": {"endpoint": f"ipc://{run_dir}/corrald.sock", "instance": instance},
                 "control": {"endpoint": f"ipc://{run_dir}/control/control.sock", "faults": True},
                 "pool": {"size": POOL_SIZE}, "metrics": {"port": 0}}
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    return config.load(overrides=overrides)


def start_service(cfg: config.Config, hypervisor=None):
    """The service started (its pool still booting). hypervisor None: its own,
    for the config's instance."""
    from actors.service import Corral

    svc = Corral(cfg, hypervisor)
    svc.start()
    return svc


@contextlib.contextmanager
def running_service(cfg: config.Config, hypervisor=None, timeout_s: float = 120):
    """The service with its pool ready, stopped on the way out."""
    svc = start_service(cfg, hypervisor)
    try:
        wait_ready(svc, timeout_s=timeout_s)
        yield svc
    finally:
        svc.stop()


def pool_vms(service) -> dict:
    """vm_id -> state, read from the PoolManager (from the test thread, not an actor)."""
    state = service.directory.get("pool").proxy().state.get(timeout=5)
    return {vm_id: vm.state for vm_id, vm in list(state.vms.items())}


def wait_ready(svc, count: int | None = None, timeout_s: float = 120):
    """Until `count` VMs (default: the configured pool size) are ready."""
    count = svc.cfg.pool.size if count is None else count
    return wait_until(lambda: list(pool_vms(svc).values()).count("ready") == count, timeout_s,
                      f"{count} ready VMs")


def busy_vm(service, timeout_s: float = 30) -> str:
    return wait_until(lambda: next((v for v, s in pool_vms(service).items() if s == "busy"), None),
                      timeout_s, "a busy VM")


def kill_qemu_when_busy(service) -> str:
    """Kill the QEMU of the VM that takes the next task, once it runs it."""
    vm = busy_vm(service)
    time.sleep(0.5)
    service.directory.get("pool").tell(InjectFault("kill_qemu", vm))
    return vm


def counter(metric, **labels) -> float:
    return metric.labels(**labels)._value.get() if labels else metric._value.get()


def scrape(service) -> dict[str, float]:
    """Every sample of the service's /metrics: series -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read()
    samples = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def operator(svc, *command: str) -> admin.AdminReply:
    """An operator's command on the service's control socket: operator(svc, "pool-size", "1")."""
    return admin.request(svc.cfg.control.endpoint, command[0], list(command[1:]))
