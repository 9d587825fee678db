"""Intake: the ZeroMQ ROUTER where callers submit tasks, and the ledger that
makes every accepted task answered exactly once.

The ROUTER socket lives in a thread of its own (IntakeServer): zmq sockets
are never shared between threads. It decodes and validates each request,
refuses bad ones at once with a clear code, records accepted ones in the
ledger (ticket -> caller identity) and hands them to the Scheduler. Answers
come to the Intake actor from any other actor; it forwards them to the
server thread over an inproc socket, where the ledger entry is removed as the
reply goes out: a second answer for the same ticket finds no entry and is
dropped (and counted).

The server thread outlives a crash of the Intake actor: the Root restarts the
actor around the same server, so the ledger and the socket are never lost.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
import time
from dataclasses import dataclass, replace

import pykka
import zmq

from actors.directory import Directory
from actors.errors import CorralError
from actors.messages import Answer, ChildFailed, InjectFault, Submit, Task
from actors.metrics import Metrics
from protocol import messages
from protocol.errors import ProtocolError
from protocol.tasks import (CLIENT_TO_DAEMON, PROTOCOL_TAG, PRIORITY_NAMES, StatusReply,
                            StatusRequest, TaskReply, TaskRequest, error_reply)

log = logging.getLogger("corral.intake")
TICKET = struct.Struct("!Q")
STOP = b"stop"

KNOWN_CAPABILITIES = frozenset({
    "base:execute", "dev:compiler", "dev:python", "fs:write_tmp", "sys:ptrace",
    "net:egress", "res:high_cpu", "res:large_mem", "dev:gpu",
})


@dataclass(frozen=True)
class TaskLimits:
    default_timeout_ms: int
    max_timeout_ms: int
    default_output_cap: int
    max_output_cap: int
    max_request_bytes: int


class Rejected(Exception):
    """A request that is not accepted: `code` and a message for the caller."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _check_no_nul(what: str, value: bytes) -> None:
    if b"\0" in value:
        raise Rejected("invalid_request", f"{what} contains a NUL byte")


def validate(request: TaskRequest, limits: TaskLimits) -> TaskRequest:
    """The request with defaults filled in, or Rejected naming what is wrong."""
    if not request.task_id:
        raise Rejected("invalid_request", "task_id is empty")
    if not request.argv[0]:
        raise Rejected("invalid_request", "argv[0] is empty")
    for i, arg in enumerate(request.argv):
        _check_no_nul(f"argv[{i}]", arg)
    for key, value in request.env:
        if not key or b"=" in key:
            raise Rejected("invalid_request", f"env name {key!r} is empty or contains '='")
        _check_no_nul(f"env {key!r}", key + value)
    _check_no_nul("cwd", request.cwd)
    if request.cwd and not request.cwd.startswith(b"/"):
        raise Rejected("invalid_request", "cwd must be an absolute path")
    timeout_ms = request.timeout_ms or limits.default_timeout_ms
    if timeout_ms > limits.max_timeout_ms:
        raise Rejected("invalid_request",
                       f"timeout {timeout_ms / 1000:g} s is over the maximum of {limits.max_timeout_ms / 1000:g} s")
    output_cap = request.output_cap or limits.default_output_cap
    if output_cap > limits.max_output_cap:
        raise Rejected("invalid_request",
                       f"output cap {output_cap} is over the maximum of {limits.max_output_cap} bytes")
    seen = set()
    for raw in request.capabilities:
        name = raw.decode("ascii", errors="replace")
        if name not in KNOWN_CAPABILITIES:
            raise Rejected("unknown_capability", f"unknown capability {name!r} "
                           f"(known: {', '.join(sorted(KNOWN_CAPABILITIES))})")
        if name in seen:
            raise Rejected("duplicate_capability", f"capability {name!r} is asked for twice")
        seen.add(name)
    return replace(request, timeout_ms=timeout_ms, output_cap=output_cap)


