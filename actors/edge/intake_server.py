"""IntakeServer: the thread that owns the ZeroMQ ROUTER where callers submit
tasks, and the ledger that makes every accepted task answered exactly once.

zmq sockets are never shared between threads, so the ROUTER lives here. The
server decodes and validates each request (validate, TaskLimits; which
capabilities exist and which this host offers), refuses bad ones at once with
a clear code, checks the caller's identity, grants and budget (Admission,
actors/edge/identity.py), records accepted ones in the ledger (ticket -> the
connection that asked) and hands them to the Scheduler. Answers reach it
through `post()`, a thread-safe queue with a wake-up fd in the server's
poller: the Intake actor (actors/intake.py) posts what other actors answer,
and Directory.answer posts straight here while that actor is dead or
restarting. The ledger entry is removed as the reply goes out: a second answer
for the same ticket finds no entry and is dropped (and counted).

An answer goes back over the connection the request came on, and only while
it lives (actors/edge/connections.py): a caller that went away is not answered,
and whoever connects with its routing id gets nothing. The same guard sheds
connections past daemon.max_connections.

A task that streams (TaskRequest.stream) or takes stdin while it runs
(.stdin_open) gets a StreamState (actors/edge/streams.py): its output chunks
and the Supervisor that runs it reach the server through the same queue as
answers, in the order the Intake actor got them, so the reply never
overtakes a chunk. The server sends TaskOutput frames as the caller's window
allows (StreamAck), tells the Supervisor ReaderHold when the caller is far
behind, forwards TaskStdin as StdinChunk, and moves a task to a new
connection of the same identity on TaskAttach. For a live task it never
sends a second TaskReply: a caller would take it for the task's answer.

Sessions (actors/sessions.py): a SessionOpen is checked like a task of its
capabilities (known, offered, granted, egress rules within the grants, the
[sessions] bounds) and charged like one, then handed to the Sessions actor
(OpenSession); SessionClose and SessionList go there too (CloseSession,
ListSessions), each with the caller's identity as owner. An exec, a
TaskRequest with session_id, is accepted and charged like a task (streams
and stdin alike) and handed to Sessions (SessionExec) instead of the
Scheduler. Each gets a ticket whose ledger entry knows its reply kind: a
session request is answered with a SessionReply, and an error TaskReply
posted for it (the Scheduler's busy, unavailable or cancelled_scram for an
open's claiming task, a failed claim's VM, corrald stopping) goes out as a
SessionReply with the same code and text; for an open, Sessions is told it
failed (SessionOpenFailed).

Session snapshots: SessionPause and SessionResume go to Sessions as a close
does (PauseSession, ResumeSession: never charged, never refused by corrald's
mode here; Sessions refuses them in safe mode or while draining). A
SessionFork (ForkSession) is new work: refused in corrald's modes, its count
checked (1..MAX_FORKS) and charged as `count` tasks of the default cost (a
normal task asking for no capability: the server does not know the session's
capabilities).

The server thread outlives a crash of the Intake actor, so the ledger and the
socket are never lost. At shutdown (stop) it answers whatever no actor did.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import socket
import time
from dataclasses import dataclass
from enum import StrEnum

import zmq

from actors.artifacts.files import check_files_in, check_paths
from actors.directory import Directory, send
from actors.edge.connections import Connection, ConnectionGuard, caller_of
from actors.edge.endpoint import SocketThread
from actors.edge.identity import Admission
from actors.edge.metrics import Metrics
from actors.edge.streams import StreamLimits, StreamState, StreamTotals
from actors.egress.rules import RuleError, parse_rules
from actors.errors import CorralError, Rejected
from actors.messages import (Answer, CloseSession, ForkSession, ListSessions, OpenSession, OutputChunk,
                             PauseSession, ReaderHold, ResumeSession, SessionExec, SessionOpenFailed, StdinChunk,
                             Submit, Task, TaskStarted)
from actors.session_table import SessionLimits, check_open
from config import Config
from protocol.channel import capabilities, codec
from protocol.channel.errors import ProtocolError
from protocol.wire import envelope
from protocol.wire.tasks import (CLIENT_TO_DAEMON, MAX_FORKS, NORMAL, PROTOCOL_TAG, PRIORITY_NAMES, ErrorCode,
                                 SessionClose, SessionFork, SessionList, SessionOpen, SessionPause, SessionReply,
                                 SessionResume, StatusReply, StatusRequest, StreamAck,
                                 TaskAttach, TaskOutput, TaskReply, TaskRequest, TaskStdin, error_reply,
                                 session_reply)

log = logging.getLogger("corral.intake")
STOP = None  # posted instead of an answer: the server answers what is left and ends
READ_BATCH = 256  # requests read per turn, so answers and the monitor get turns in a flood
POSTED_BATCH = 1024  # answers and chunks taken per turn, so requests get turns while a task floods output
UNKNOWN_TASK = "no task with this id is in flight for this identity"  # the same text, whoever's it is
ENDPOINT_LABEL = "client"

KNOWN_CAPABILITIES = frozenset(capabilities.ALL)  # protocol/channel/capabilities.py: the one table
UNAVAILABLE_CAPABILITIES = {
    "dev:gpu": "capability 'dev:gpu' is not offered: this host has no GPU passthrough",
}
OFFERED_CAPABILITIES = KNOWN_CAPABILITIES - UNAVAILABLE_CAPABILITIES.keys()


class ReplyKind(StrEnum):
    """What a ticket is answered with: a TaskReply (a task, or an exec in a
    session) or a SessionReply (an open, close, list, pause, resume or
    fork); the values label corral_session_requests_total."""

    TASK = "task"
    OPEN = "open"
    CLOSE = "close"
    LIST = "list"
    PAUSE = "pause"
    RESUME = "resume"
    FORK = "fork"


# What a session request that is no open is handed to Sessions as, and answered as.
SESSION_CALLS = {SessionClose: (ReplyKind.CLOSE, CloseSession), SessionList: (ReplyKind.LIST, ListSessions),
                 SessionPause: (ReplyKind.PAUSE, PauseSession), SessionResume: (ReplyKind.RESUME, ResumeSession),
                 SessionFork: (ReplyKind.FORK, ForkSession)}


@dataclass(frozen=True)
class LedgerEntry:
    conn: Connection  # the only connection the answer may go to (another after a TaskAttach)
    routing_id: bytes
    task_id: str  # or a session request's request_id
    identity: str = ""  # who asked (Admission): only it may attach
    kind: ReplyKind = ReplyKind.TASK


@dataclass(frozen=True)
class TaskLimits:
    default_timeout_ms: int
    max_timeout_ms: int
    default_output_cap: int
    max_output_cap: int
    max_request_bytes: int
    max_put_bytes: int = 0  # files_in, all files of one task
    streams: StreamLimits = StreamLimits()
    default_egress_allow: tuple[bytes, ...] = ()  # a net:egress task's rules when it names none
    # A SessionOpen's idle time, lifetime and labels are checked against these
    # before it is charged; None: by the Sessions actor alone (tests).
    sessions: SessionLimits | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> TaskLimits:
        tasks = cfg.tasks
        return cls(default_timeout_ms=int(tasks.default_timeout_s * 1000),
                   max_timeout_ms=int(tasks.max_timeout_s * 1000),
                   default_output_cap=tasks.default_output_cap, max_output_cap=tasks.max_output_cap,
                   max_request_bytes=tasks.max_request_bytes, max_put_bytes=cfg.artifacts.max_put_bytes,
                   streams=StreamLimits.from_config(tasks),
                   default_egress_allow=tuple(str(r).encode() for r in parse_rules(cfg.egress.default_allow)),
                   sessions=SessionLimits.from_config(cfg))


def _check_no_nul(what: str, value: bytes) -> None:
    if b"\0" in value:
        raise Rejected(ErrorCode.INVALID_REQUEST, f"{what} contains a NUL byte")


def validate(request: TaskRequest, limits: TaskLimits) -> TaskRequest:
    """The request with defaults filled in, or Rejected naming what is wrong."""
    if not request.task_id:
        raise Rejected(ErrorCode.INVALID_REQUEST, "task_id is empty")
    if request.session_id and (request.capabilities or request.egress_allow):
        raise Rejected(ErrorCode.INVALID_REQUEST, "an exec in a session asks for no capabilities or egress "
                                                  "rules: the session's, fixed when it opened, apply")
    if not request.argv[0]:
        raise Rejected(ErrorCode.INVALID_REQUEST, "argv[0] is empty")
    for i, arg in enumerate(request.argv):
        _check_no_nul(f"argv[{i}]", arg)
    for key, value in request.env:
        if not key or b"=" in key:
            raise Rejected(ErrorCode.INVALID_REQUEST, f"env name {key!r} is empty or contains '='")
        _check_no_nul(f"env {key!r}", key + value)
    _check_no_nul("cwd", request.cwd)
    if len(request.stdin) > limits.streams.max_stdin_bytes:
        raise Rejected(ErrorCode.INVALID_REQUEST, f"stdin of {len(request.stdin)} bytes is over the maximum "
                       f"of {limits.streams.max_stdin_bytes} bytes")
    if request.cwd and not request.cwd.startswith(b"/"):
        raise Rejected(ErrorCode.INVALID_REQUEST, "cwd must be an absolute path")
    timeout_ms = request.timeout_ms or limits.default_timeout_ms
    if timeout_ms > limits.max_timeout_ms:
        raise Rejected(ErrorCode.INVALID_REQUEST,
                       f"timeout {timeout_ms / 1000:g} s is over the maximum of {limits.max_timeout_ms / 1000:g} s")
    output_cap = request.output_cap or limits.default_output_cap
    if output_cap > limits.max_output_cap:
        raise Rejected(ErrorCode.INVALID_REQUEST,
                       f"output cap {output_cap} is over the maximum of {limits.max_output_cap} bytes")
    try:
        check_files_in(request.files_in, limits.max_put_bytes)
        check_paths("collect", request.collect)
    except OverflowError as e:
        raise Rejected(ErrorCode.FILES_TOO_LARGE, str(e)) from None
    except ValueError as e:
        raise Rejected(ErrorCode.INVALID_REQUEST, str(e)) from None
    seen = set()
    for raw in request.capabilities:
        name = raw.decode("ascii", errors="replace")
        if name not in KNOWN_CAPABILITIES:
            raise Rejected(ErrorCode.UNKNOWN_CAPABILITY, f"unknown capability {name!r} "
                           f"(known: {', '.join(sorted(KNOWN_CAPABILITIES))})")
        if name in seen:
            raise Rejected(ErrorCode.DUPLICATE_CAPABILITY, f"capability {name!r} is asked for twice")
        if name in UNAVAILABLE_CAPABILITIES:
            raise Rejected(ErrorCode.CAPABILITY_UNAVAILABLE, UNAVAILABLE_CAPABILITIES[name])
        seen.add(name)
    egress_allow = ()
    if request.egress_allow:
        if capabilities.NET_EGRESS not in seen:
            raise Rejected(ErrorCode.INVALID_REQUEST, "egress rules (egress_allow, --allow) need capability "
                                                      f"{capabilities.NET_EGRESS}")
        try:
            egress_allow = tuple(str(rule).encode() for rule in parse_rules(request.egress_allow))
        except RuleError as e:
            raise Rejected(ErrorCode.INVALID_REQUEST, str(e)) from None
    return codec.replace(request, timeout_ms=timeout_ms, output_cap=output_cap, egress_allow=egress_allow)


def open_as_task(request: SessionOpen) -> TaskRequest:
    """What a SessionOpen is checked and charged as: a task of its
    capabilities and egress rules at normal priority (the claiming task
    Sessions submits is that task)."""
    return TaskRequest(task_id=request.request_id, priority=NORMAL, argv=(b"true",), env=(), cwd=b"",
                       stdin=b"", timeout_ms=0, output_cap=0, capabilities=request.capabilities,
                       egress_allow=request.egress_allow)


def fork_as_task(request: SessionFork) -> TaskRequest:
    """What each new session of a SessionFork is charged as: a task of the
    default cost (normal priority, no capability). The IntakeServer does not
    know the session's capabilities; Sessions does."""
    return TaskRequest(task_id=request.request_id, priority=NORMAL, argv=(b"true",), env=(), cwd=b"",
                       stdin=b"", timeout_ms=0, output_cap=0, capabilities=())


