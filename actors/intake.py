"""Intake: the actor every answer is told to (Answer), on its way to the
caller, and a streaming task's TaskStarted and OutputChunks before it.

The ROUTER socket where callers submit tasks, and the ledger that makes every
accepted task answered exactly once, live in a thread of their own, the
IntakeServer (actors/edge/intake_server.py): zmq sockets are never shared
between threads. This actor hands each answer, TaskStarted and OutputChunk to
that thread, through one queue in the order they came (a task's reply never
overtakes its output: the Supervisor tells them to this one inbox). It holds
nothing else, so when it crashes the Root restarts it around the same server:
the ledger and the socket are never lost, and answers still in its inbox are
posted as it fails. An Answer that cannot reach it (dead, restarting) is posted
straight to the server by Directory.answer.
"""

from __future__ import annotations

import logging

import pykka

from actors.directory import Directory, drain_inbox
from actors.edge.intake_server import IntakeServer
from actors.messages import Answer, ChildFailed, InjectFault, OutputChunk, TaskStarted

log = logging.getLogger("corral.intake")


class Intake(pykka.ThreadingActor):
    """The address every answer is told to; it hands each to the server thread."""

    def __init__(self, server: IntakeServer, directory: Directory):
        super().__init__()
        self.server = server
        self.directory = directory

    def on_receive(self, message) -> None:
        if isinstance(message, (Answer, OutputChunk, TaskStarted)):
            self.server.forward(message)
        elif isinstance(message, InjectFault) and message.kind == "crash":
            raise RuntimeError("injected fault: intake crash")
        else:
            log.warning("intake ignores %r", message)

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # Answers (and the output before them) already in the inbox must not die with this actor.
        for message in drain_inbox(self):
            if isinstance(message, (Answer, OutputChunk, TaskStarted)):
                self.server.forward(message)
        self.directory.tell("root", ChildFailed("intake", repr(exception_value)))
