"""Can corrald be reached at an endpoint? Told at once, not after a timeout.

ZeroMQ never reports a failed connect to its caller: it retries in the
background while requests wait. So for an ipc endpoint the socket file is
probed with a plain connect() first, which tells "not running" (no socket,
or nobody listening on it) from "permission denied" at once. The `corral`
client and `corral admin` share this one check.
"""

from __future__ import annotations

import socket

NOT_RUNNING = "not_running"
PERMISSION_DENIED = "permission_denied"
UNREACHABLE = "unreachable"


class Unreachable(ConnectionError):
    """corrald cannot be reached at an endpoint; `code` says why: not_running,
    permission_denied or unreachable. Nothing was sent."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def probe(endpoint: str) -> None:
    """Unreachable naming why, if `endpoint` is an ipc socket nobody can be
    reached at from this process; other transports are not probed here."""
    path = ipc_path(endpoint)
    if path is None:
        return
    probe_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe_socket.connect(path)
    except FileNotFoundError:
        raise Unreachable(NOT_RUNNING, f"corrald is not running (no socket at {path})") from None
    except ConnectionRefusedError:
        raise Unreachable(NOT_RUNNING, f"corrald is not running (nothing listens on {path})") from None
    except PermissionError:
        raise Unreachable(PERMISSION_DENIED, f"permission denied on {path}") from None
    except OSError as e:
        raise Unreachable(UNREACHABLE, f"cannot reach {path}: {e.strerror}") from None
    finally:
        probe_socket.close()


def refused(endpoint: str) -> Unreachable:
    """What a refused connection attempt means on a transport not probed here (tcp)."""
    return Unreachable(NOT_RUNNING, f"corrald is not running at {endpoint} (connection refused)")