def with_default_egress(request: TaskRequest, limits: TaskLimits) -> TaskRequest:
    """A net:egress task that names no rules gets egress.default_allow (after the
    grant check: the operator chose those, the caller did not)."""
    if request.egress_allow or capabilities.NET_EGRESS.encode() not in request.capabilities:
        return request
    return codec.replace(request, egress_allow=limits.default_egress_allow)


class IntakeServer:
    """The thread that owns the ROUTER socket and the ledger."""

    def __init__(self, endpoint: str, limits: TaskLimits, metrics: Metrics, directory: Directory,
                 admission: Admission | None = None, max_connections: int = 1024):
        self.endpoint = endpoint
        self.limits = limits
        self.metrics = metrics
        self.directory = directory
        # Who the caller is and what it may ask for (actors/edge/identity.py).
        self.admission = admission or Admission.unlimited(OFFERED_CAPABILITIES)
        self.context = zmq.Context.instance()
        # Answer, TaskStarted, OutputChunk (in the order the Intake actor got them) or STOP.
        self.posted: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.tickets = itertools.count(1)
        self.ledger: dict[int, LedgerEntry] = {}
        self.in_flight: dict[tuple[int, str], int] = {}  # (connection id, task_id) -> ticket
        self.by_identity: dict[tuple[str, str], set[int]] = {}  # (identity, task_id) -> tickets: TaskAttach
        # routing id -> (connection, caller, unanswered tasks) while any is unanswered:
        # a request from another connection with that id is a reuse attempt.
        self.routing_ids: dict[bytes, tuple[Connection, str, int]] = {}
        # Tasks that stream or take stdin (actors/edge/streams.py), by ticket, until their reply is out.
        self.streams: dict[int, StreamState] = {}
        self.stream_totals = StreamTotals()
        metrics.watch_streams(self.stream_totals)
        self.holding: set[int] = set()  # tickets whose Supervisor was told ReaderHold(True)
        self.lingering: set[int] = set()  # answered tickets whose reply waits for the caller
        self.max_connections = max_connections
        self.guard: ConnectionGuard | None = None
        # None: accepting. Else (code, message) every new task is refused with:
        # set from other threads (shutdown, control plane) as one atomic store.
        self.refusal: tuple[str, str] | None = None
        self._thread = SocketThread(self._run, "intake-server", f"cannot listen on {endpoint}")

    def start(self) -> None:
        self._thread.start()

    def post(self, ticket: int, reply: TaskReply) -> None:
        """Hand an answer to the server thread; callable from any thread."""
        self.forward(Answer(ticket, reply))

    def forward(self, message: Answer | TaskStarted | OutputChunk) -> None:
        """Hand a streaming task's TaskStarted or OutputChunk (or an Answer) to
        the server thread, after everything forwarded before it."""
        self.posted.put(message)
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
        """Tasks whose reply has not gone out (answered streaming tasks whose
        caller is behind or gone included)."""
        return len(self.ledger)

    def _run(self) -> None:
        router = self.context.socket(zmq.ROUTER)
        guard = None
        try:
            router.setsockopt(zmq.LINGER, 1000)
            router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_request_bytes)
            self.admission.secure(router, self.context)
            guard = self.guard = ConnectionGuard(router, ENDPOINT_LABEL, self.max_connections, self.metrics)
            router.bind(self.endpoint)
            guard.bound(router.getsockopt_string(zmq.LAST_ENDPOINT))
        except (zmq.ZMQError, CorralError) as e:
            if guard is not None:
                guard.close(lambda: router.close(0))
            else:
                router.close(0)
            self.admission.close()
            self._thread.ready(e)
            return
        self._thread.ready()
        log.info("listening on %s (at most %d connections)", self.endpoint, self.max_connections)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(guard.monitor, zmq.POLLIN)
        poller.register(self._wake_reader, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(self._poll_timeout_ms()))
                if not events:
                    guard.tick()
                if self._wake_reader.fileno() in events:
                    try:
                        self._wake_reader.recv(4096)
                    except BlockingIOError:
                        pass
                    if not self._deliver_posted():
                        self._answer_the_rest()
                        return
                if router in events or guard.monitor in events:
                    guard.pump(lambda: self._read_requests(router))
                if self.holding or self.lingering:
                    self._watch_streams(time.monotonic())
        finally:
            guard.close(router.close)
            self.admission.close()

    def _poll_timeout_ms(self) -> int | None:
        """Until the guard wants a tick or the first lingering reply expires."""
        timeout = self.guard.poll_timeout_ms()
        if self.lingering:
            first = min(self.streams[ticket].deadline() for ticket in self.lingering)
            linger_ms = max(0, int((first - time.monotonic()) * 1000) + 1)
            timeout = linger_ms if timeout is None else min(timeout, linger_ms)
        return timeout

    def _read_requests(self, router) -> bool:
        """Handle up to READ_BATCH requests; True if the ROUTER is read empty."""
        for _ in range(READ_BATCH):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            conn = self.guard.connection_of(parts[-1], parts[0].bytes)
            if conn is None:  # libzmq announced no such connection: nothing can answer it safely
                log.error("a request from a connection the monitor never announced (fd %s): dropped",
                          parts[-1].get(zmq.SRCFD))
                continue
            self._request([p.bytes for p in parts], self.admission.user_of(parts), conn,
                          caller_of(parts[-1], self.admission.curve))
            # Frames cache their bytes: held until the next request, a 16 MiB
            # one would stay twice in memory (the message and its copy).
            del parts
        return False

    def _deliver_posted(self) -> bool:
        """Take what was posted, up to POSTED_BATCH (all of it once STOP
        came), then send what it allows; False once STOP was among it."""
        touched: set[int] = set()  # streaming tickets to send for
        running = True
        taken = 0
        while True:
            if running and taken >= POSTED_BATCH:
                self._wake()  # the rest on the next turn, after the sockets'
                break
            try:
                item = self.posted.get_nowait()
            except queue.Empty:
                break
            taken += 1
            if item is STOP:
                running = False  # what was posted before it still goes out
            elif isinstance(item, Answer):
                self._deliver(item.ticket, item.reply)
            elif isinstance(item, OutputChunk):
                self._output(item, touched)
            elif isinstance(item, TaskStarted):
                self._started(item, touched)
            else:
                log.error("intake server ignores %r", item)
        for ticket in touched:
            self._pump(ticket)
        return running

    def _answer_the_rest(self) -> None:
        """At shutdown: what no actor answered is answered here, once; a
        streaming task's output still held goes first, whatever the window."""
        for ticket, entry in list(self.ledger.items()):
            state = self.streams.get(ticket)
            if state is None or state.reply is None:
                self._deliver(ticket, error_reply(
                    entry.task_id, ErrorCode.CANCELLED, "corrald stopped before this task finished"))
            if ticket in self.streams:
                self._flush(ticket)

    def _send(self, conn: Connection, routing_id: bytes, reply) -> None:
        """`reply` over `conn` only; if it is gone, nowhere (counted)."""
        if not self._send_to(conn, routing_id, reply):
            self.metrics.answers_undeliverable.labels(ENDPOINT_LABEL).inc()
            log.info("an answer (%s) for a caller that has gone was dropped",
                     getattr(reply, "task_id", None) or getattr(reply, "request_id", None) or "status")

    def _send_to(self, conn: Connection, routing_id: bytes, message) -> bool:
        return self.guard.send(conn, [routing_id, *envelope.build(PROTOCOL_TAG, codec.encode(message))])

    def _request(self, frames: list[bytes], user: bytes | None, conn: Connection,
                 caller: str = "") -> None:
        routing_id = frames[0]
        self._check_routing_id(routing_id, conn, caller)
        try:
            payload = envelope.parse(PROTOCOL_TAG, frames[1:])
        except envelope.MalformedEnvelope as e:
            self.metrics.rejected.labels(ErrorCode.INVALID_REQUEST).inc()
            return self._send(conn, routing_id, error_reply("", ErrorCode.INVALID_REQUEST, str(e)))
        try:
            request = codec.decode(payload, CLIENT_TO_DAEMON)
        except ProtocolError as e:
            self.metrics.rejected.labels(ErrorCode.INVALID_REQUEST).inc()
            return self._send(conn, routing_id, error_reply("", ErrorCode.INVALID_REQUEST,
                                                            f"undecodable request: {e}"))
        if isinstance(request, StatusRequest):
            return self._send(conn, routing_id, self._status(request.request_id))
        if isinstance(request, StreamAck):
            return self._ack(request, conn)
        if isinstance(request, TaskStdin):
            return self._stdin(request, conn, routing_id)
        if isinstance(request, TaskAttach):
            return self._attach(request, user, conn, routing_id, caller)
        if isinstance(request, SessionOpen):
            return self._session_open(request, user, conn, routing_id, caller)
        if isinstance(request, SessionFork):
            return self._session_fork(request, user, conn, routing_id, caller)
        if isinstance(request, (SessionClose, SessionList, SessionPause, SessionResume)):
            return self._session_call(request, user, conn, routing_id, caller)
        try:
            self._check_new(conn, request.task_id, "task", refuse=True)
            request = validate(request, self.limits)
            ticket = next(self.tickets)
            name = self.admission.admit(user, request, ticket)
            request = with_default_egress(request, self.limits)
        except Rejected as e:
            self.metrics.rejected.labels(e.code).inc()
            return self._send(conn, routing_id, error_reply(request.task_id, e.code, str(e), e.retry_after_ms))
        self._bind(ticket, LedgerEntry(conn, routing_id, request.task_id, name), caller)
        self.by_identity.setdefault((name, request.task_id), set()).add(ticket)
        if request.stream or request.stdin_open:
            self.streams[ticket] = StreamState(request.task_id, self.limits.streams, request.stdin_open,
                                               len(request.stdin), self.stream_totals)
        self.metrics.accepted.inc()
        task = Task(ticket, request, time.monotonic(), identity=name)
        if request.session_id:
            handed = self.directory.tell("sessions", SessionExec(task, name))
        else:
            handed = self.directory.tell("scheduler", Submit(task))
        if not handed:
            self._deliver(ticket, error_reply(
                request.task_id, ErrorCode.UNAVAILABLE,
                f"the {'sessions actor' if request.session_id else 'scheduler'} is restarting; retry", 1000))

    def _check_new(self, conn: Connection, request_id: str, what: str, refuse: bool) -> None:
        """Rejected if corrald's mode refuses new work (`refuse`: tasks, execs,
        opens) or this connection has `request_id` in flight already."""
        refusal = self.refusal
        if refuse and refusal is not None:
            raise Rejected(*refusal)
        if (conn.id, request_id) in self.in_flight:
            raise Rejected(ErrorCode.DUPLICATE_TASK, f"{what} {request_id!r} is already in flight")

    # --- sessions ----------------------------------------------------------------

    def _session_open(self, request: SessionOpen, user: bytes | None, conn: Connection, routing_id: bytes,
                      caller: str) -> None:
        """Checked and charged as a task of its capabilities, then Sessions' to answer."""
        try:
            self._check_new(conn, request.request_id, "request", refuse=True)
            if not request.request_id:
                raise Rejected(ErrorCode.INVALID_REQUEST, "request_id is empty")
            if self.limits.sessions is not None:
                check_open(request, self.limits.sessions)
            claim = validate(open_as_task(request), self.limits)
            ticket = next(self.tickets)
            name = self.admission.admit(user, claim, ticket)
            claim = with_default_egress(claim, self.limits)
        except Rejected as e:
            self.metrics.rejected.labels(e.code).inc()
            return self._send(conn, routing_id, session_reply(
                request.request_id, error_code=e.code, error_message=str(e), retry_after_ms=e.retry_after_ms))
        request = codec.replace(request, egress_allow=claim.egress_allow)  # canonical, defaults filled in
        self._bind(ticket, LedgerEntry(conn, routing_id, request.request_id, name, ReplyKind.OPEN), caller)
        if not self.directory.tell("sessions", OpenSession(ticket, request, name)):
            self._deliver(ticket, session_reply(request.request_id, error_code=ErrorCode.UNAVAILABLE,
                                                error_message="the sessions actor is restarting; retry",
                                                retry_after_ms=1000))

    def _session_fork(self, request: SessionFork, user: bytes | None, conn: Connection, routing_id: bytes,
                      caller: str) -> None:
        """New sessions: refused in corrald's modes, charged `count` tasks of
        the default cost, then Sessions' to answer."""
        try:
            self._check_new(conn, request.request_id, "request", refuse=True)
            if not request.request_id:
                raise Rejected(ErrorCode.INVALID_REQUEST, "request_id is empty")
            if not 1 <= request.count <= MAX_FORKS:
                raise Rejected(ErrorCode.INVALID_REQUEST,
                               f"a fork makes 1 to {MAX_FORKS} new sessions, not {request.count}")
            ticket = next(self.tickets)
            name = self.admission.admit(user, fork_as_task(request), ticket, times=request.count)
        except Rejected as e:
            self.metrics.rejected.labels(e.code).inc()
            return self._send(conn, routing_id, session_reply(
                request.request_id, error_code=e.code, error_message=str(e), retry_after_ms=e.retry_after_ms))
        self._hand_to_sessions(ticket, request, name, conn, routing_id, caller)

    def _session_call(self, request: SessionClose | SessionList | SessionPause | SessionResume,
                      user: bytes | None, conn: Connection, routing_id: bytes, caller: str) -> None:
        """A close, list, pause or resume, for the caller's own sessions:
        never refused by corrald's mode here (a caller may close and list
        while it drains or after a SCRAM; Sessions answers a pause or resume
        then), never charged."""
        try:
            self._check_new(conn, request.request_id, "request", refuse=False)
            if not request.request_id:
                raise Rejected(ErrorCode.INVALID_REQUEST, "request_id is empty")
            name = self.admission.identity_of(user).name
        except Rejected as e:
            self.metrics.rejected.labels(e.code).inc()
            return self._send(conn, routing_id, session_reply(request.request_id, error_code=e.code,
                                                              error_message=str(e)))
        self._hand_to_sessions(next(self.tickets), request, name, conn, routing_id, caller)

    def _hand_to_sessions(self, ticket: int, request, name: str, conn: Connection, routing_id: bytes,
                          caller: str) -> None:
        kind, message_type = SESSION_CALLS[type(request)]
        self._bind(ticket, LedgerEntry(conn, routing_id, request.request_id, name, kind), caller)
        if not self.directory.tell("sessions", message_type(ticket, request, name)):
            self._deliver(ticket, session_reply(request.request_id, error_code=ErrorCode.UNAVAILABLE,
                                                error_message="the sessions actor is restarting; retry",
                                                retry_after_ms=1000))

    def _as_kind(self, ticket: int, entry: LedgerEntry, reply: TaskReply | SessionReply) -> TaskReply | SessionReply:
        """The reply as the ticket's kind is answered. Anyone may post an
        error TaskReply for a ticket it was handed as a task (the Scheduler,
        a Supervisor, the shutdown); a session request gets it as a
        SessionReply with the same code and text, and a failed open is
        reported to Sessions, which forgets the session."""
        if entry.kind == ReplyKind.TASK:
            if isinstance(reply, TaskReply):
                return reply
            log.error("ticket %d, a task, was answered with a SessionReply (%s); answered as a task",
                      ticket, reply.error_code or "ok")
            return error_reply(entry.task_id, reply.error_code or ErrorCode.UNAVAILABLE,
                               reply.error_message or "corrald answered this task as a session request; retry",
                               reply.retry_after_ms)
        if isinstance(reply, SessionReply):
            return reply
        code, text = reply.error_code, reply.error_message
        if not code:  # a claim answered as a plain task: its VM was not kept for the session
            code, text = ErrorCode.SESSION_LOST, "the session's VM was not kept for it; retry"
        if entry.kind == ReplyKind.OPEN:
            self.directory.tell("sessions", SessionOpenFailed(ticket))
        return session_reply(entry.task_id, error_code=code, error_message=text,
                             retry_after_ms=reply.retry_after_ms)

    def _bind(self, ticket: int, entry: LedgerEntry, caller: str) -> None:
        """`entry` is where the answer for `ticket` goes."""
        self.ledger[ticket] = entry
        self.in_flight[(entry.conn.id, entry.task_id)] = ticket
        holder = self.routing_ids.get(entry.routing_id)
        self.routing_ids[entry.routing_id] = (holder[0], holder[1], holder[2] + 1) if holder else (
            entry.conn, caller, 1)

    def _unbind(self, ticket: int) -> LedgerEntry | None:
        entry = self.ledger.pop(ticket, None)
        if entry is None:
            return None
        self.in_flight.pop((entry.conn.id, entry.task_id), None)
        holder = self.routing_ids.pop(entry.routing_id, None)
        if holder is not None and holder[2] > 1:
            self.routing_ids[entry.routing_id] = (holder[0], holder[1], holder[2] - 1)
        return entry

    def _release(self, ticket: int) -> LedgerEntry | None:
        """`ticket` is done: its reply went out or never will."""
        entry = self._unbind(ticket)
        if entry is not None:
            tickets = self.by_identity.get((entry.identity, entry.task_id))
            if tickets is not None:
                tickets.discard(ticket)
                if not tickets:
                    del self.by_identity[(entry.identity, entry.task_id)]
        state = self.streams.pop(ticket, None)
        if state is not None:
            state.close()
        self.holding.discard(ticket)
        self.lingering.discard(ticket)
        return entry

    def _deliver(self, ticket: int, reply: TaskReply | SessionReply) -> None:
        """The one answer for `ticket`; any later one finds no ledger entry
        (or, for a streaming task, a reply already waiting) and is dropped."""
        entry = self.ledger.get(ticket)
        state = self.streams.get(ticket)
        if entry is None or (state is not None and state.reply is not None):
            self.metrics.duplicate_answers.inc()
            log.error("second answer for ticket %d dropped", ticket)
            return
        reply = self._as_kind(ticket, entry, reply)
        self.admission.answered(ticket, reply)
        if isinstance(reply, SessionReply):
            self.metrics.session_requests.labels(entry.kind, reply.error_code or "ok").inc()
        else:
            self.metrics.tasks.labels(reply.error_code or "completed").inc()
            self.metrics.outcomes.labels(reply.outcome).inc()
        if state is None:
            self._release(ticket)
            self._send(entry.conn, entry.routing_id, reply)
            return
        state.answer(reply, time.monotonic())
        self._pump(ticket)

    # --- streams -----------------------------------------------------------------

    def _output(self, chunk: OutputChunk, touched: set[int]) -> None:
        state = self.streams.get(chunk.ticket)
        if state is None:  # its reply is out (or it never streamed): nobody to give it to
            self.stream_totals.dropped["late"] += len(chunk.data)
            return
        if state.connected and self.ledger[chunk.ticket].conn.closed:
            state.disconnected()  # before it is added: a ring from now on
        state.add(chunk.stream, chunk.offset, chunk.data)
        touched.add(chunk.ticket)

    def _started(self, started: TaskStarted, touched: set[int]) -> None:
        state = self.streams.get(started.ticket)
        if state is None:
            return
        for data, eof in state.started(started.supervisor):
            send(started.supervisor, StdinChunk(started.ticket, data, eof))
        touched.add(started.ticket)

    def _pump(self, ticket: int) -> None:
        """Send a streaming task what its window allows, tell its Supervisor
        to hold or resume, and send its reply once every chunk is out."""
        state = self.streams.get(ticket)
        entry = self.ledger.get(ticket)
        if state is None or entry is None:
            return
        if state.connected and entry.conn.closed:
            state.disconnected()
        totals = self.stream_totals
        for chunk in state.sendable():
            output = TaskOutput(task_id=entry.task_id, stream=chunk.stream, offset=chunk.offset, data=chunk.data)
            if not self._send_to(entry.conn, entry.routing_id, output):
                state.disconnected()
                break
            totals.chunks_sent += 1
            totals.bytes_sent += len(chunk.data)
        held = state.hold_change()
        if held is not None:
            (self.holding.add if held else self.holding.discard)(ticket)
            send(state.supervisor, ReaderHold(ticket, held))
        if state.reply is None:
            return
        if state.reply_ready():
            if self._send_to(entry.conn, entry.routing_id, state.reply):
                self._release(ticket)
                return
            state.disconnected()
        self.lingering.add(ticket)

    def _flush(self, ticket: int) -> None:
        """corrald is stopping: every chunk still held, then the reply, if the caller is there."""
        state = self.streams[ticket]
        entry = self.ledger[ticket]
        if state.connected and entry.conn.closed:
            state.disconnected()
        for chunk in state.drain():
            if not self._send_to(entry.conn, entry.routing_id, TaskOutput(
                    task_id=entry.task_id, stream=chunk.stream, offset=chunk.offset, data=chunk.data)):
                state.disconnected()
                break
        reply = state.reply
        self._release(ticket)
        if state.connected:
            self._send(entry.conn, entry.routing_id, reply)
        else:
            self.metrics.answers_undeliverable.labels(ENDPOINT_LABEL).inc()

    def _watch_streams(self, now: float) -> None:
        """A held caller whose connection went must not keep its VM held;
        a reply that waited its linger out is dropped."""
        for ticket in list(self.holding):
            entry = self.ledger.get(ticket)
            if entry is None or entry.conn.closed:
                self._pump(ticket)
        for ticket in list(self.lingering):
            state = self.streams[ticket]
            if now < state.deadline():
                continue
            entry = self._release(ticket)
            self.stream_totals.replies_expired += 1
            self.metrics.answers_undeliverable.labels(ENDPOINT_LABEL).inc()
            log.info("task %r: its caller took nothing for %g s after it ended: %d bytes of output and "
                     "its reply dropped", entry.task_id, self.limits.streams.linger_s, state.buffered)

    def _ack(self, ack: StreamAck, conn: Connection) -> None:
        """A StreamAck: never answered (an ack may cross the reply, or come after it)."""
        ticket = self.in_flight.get((conn.id, ack.task_id))
        state = self.streams.get(ticket) if ticket is not None else None
        if state is None:
            self.stream_totals.acks_ignored += 1
            return
        state.ack(ack.stdout_offset, ack.stderr_offset, time.monotonic())
        self._pump(ticket)

    def _stdin(self, stdin: TaskStdin, conn: Connection, routing_id: bytes) -> None:
        """A TaskStdin for a task of this connection; for none, unknown_task
        (for a live task never a TaskReply: the caller would take it for the answer)."""
        ticket = self.in_flight.get((conn.id, stdin.task_id))
        if ticket is None:
            self.stream_totals.stdin_refused["unknown_task"] += 1
            return self._send(conn, routing_id, error_reply(stdin.task_id, ErrorCode.UNKNOWN_TASK, UNKNOWN_TASK))
        state = self.streams.get(ticket)
        if state is None:  # a task that neither streams nor took stdin_open
            self.stream_totals.stdin_refused["not_open"] += 1
            return
        for data, eof in state.stdin(stdin.data, stdin.eof):
            send(state.supervisor, StdinChunk(ticket, data, eof))

    def _attach(self, attach: TaskAttach, user: bytes | None, conn: Connection, routing_id: bytes,
                caller: str) -> None:
        """Move a task of this identity to this connection and send again
        what is held from the offsets asked. Unknown, or another identity's:
        the same unknown_task."""
        try:
            name = self.admission.identity_of(user).name
        except Rejected:
            name = None
        tickets = self.by_identity.get((name, attach.task_id)) if name is not None else None
        if not tickets:
            self.stream_totals.attaches["unknown_task"] += 1
            return self._send(conn, routing_id, error_reply(attach.task_id, ErrorCode.UNKNOWN_TASK, UNKNOWN_TASK))
        ticket = self.in_flight.get((conn.id, attach.task_id))
        if ticket is None:  # of its tasks with this id, one whose connection is gone first, then the oldest
            ticket = min(tickets, key=lambda t: (not self.ledger[t].conn.closed, t))
            entry = self._unbind(ticket)
            self._bind(ticket, dataclasses.replace(entry, conn=conn, routing_id=routing_id), caller)
        self.stream_totals.attaches["resumed"] += 1
        state = self.streams.get(ticket)
        if state is not None:
            state.attach(attach.stdout_offset, attach.stderr_offset, time.monotonic())
            self._pump(ticket)

    def _check_routing_id(self, routing_id: bytes, conn: Connection, caller: str) -> None:
        """Count a request whose routing id another connection's unanswered tasks use."""
        holder = self.routing_ids.get(routing_id)
        if holder is None or holder[0] is conn:
            return
        same = "same" if holder[1] == caller else "other"
        self.metrics.routing_id_reuse.labels(ENDPOINT_LABEL, same).inc()
        log.warning("routing id %s, still awaited by connection %d (%s), is used by connection %d (%s): "
                    "it gets none of those answers", routing_id.hex(), holder[0].id, holder[1], conn.id, caller)

    def _status(self, request_id: str) -> StatusReply:
        depth = self.metrics.gauge_values(self.metrics.queue_depth)
        pool = self.metrics.gauge_values(self.metrics.pool_vms)
        return StatusReply(
            request_id=request_id,
            queue_depth=tuple((name.encode(), str(depth.get(name, 0)).encode()) for name in PRIORITY_NAMES),
            pool=tuple((state.encode(), str(count).encode()) for state, count in pool.items()),
            accepted=self.metrics.counter_total(self.metrics.accepted) & 0xFFFFFFFF,
            answered=self.metrics.counter_total(self.metrics.tasks) & 0xFFFFFFFF)