class IntakeServer:
    """The thread that owns the ROUTER socket and the ledger."""

    def __init__(self, endpoint: str, limits: TaskLimits, metrics: Metrics, directory: Directory):
        self.endpoint = endpoint
        self.limits = limits
        self.metrics = metrics
        self.directory = directory
        self.context = zmq.Context.instance()
        self.answers_endpoint = f"inproc://intake-answers-{id(self)}"
        self.tickets = itertools.count(1)
        self.ledger: dict[int, tuple[bytes, str]] = {}  # ticket -> (identity, task_id)
        self.in_flight: set[tuple[bytes, str]] = set()
        self.accepting = True
        self.refusal = ("shutting_down", "corrald is shutting down")
        self._bound = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="intake-server", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._bound.wait(10)
        if self._error is not None:
            raise CorralError(f"cannot listen on {self.endpoint}: {self._error}")

    def stop(self) -> None:
        if self._thread.is_alive():
            pusher = self.context.socket(zmq.PUSH)
            pusher.connect(self.answers_endpoint)
            pusher.send_multipart([STOP])
            pusher.close(linger=1000)
            self._thread.join(5)

    def unanswered(self) -> int:
        return len(self.ledger)

    def _run(self) -> None:
        router = self.context.socket(zmq.ROUTER)
        answers = self.context.socket(zmq.PULL)
        try:
            router.setsockopt(zmq.LINGER, 1000)
            router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_request_bytes)
            router.bind(self.endpoint)
            answers.bind(self.answers_endpoint)
        except zmq.ZMQError as e:
            self._error = e
            router.close(0)
            answers.close(0)
            self._bound.set()
            return
        self._bound.set()
        log.info("listening on %s", self.endpoint)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(answers, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if answers in events:
                    frames = answers.recv_multipart()
                    if frames == [STOP]:
                        self._answer_the_rest(router, answers)
                        return
                    self._deliver(router, TICKET.unpack(frames[0])[0], frames[1])
                if router in events:
                    self._request(router, router.recv_multipart())
        finally:
            router.close()
            answers.close()

    def _answer_the_rest(self, router, answers) -> None:
        """At shutdown: deliver answers already sent, then answer what is left."""
        while True:
            try:
                frames = answers.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames != [STOP]:
                self._deliver(router, TICKET.unpack(frames[0])[0], frames[1])
        for ticket, (_, task_id) in list(self.ledger.items()):
            self.metrics.tasks.labels("cancelled").inc()
            self._deliver(router, ticket, messages.encode(
                error_reply(task_id, "cancelled", "corrald stopped before this task finished")))

    def _send(self, router, identity: bytes, reply) -> None:
        router.send_multipart([identity, b"", PROTOCOL_TAG, messages.encode(reply)])

    def _request(self, router, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 4 or frames[1] != b"" or frames[2] != PROTOCOL_TAG:
            self.metrics.rejected.labels("invalid_request").inc()
            return self._send(router, identity, error_reply(
                "", "invalid_request", f"expected [empty, {PROTOCOL_TAG.decode()}, payload] frames"))
        try:
            request = messages.decode(frames[3], CLIENT_TO_DAEMON)
        except ProtocolError as e:
            self.metrics.rejected.labels("invalid_request").inc()
            return self._send(router, identity, error_reply("", "invalid_request", f"undecodable request: {e}"))
        if isinstance(request, StatusRequest):
            return self._send(router, identity, self._status(request.request_id))
        try:
            if not self.accepting:
                raise Rejected(*self.refusal)
            if (identity, request.task_id) in self.in_flight:
                raise Rejected("duplicate_task", f"task {request.task_id!r} is already in flight")
            request = validate(request, self.limits)
        except Rejected as e:
            self.metrics.rejected.labels(e.code).inc()
            return self._send(router, identity, error_reply(request.task_id, e.code, str(e)))
        ticket = next(self.tickets)
        self.ledger[ticket] = (identity, request.task_id)
        self.in_flight.add((identity, request.task_id))
        self.metrics.accepted.inc()
        if not self.directory.tell("scheduler", Submit(Task(ticket, request, time.monotonic()))):
            self._deliver(router, ticket, messages.encode(error_reply(
                request.task_id, "unavailable", "the scheduler is restarting; retry")))

    def _deliver(self, router, ticket: int, payload: bytes) -> None:
        entry = self.ledger.pop(ticket, None)
        if entry is None:
            self.metrics.duplicate_answers.inc()
            log.error("second answer for ticket %d dropped", ticket)
            return
        self.in_flight.discard(entry)
        router.send_multipart([entry[0], b"", PROTOCOL_TAG, payload])

    def _status(self, request_id: str) -> StatusReply:
        depth = self.metrics.gauge_values(self.metrics.queue_depth)
        pool = self.metrics.gauge_values(self.metrics.pool_vms)
        return StatusReply(
            request_id=request_id,
            queue_depth=tuple((name.encode(), str(depth.get(name, 0)).encode()) for name in PRIORITY_NAMES),
            pool=tuple((state.encode(), str(count).encode()) for state, count in pool.items()),
            accepted=self.metrics.counter_total(self.metrics.accepted) & 0xFFFFFFFF,
            answered=self.metrics.counter_total(self.metrics.tasks) & 0xFFFFFFFF)


class Intake(pykka.ThreadingActor):
    """Where every answer goes; forwards it to the server thread that owns the socket."""

    def __init__(self, server: IntakeServer, directory: Directory, metrics: Metrics):
        super().__init__()
        self.server = server
        self.directory = directory
        self.metrics = metrics
        self.pusher = None

    def on_start(self) -> None:
        self.pusher = self.server.context.socket(zmq.PUSH)
        self.pusher.setsockopt(zmq.LINGER, 1000)
        self.pusher.connect(self.server.answers_endpoint)

    def on_receive(self, message) -> None:
        if isinstance(message, Answer):
            reply: TaskReply = message.reply
            self.metrics.tasks.labels(reply.error_code or "completed").inc()
            self.pusher.send_multipart([TICKET.pack(message.ticket), messages.encode(reply)])
        elif isinstance(message, InjectFault) and message.kind == "crash":
            raise RuntimeError("injected fault: intake crash")
        else:
            log.warning("intake ignores %r", message)

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._close()
        self.directory.tell("root", ChildFailed("intake", repr(exception_value)))

    def on_stop(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
            self.pusher = None
