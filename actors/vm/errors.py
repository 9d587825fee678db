"""The VM layer's failures, each a CorralError with the code a caller's reply carries.

HypervisorError is the root of everything libvirt or QEMU's monitor does
wrong; its subclasses say which kind, for callers that care (most catch the
root, or CorralError, and give the VM up):

    HypervisorError         libvirt or QEMU refused or failed ("hypervisor")
      NoSuchDomain          libvirt has no domain of that name (VIR_ERR_NO_DOMAIN)
      LibvirtDeadline       a libvirt call ran past vm.libvirt_call_timeout_s
      QmpError              QEMU's monitor answered a command with an error
      QmpTimeout            QEMU's monitor did not answer in time
      TemplateBuildFailed   a snapshot template could not be booted, saved or checked
      RestoreFailed         a clone could not be restored from a snapshot template
        TemplateGone        ...because its template was removed or rebuilt first
    GuestTimeout            the guest did not answer in time ("guest_timeout")
    ChannelClosed           the guest's channel closed: the VM is gone ("vm_lost")

A guest that breaks the channel protocol raises protocol.channel.errors.ProtocolError
instead: that is the guest's fault, these are the host's troubles.
"""

from __future__ import annotations

from actors.errors import CorralError


class HypervisorError(CorralError):
    """libvirt refused or failed; the message names the fix where one is known."""

    code = "hypervisor"


class NoSuchDomain(HypervisorError):
    """libvirt knows no domain of that name (destroyed, crashed, never made)."""


class LibvirtDeadline(HypervisorError):
    """A libvirt call did not return within its deadline (libvirtd or QEMU's
    monitor hung); the call itself may still finish later on its worker.
    `started`: False where it never left the queue (every call worker was busy):
    then it never runs, and it says nothing of what it was given."""

    def __init__(self, message: str, started: bool = True):
        super().__init__(message)
        self.started = started


class QmpError(HypervisorError):
    """QEMU's monitor refused a command; `error_class` is QEMU's class of the
    error (GenericError, CommandNotFound, ...), "" where QEMU gave none."""

    def __init__(self, message: str, error_class: str = ""):
        super().__init__(message)
        self.error_class = error_class


class QmpTimeout(HypervisorError):
    """QEMU's monitor did not answer a command before its deadline."""


class TemplateBuildFailed(HypervisorError):
    """A snapshot template (actors/vm/snapshots.py) could not be made: its VM did
    not boot or say Hello, libvirt could not save it, or the saved VM had written
    to its overlay. Nothing of it is left behind; the pool boots VMs instead."""


class SessionSaveFailed(HypervisorError):
    """A session's VM could not be saved into a snapshot (Hypervisor.save_session):
    libvirt could not save it, the image does not read back, or the VM had
    written to its overlay (a restore would not see those writes). Nothing of
    the snapshot is left behind; the domain may be gone or still run."""


class RestoreFailed(HypervisorError):
    """A clone could not be restored from a snapshot template. Nothing of the
    clone is left behind. `template_removed`: the template itself was at fault
    (its image no longer reads, or libvirt refused it) and was removed, so the
    next Hypervisor.template() is None and a new one gets built.
    `may_finish_late`: libvirt's restore ran past its deadline and may still
    create the clone's domain later, so its name must not be used again."""

    def __init__(self, message: str, template_removed: bool = False, may_finish_late: bool = False):
        super().__init__(message)
        self.template_removed = template_removed
        self.may_finish_late = may_finish_late


class TemplateGone(RestoreFailed):
    """The template was removed (found broken, swept as stale) or rebuilt before
    this clone's restore could use it. Nothing is wrong with the clone, the
    template or the host: the caller loads the template again, or boots.
    Nothing of the clone is left behind."""


class GuestTimeout(CorralError):
    """The guest did not answer before its deadline."""

    code = "guest_timeout"


class ChannelClosed(CorralError):
    """The guest's channel closed: the VM is gone (crashed, killed, powered off)."""

    code = "vm_lost"
