"""Faults from outside the guest, made on purpose: what tests and an operator's
`corral admin fault` (control.faults on) do to a VM through its Hypervisor.

A Hypervisor holds one FaultInjector at `.faults`; nothing in normal running
calls it. The actors reach it through InjectFault messages (the Supervisor's
kill_qemu and drop_libvirt); tests call it directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from actors.vm.errors import HypervisorError
from actors.vm.libvirt_calls import libvirt_errors, libvirt_module

if TYPE_CHECKING:
    from actors.vm.host import Hypervisor

QEMU_PID_DIR = Path("/run/libvirt/qemu")  # libvirtd's <domain>.pid files


class FaultInjector:
    def __init__(self, hypervisor: Hypervisor):
        self.hypervisor = hypervisor
        # Appended to every VM's kernel command line. Tests only (e.g. the hostile
        # agent's corral.hostile=<attack>); no config key reaches it.
        self.extra_cmdline = ""

    def kill_qemu(self, name: str) -> None:
        """SIGKILL the VM's QEMU process, as a crash would."""
        pid_file = QEMU_PID_DIR / f"{name}.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), 9)
        except (OSError, ValueError) as e:
            raise HypervisorError(f"cannot kill QEMU of {name}: {e}") from None

    def drop_libvirt(self) -> None:
        """Lose the libvirt connection; the Hypervisor's next call reconnects."""
        self.hypervisor.close()

    def throttle_vcpus(self, name: str, quota_us: int, period_us: int = 1_000_000) -> None:
        """The VM's vCPUs get `quota_us` of host CPU time per `period_us` (CPU
        bandwidth in the domain's cgroup): a guest made very slow."""
        hypervisor = self.hypervisor

        def throttle() -> None:
            with libvirt_errors(f"cannot throttle VM {name}"):
                hypervisor.domain(name).setSchedulerParametersFlags(
                    {"vcpu_period": period_us, "vcpu_quota": quota_us},
                    libvirt_module().VIR_DOMAIN_AFFECT_LIVE)

        hypervisor.calls.run("throttle_vcpus", throttle)
