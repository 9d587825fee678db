"""What a caller holds of one running VM: its handle (name, files, domain
spec) and the libvirt way of pausing and resuming it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from actors.vm.domain import DomainSpec

if TYPE_CHECKING:
    from actors.vm.host import Hypervisor


@dataclass(frozen=True)
class VmHandle:
    """One running VM and the files that are its alone."""

    name: str
    overlay: Path
    socket: Path
    console_log: Path | None
    spec: DomainSpec
    monitor: Path | None = None  # corral's QMP socket, until the Supervisor connects
    # A clone restored from a snapshot (Hypervisor.restore: a template or a
    # session's), not booted: its agent said Hello before the save and will not
    # again, and its next frame carries guest_first_seq (a booted VM's Hello carries 0)...
    restored: bool = False
    guest_first_seq: int = 0
    # ... and the sequence the host's first frame (its Resume) must carry: 0 after
    # a template's Hello, a session's count where its VM was saved between execs.
    host_first_seq: int = 0
    egress_socket: Path | None = None  # net:egress: the egress port's host end (actors/egress/)


@dataclass(frozen=True)
class LibvirtRunControl:
    """Pause and resume through libvirt: where a VM has no QMP socket of ours.
    (With one, the run control is its actors.vm.qmp.QmpMonitor, same methods.)"""

    hypervisor: Hypervisor
    name: str

    def pause(self) -> None:
        self.hypervisor.suspend(self.name)

    def resume(self) -> None:
        self.hypervisor.resume(self.name)

    def close(self) -> None:
        pass
