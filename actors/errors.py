"""Host-side failures, each with a machine-readable code for the caller's reply.

Protocol violations by a guest are protocol.channel.errors.ProtocolError; these are the
host's own troubles with the hypervisor and with a guest that stops answering.
"""


class CorralError(Exception):
    code = "internal"


class HypervisorError(CorralError):
    """libvirt refused or failed; the message names the fix where one is known."""

    code = "hypervisor"


class GuestTimeout(CorralError):
    """The guest did not answer before its deadline."""

    code = "guest_timeout"


class ChannelClosed(CorralError):
    """The guest's channel closed: the VM is gone (crashed, killed, powered off)."""

    code = "vm_lost"


class Rejected(Exception):
    """A request that is not accepted: `code` and a message for the caller, and
    with refusals that pass (budget_exhausted) the milliseconds to wait."""

    def __init__(self, code: str, message: str, retry_after_ms: int = 0):
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms
