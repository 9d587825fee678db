"""Endpoints corrald binds: a live one belongs to another corrald and must
not be taken over (ZeroMQ's ipc bind would silently unlink its socket)."""

from __future__ import annotations

import socket
from pathlib import Path

from actors.errors import CorralError


def check_endpoint_free(endpoint: str, key: str = "daemon.endpoint") -> None:
    """An ipc endpoint whose socket answers belongs to a running corrald; a
    socket file nobody answers on is stale and removed."""
    if not endpoint.startswith("ipc://"):
        return
    path = Path(endpoint[len("ipc://"):])
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise CorralError(f"endpoint {endpoint} is not usable ({e.strerror}); "
                          f"set {key} to another path") from None
    finally:
        probe.close()
    raise CorralError(f"endpoint {endpoint} is in use by another corrald; stop it "
                      f"or set {key} to another path")
