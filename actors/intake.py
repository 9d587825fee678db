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
Answers reach the server through `post()`, a thread-safe queue with a wake-up
fd in the server's poller; an Answer that cannot reach the Intake actor (dead,
restarting) is posted straight to the server by Directory.answer.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import time
from dataclasses import dataclass, replace

import pykka
import zmq

from actors.artifacts import check_files_in, check_paths
from actors.directory import Directory, drain_inbox
from actors.endpoint import SocketThread
from actors.errors import CorralError, Rejected
from actors.identity import Admission
from actors.messages import Answer, ChildFailed, InjectFault, Submit, Task
from actors.metrics import Metrics
from protocol import capabilities, messages
from protocol.errors import ProtocolError
from protocol.tasks import (CLIENT_TO_DAEMON, PROTOCOL_TAG, PRIORITY_NAMES, StatusReply,
                            StatusRequest, TaskReply, TaskRequest, error_reply)

log = logging.getLogger("corral.intake")
STOP = None  # posted instead of an answer: the server answers what is left and ends

KNOWN_CAPABILITIES = frozenset(capabilities.ALL)  # protocol/capabilities.py: the one table
UNAVAILABLE_CAPABILITIES = {
    "dev:gpu": "capability 'dev:gpu' is not offered: this host has no GPU passthrough",
}
OFFERED_CAPABILITIES = KNOWN_CAPABILITIES - UNAVAILABLE_CAPABILITIES.keys()


@dataclass(frozen=True)
class TaskLimits:
    default_timeout_ms: int
    max_timeout_ms: int
    default_output_cap: int
    max_output_cap: int
    max_request_bytes: int
    max_put_bytes: int = 0  # files_in, all files of one task


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
    try:
        check_files_in(request.files_in, limits.max_put_bytes)
        check_paths("collect", request.collect)
    except OverflowError as e:
        raise Rejected("files_too_large", str(e)) from None
    except ValueError as e:
        raise Rejected("invalid_request", str(e)) from None
    seen = set()
    for raw in request.capabilities:
        name = raw.decode("ascii", errors="replace")
        if name not in KNOWN_CAPABILITIES:
            raise Rejected("unknown_capability", f"unknown capability {name!r} "
                           f"(known: {', '.join(sorted(KNOWN_CAPABILITIES))})")
        if name in seen:
            raise Rejected("duplicate_capability", f"capability {name!r} is asked for twice")
        if name in UNAVAILABLE_CAPABILITIES:
            raise Rejected("capability_unavailable", UNAVAILABLE_CAPABILITIES[name])
        seen.add(name)
    return replace(request, timeout_ms=timeout_ms, output_cap=output_cap)


