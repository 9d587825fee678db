"""Where actors find each other: a name -> ActorRef table that the Root updates
when it restarts an actor, so senders always reach the current incarnation."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import pykka

from protocol.wire.tasks import TaskReply

log = logging.getLogger("corral.actors")


def send(ref: pykka.ActorRef | None, message) -> bool:
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


def drain_inbox(actor: pykka.Actor) -> list:
    """Messages still queued for an actor that is failing or stopping: pykka
    would drop them; its on_failure/on_stop hands them on instead."""
    drained = []
    while True:
        try:
            envelope = actor.actor_inbox.get_nowait()
        except queue.Empty:
            return drained
        drained.append(getattr(envelope, "message", envelope))


class Directory:
    def __init__(self) -> None:
        self._refs: dict[str, pykka.ActorRef] = {}
        self._lock = threading.Lock()
        # Set by the service: IntakeServer.post(ticket, reply).
        self.answer_fallback: Callable[[int, TaskReply], None] | None = None

    def __setitem__(self, name: str, ref: pykka.ActorRef) -> None:
        with self._lock:
            self._refs[name] = ref

    def get(self, name: str) -> pykka.ActorRef | None:
        with self._lock:
            return self._refs.get(name)

    def tell(self, name: str, message) -> bool:
        return send(self.get(name), message)

    def answer(self, ticket: int, reply: TaskReply) -> None:
        """Answer a task through the Intake actor, or straight to its server
        thread while the actor is dead or restarting: an answer is never lost."""
        from actors.messages import Answer

        if not self.tell("intake", Answer(ticket, reply)) and self.answer_fallback is not None:
            self.answer_fallback(ticket, reply)
