"""Shared fixtures. VM tests use the real libvirtd, the real gold image and the
real agent ISO that scripts/setup-host prepares; a missing piece fails them."""

import os
import time
from pathlib import Path

import pytest

import config
from actors.vm.guest_link import GuestLink
from actors.vm.host import Hypervisor

STATE_DIR = Path(os.environ.get("CORRAL_STATE_DIR", "/var/lib/corral"))
# Concurrent test runs (e.g. in several worktrees) each need their own instance,
# or one run's start-up reaping destroys the other's VMs.
TEST_INSTANCE = os.environ.get("CORRAL_TEST_INSTANCE", "test")


@pytest.fixture(scope="session")
def cfg() -> config.Config:
    # Its own instance: the tests' VMs and an operator's corrald never reap each other's.
    return config.load(overrides={"state_dir": str(STATE_DIR), "daemon": {"instance": TEST_INSTANCE}})


@pytest.fixture(scope="session")
def hypervisor(cfg):
    hv = Hypervisor.from_config(cfg)
    yield hv
    hv.close()


class BootedVm:
    def __init__(self, hypervisor, boot_timeout_s: float, **create_args):
        self.hypervisor = hypervisor
        self.handle = hypervisor.create(**create_args)
        self.link = GuestLink(self.handle.socket)
        deadline = time.monotonic() + boot_timeout_s
        try:
            self.link.connect(deadline)
            self.hello = self.link.wait_hello(deadline)
        except BaseException:
            self.destroy()
            raise

    def run(self, *argv: str | bytes, timeout_s: float = 30, **kwargs):
        args = [a.encode() if isinstance(a, str) else a for a in argv]
        return self.link.run(args, time.monotonic() + timeout_s, **kwargs)

    def destroy(self) -> None:
        self.link.close()
        self.hypervisor.destroy(self.handle)


@pytest.fixture(scope="module")
def booted_vm(hypervisor, cfg):
    """One real VM shared by a module's tests (a boot costs seconds under TCG)."""
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
    yield vm
    vm.destroy()
