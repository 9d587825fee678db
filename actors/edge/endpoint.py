"""Endpoints corrald binds: a live one belongs to another corrald and must
not be taken over (ZeroMQ's ipc bind would silently unlink its socket)."""

from __future__ import annotations

import socket
import threading
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


class SocketThread(threading.Thread):
    """A daemon thread that owns a zmq socket and sets it up first: start()
    returns once its target called ready(), and raises CorralError naming why
    if it called ready(error) instead (or never did within the wait)."""

    def __init__(self, target, name: str, failure: str):
        super().__init__(target=target, name=name, daemon=True)
        self.failure = failure  # what start() says before the error
        self._set_up = threading.Event()
        self._error: Exception | None = None

    def ready(self, error: Exception | None = None) -> None:
        self._error = error
        self._set_up.set()

    def start(self, wait_s: float = 10.0) -> None:
        super().start()
        self._set_up.wait(wait_s)
        if self._error is not None:
            raise CorralError(f"{self.failure}: {self._error}")
