"""The root of the host's own failures, and a refused request.

CorralError carries a machine-readable code for the caller's reply; the VM
layer's failures (actors/vm/errors.py) and others elsewhere derive from it.
Protocol violations by a guest are protocol.channel.errors.ProtocolError.
"""


class CorralError(Exception):
    code = "internal"


class Rejected(Exception):
    """A request that is not accepted: `code` and a message for the caller, and
    with refusals that pass (budget_exhausted) the milliseconds to wait."""

    def __init__(self, code: str, message: str, retry_after_ms: int = 0):
        super().__init__(message)
        self.code = code
        self.retry_after_ms = retry_after_ms
