"""Where actors find each other: a name -> ActorRef table that the Root updates
when it restarts an actor, so senders always reach the current incarnation."""

from __future__ import annotations

import logging
import threading

import pykka

log = logging.getLogger("corral.actors")


def send(ref, message) -> bool:
    """Tell `message` to `ref`; a dead or missing actor is not an error for the
    sender (whoever supervises it answers for its work). True if delivered."""
    if ref is None:
        log.debug("no actor for %s", type(message).__name__)
        return False
    try:
        ref.tell(message)
        return True
    except pykka.ActorDeadError:
        log.debug("%s dropped: actor %s is dead", type(message).__name__, ref)
        return False


class Directory:
    def __init__(self) -> None:
        self._refs: dict[str, object] = {}
        self._lock = threading.Lock()

    def __setitem__(self, name: str, ref) -> None:
        with self._lock:
            self._refs[name] = ref

    def get(self, name: str):
        with self._lock:
            return self._refs.get(name)

    def tell(self, name: str, message) -> bool:
        return send(self.get(name), message)

    def items(self) -> list[tuple[str, object]]:
        with self._lock:
            return list(self._refs.items())