class IntakeServer:
    """The thread that owns the ROUTER socket and the ledger."""

    def __init__(self, endpoint: str, limits: TaskLimits, metrics: Metrics, directory: Directory,
                 admission: Admission | None = None):
        self.endpoint = endpoint
        self.limits = limits
        self.metrics = metrics
        self.directory = directory
        # Who the caller is and what it may ask for (actors/identity.py).
        self.admission = admission or Admission.unlimited(OFFERED_CAPABILITIES)
        self.context = zmq.Context.instance()
        self.posted: queue.SimpleQueue = queue.SimpleQueue()  # (ticket, TaskReply) or STOP
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.tickets = itertools.count(1)
        self.ledger: dict[int, tuple[bytes, str]] = {}  # ticket -> (identity, task_id)
        self.in_flight: set[tuple[bytes, str]] = set()
        # None: accepting. Else (code, message) every new task is refused with:
        # set from other threads (shutdown, control plane) as one atomic store.
        self.refusal: tuple[str, str] | None = None
        self._thread = SocketThread(self._run, "intake-server", f"cannot listen on {endpoint}")

    def start(self) -> None:
        self._thread.start()

    def post(self, ticket: int, reply: TaskReply) -> None:
        """Hand an answer to the server thread; callable from any thread."""
        self.posted.put((ticket, reply))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except BlockingIOError:
            pass  # already full of wake-ups: the server will drain the queue anyway

    def stop(self) -> None:
        if self._thread.is_alive():
            self.posted.put(STOP)
            self._wake()
            self._thread.join(10)

    def unanswered(self) -> int:
        return len(self.ledger)

    def _run(self) -> None:
        router = self.context.socket(zmq.ROUTER)
        try:
            router.setsockopt(zmq.LINGER, 1000)
            router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_request_bytes)
            self.admission.secure(router, self.context)
            router.bind(self.endpoint)
        except (zmq.ZMQError, CorralError) as e:
            router.close(0)
            self.admission.close()
            self._thread.ready(e)
            return
        self._thread.ready()
        log.info("listening on %s", self.endpoint)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._wake_reader, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._wake_reader.fileno() in events:
                    try:
                        self._wake_reader.recv(4096)
                    except BlockingIOError:
                        pass
                    if not self._deliver_posted(router):
                        self._answer_the_rest(router)
                        return
                if router in events:
                    parts = router.recv_multipart(copy=False)
                    self._request(router, [p.bytes for p in parts], self.admission.user_of(parts))
                    # Frames cache their bytes: held until the next request, a 16 MiB
                    # one would stay twice in memory (the message and its copy).
                    del parts
        finally:
            router.close()
            self.admission.close()

    def _deliver_posted(self, router) -> bool:
        """Send every posted answer; False once STOP was among them."""
        while True:
            try:
                item = self.posted.get_nowait()
            except queue.Empty:
                return True
            if item is STOP:
                self._deliver_posted(router)  # answers posted before STOP still go out
                return False
            self._deliver(router, item[0], item[1])

    def _answer_the_rest(self, router) -> None:
        """At shutdown: what no actor answered is answered here, once."""
        for ticket, (_, task_id) in list(self.ledger.items()):
            self._deliver(router, ticket, error_reply(
                task_id, "cancelled", "corrald stopped before this task finished"))

    def _send(self, router, identity: bytes, reply) -> None:
        router.send_multipart([identity, b"", PROTOCOL_TAG, messages.encode(reply)])

    def _request(self, router, frames: list[bytes], user: bytes | None = None) -> None:
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
            refusal = self.refusal
            if refusal is not None:
                raise Rejected(*refusal)
            if (identity, request.task_id) in self.in_flight:
                raise Rejected("duplicate_task", f"task {request.task_id!r} is already in flight")
            request = validate(request, self.limits)
            ticket = next(self.tickets)
            self.admission.admit(user, request, ticket)
        except Rejected as e:
            self.metrics.rejected.labels(e.code).inc()
            return self._send(router, identity, error_reply(request.task_id, e.code, str(e), e.retry_after_ms))
        self.ledger[ticket] = (identity, request.task_id)
        self.in_flight.add((identity, request.task_id))
        self.metrics.accepted.inc()
        if not self.directory.tell("scheduler", Submit(Task(ticket, request, time.monotonic()))):
            self._deliver(router, ticket, error_reply(
                request.task_id, "unavailable", "the scheduler is restarting; retry"))

    def _deliver(self, router, ticket: int, reply: TaskReply) -> None:
        """The one answer for `ticket`; any later one finds no ledger entry."""
        entry = self.ledger.pop(ticket, None)
        if entry is None:
            self.metrics.duplicate_answers.inc()
            log.error("second answer for ticket %d dropped", ticket)
            return
        self.in_flight.discard(entry)
        self.admission.answered(ticket, reply)
        self.metrics.tasks.labels(reply.error_code or "completed").inc()
        self.metrics.outcomes.labels(reply.outcome).inc()
        router.send_multipart([entry[0], b"", PROTOCOL_TAG, messages.encode(reply)])

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
    """The address every answer is told to; it hands each to the server thread."""

    def __init__(self, server: IntakeServer, directory: Directory):
        super().__init__()
        self.server = server
        self.directory = directory

    def on_receive(self, message) -> None:
        if isinstance(message, Answer):
            self.server.post(message.ticket, message.reply)
        elif isinstance(message, InjectFault) and message.kind == "crash":
            raise RuntimeError("injected fault: intake crash")
        else:
            log.warning("intake ignores %r", message)

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # Answers already in the inbox must not die with this actor.
        for message in drain_inbox(self):
            if isinstance(message, Answer):
                self.server.post(message.ticket, message.reply)
        self.directory.tell("root", ChildFailed("intake", repr(exception_value)))
