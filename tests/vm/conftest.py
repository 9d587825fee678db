"""Fixtures of the real-VM tests: the real libvirtd, the real gold image and
the real agent ISO that scripts/setup-host prepares; a missing piece fails them."""

import pytest

import config
from actors.vm.host import Hypervisor
from protocol.client.api import Client
from tests.support.host import STATE_DIR, TEST_INSTANCE
from tests.support.service import running_service, service_config, wait_ready
from tests.support.vm import BootedVm


@pytest.fixture(scope="session")
def cfg() -> config.Config:
    # Its own instance: the tests' VMs and an operator's corrald never reap each other's.
    return config.load(overrides={"state_dir": str(STATE_DIR), "daemon": {"instance": TEST_INSTANCE}})


@pytest.fixture(scope="session")
def hypervisor(cfg):
    hv = Hypervisor.from_config(cfg)
    yield hv
    hv.close()


@pytest.fixture(scope="module")
def booted_vm(hypervisor, cfg):
    """One real VM shared by a module's tests (a boot costs seconds under TCG)."""
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
    yield vm
    vm.destroy()


@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory):
    """corrald's supervision tree on the session's hypervisor, its pool ready,
    shared by a module's tests. A module that needs another config defines its
    own `service` with tests.support.service."""
    with running_service(service_config(tmp_path_factory.mktemp("corrald")), hypervisor) as svc:
        yield svc


@pytest.fixture
def client(service):
    wait_ready(service)  # each test starts from a healed pool
    with Client(service.cfg.daemon.endpoint) as c:
        yield c


@pytest.fixture
def endpoint(service):
    """The module's `service`'s caller endpoint, for the real CLI."""
    wait_ready(service)  # each test starts from a healed pool
    return service.cfg.daemon.endpoint


@pytest.fixture
def clones(hypervisor):
    """Restored clones as (handle, link) pairs a test appends to, destroyed at its end."""
    made = []
    yield made
    for handle, link in made:
        link.close()
        hypervisor.destroy(handle)
