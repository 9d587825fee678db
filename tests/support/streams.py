"""Streaming tasks at Intake with no VM: a real IntakeServer and Intake actor,
a recording Scheduler, raw DEALER callers that speak the stream frames, and
the test standing in for a Supervisor (TaskStarted, OutputChunk, Answer
told to the Intake actor, as a Supervisor does; a recording actor receives
what the server tells the Supervisor: ReaderHold, StdinChunk)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pykka
import zmq
import zmq.auth

from actors.directory import Directory
from actors.edge.identity import Admission
from actors.edge.intake_server import KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, IntakeServer, TaskLimits
from actors.edge.metrics import Metrics
from actors.intake import Intake
from actors.messages import OutputChunk, ReaderHold, StdinChunk, Submit, TaskStarted
from config import Config
from protocol.channel import codec
from protocol.channel.constants import STDERR, STDOUT
from protocol.client.api import Client
from protocol.wire import envelope
from protocol.wire.tasks import (DAEMON_TO_CLIENT, PROTOCOL_TAG, SessionClose, SessionList, SessionOpen,
                                 SessionReply, StreamAck, TaskAttach, TaskOutput, TaskReply, TaskStdin, error_reply)
from tests.support.intake import LIMITS, request
from tests.support.probe import Recorder, wait_for
from tests.support.waiting import wait_until


class StreamWorld:
    """A real IntakeServer and Intake actor in front of a recording Scheduler,
    and the connections a test opens to it, closed at the end: raw DEALER
    callers (`caller`) and the real client (`client`)."""

    def __init__(self, directory: Directory, server: IntakeServer, scheduler, metrics: Metrics,
                 keys: dict[str, str] | None) -> None:
        self.directory, self.server, self.scheduler, self.metrics = directory, server, scheduler, metrics
        self.keys = keys or {}
        self.connections: list[Caller | Client] = []

    def caller(self, name: str | None = None, **options) -> Caller:
        """A raw caller; `name`: with that identity's key from `keys` (CurveZMQ)."""
        if name is not None:
            options.update(key=self.keys[name], server_public=self.keys["server_public"])
        return self._kept(Caller(self.server.endpoint, **options))

    def client(self, **kwargs) -> Client:
        return self._kept(Client(self.server.endpoint, **kwargs))

    def _kept(self, connection):
        self.connections.append(connection)
        return connection

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


@contextmanager
def stream_world(socket_dir, limits: TaskLimits = LIMITS, identity: Config | None = None,
                 keys: dict[str, str] | None = None):
    """A StreamWorld. `identity`: the config whose identity and budget
    sections admit callers (counted in the world's metrics); None: every
    caller is the unlimited local identity. `keys`: the key files callers
    are named by (tests.support.intake.curve_keys)."""
    directory = Directory()
    metrics = Metrics()
    admission = None if identity is None else \
        Admission.from_config(identity, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, metrics)
    server = IntakeServer(f"ipc://{socket_dir}/intake.sock", limits, metrics, directory, admission)
    directory.answer_fallback = server.post
    server.start()
    scheduler = Recorder.start()
    directory["scheduler"] = scheduler
    directory["intake"] = Intake.start(server, directory)
    world = StreamWorld(directory, server, scheduler, metrics, keys)
    try:
        yield world
    finally:
        world.close()
        pykka.ActorRegistry.stop_all()
        server.stop()


class Caller:
    """A raw DEALER: sends caller frames, receives TaskOutput, TaskReply and
    SessionReply, and keeps each task's streams, checking that every chunk
    starts where the last one ended (nothing lost, nothing repeated) unless
    `gaps` allows it, and that no request is answered twice."""

    def __init__(self, endpoint: str, key: str | None = None, server_public: str | None = None, **options):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if key is not None:
            server_key, _ = zmq.auth.load_certificate(server_public)
            public, secret = zmq.auth.load_certificate(key)
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        for name, value in options.items():
            self.sock.setsockopt(getattr(zmq, name), value)
        self.sock.connect(endpoint)
        self.got: dict[str, dict[int, bytearray]] = {}
        self.gaps: dict[str, dict[int, int]] = {}
        self.replies: dict[str, TaskReply] = {}
        self.session_replies: dict[str, SessionReply] = {}
        self.order: list = []  # ("out", task_id, stream, offset) / ("reply", id) / ("session", id), as received

    def close(self) -> None:
        self.sock.close(0)

    def send(self, message) -> None:
        self.sock.send_multipart(envelope.build(PROTOCOL_TAG, codec.encode(message)))

    def submit(self, task_id: str = "t", stream: bool = True, **fields) -> None:
        self.send(request(task_id, stream=stream, **fields))

    def open(self, request_id: str = "o", capabilities: tuple[bytes, ...] = (), idle_s: int = 0,
             max_life_s: int = 0, labels: tuple = (), egress_allow: tuple[bytes, ...] = ()) -> None:
        self.send(SessionOpen(request_id, capabilities, idle_s, max_life_s, labels, egress_allow))

    def close_session(self, session_id: str, request_id: str = "c") -> None:
        self.send(SessionClose(request_id, session_id))

    def list_sessions(self, request_id: str = "l") -> None:
        self.send(SessionList(request_id))

    def session_reply(self, request_id: str, timeout_s: float = 5.0) -> SessionReply:
        """Read until the SessionReply for `request_id`."""
        deadline = time.monotonic() + timeout_s
        while request_id not in self.session_replies:
            left = deadline - time.monotonic()
            assert left > 0, f"no SessionReply for {request_id!r}"
            self.recv(min(left, 0.2))
        return self.session_replies[request_id]

    def ack(self, task_id: str = "t") -> None:
        self.send(StreamAck(task_id, *self.offsets(task_id)))

    def stdin(self, data: bytes, eof: bool = False, task_id: str = "t") -> None:
        self.send(TaskStdin(task_id, data, eof))

    def attach(self, task_id: str = "t", offsets: tuple[int, int] | None = None) -> None:
        self.send(TaskAttach(task_id, *(offsets if offsets is not None else self.offsets(task_id))))

    def offsets(self, task_id: str = "t") -> tuple[int, int]:
        return tuple(len(self.got.get(task_id, {}).get(s, b"")) + self.gaps.get(task_id, {}).get(s, 0)
                     for s in (STDOUT, STDERR))

    def stream(self, stream: int, task_id: str = "t") -> bytes:
        return bytes(self.got.get(task_id, {}).get(stream, b""))

    def recv(self, timeout_s: float = 5.0, allow_gaps: bool = False):
        """The next frame, decoded and recorded; None if none came in time."""
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        message = codec.decode(envelope.parse(PROTOCOL_TAG, self.sock.recv_multipart()), DAEMON_TO_CLIENT)
        if isinstance(message, TaskOutput):
            got = self.got.setdefault(message.task_id, {STDOUT: bytearray(), STDERR: bytearray()})
            gaps = self.gaps.setdefault(message.task_id, {STDOUT: 0, STDERR: 0})
            have = len(got[message.stream]) + gaps[message.stream]
            assert message.task_id not in self.replies, f"output of {message.task_id!r} after its reply"
            assert message.offset >= have, f"{message.task_id} stream {message.stream}: offset " \
                                           f"{message.offset} repeats bytes (have {have})"
            assert allow_gaps or message.offset == have, f"{message.task_id} stream {message.stream}: " \
                                                         f"{message.offset - have} bytes lost before {message.offset}"
            gaps[message.stream] += message.offset - have
            got[message.stream] += message.data
            self.order.append(("out", message.task_id, message.stream, message.offset))
        elif isinstance(message, TaskReply):
            assert message.task_id not in self.replies, f"a second reply for {message.task_id!r}"
            self.replies[message.task_id] = message
            self.order.append(("reply", message.task_id))
        elif isinstance(message, SessionReply):
            assert message.request_id not in self.session_replies, f"a second reply for {message.request_id!r}"
            self.session_replies[message.request_id] = message
            self.order.append(("session", message.request_id))
        return message

    def read(self, quiet_s: float = 0.3, **kwargs) -> list:
        """Every frame until none came for `quiet_s`."""
        frames = []
        while (message := self.recv(quiet_s, **kwargs)) is not None:
            frames.append(message)
        return frames

    def read_to_reply(self, task_id: str = "t", timeout_s: float = 10.0, ack: bool = True, **kwargs) -> TaskReply:
        """Read (acknowledging as it goes) until the task's reply."""
        deadline = time.monotonic() + timeout_s
        while task_id not in self.replies:
            left = deadline - time.monotonic()
            assert left > 0, f"no reply for {task_id!r}; have {self.offsets(task_id)}"
            message = self.recv(min(left, 0.2), **kwargs)
            if ack and (message is None or isinstance(message, TaskOutput)):
                self.ack(task_id)
        return self.replies[task_id]


class Producer:
    """Stands in for the Supervisor of one task: tells Intake what a
    Supervisor would; `supervisor` records what the server tells it."""

    def __init__(self, directory: Directory, ticket: int):
        self.directory = directory
        self.ticket = ticket
        self.offsets = {STDOUT: 0, STDERR: 0}
        self.written = {STDOUT: bytearray(), STDERR: bytearray()}
        self.chunks: list[tuple[int, int]] = []  # (stream, offset) as told
        self.supervisor = Recorder.start()

    def start(self) -> None:
        self.directory.tell("intake", TaskStarted(self.ticket, self.supervisor))

    def out(self, data: bytes, stream: int = STDOUT) -> None:
        self.directory.tell("intake", OutputChunk(self.ticket, stream, self.offsets[stream], data))
        self.chunks.append((stream, self.offsets[stream]))
        self.offsets[stream] += len(data)
        self.written[stream] += data

    def answer(self, task_id: str = "t", **fields) -> None:
        reply = codec.replace(error_reply(task_id, "", ""), exit_code=0, outcome="completed")
        self.directory.answer(self.ticket, codec.replace(reply, **fields) if fields else reply)

    def told(self) -> list:
        return list(self.supervisor.proxy().seen.get())

    def holds(self) -> list[bool]:
        return [m.held for m in self.told() if isinstance(m, ReaderHold)]

    def stdin(self) -> list[tuple[bytes, bool]]:
        return [(m.data, m.eof) for m in self.told() if isinstance(m, StdinChunk)]


def submitted(scheduler, task_id: str, timeout_s: float = 5.0) -> Submit:
    """The Submit of task `task_id` (an open's claiming task has its request
    id), once it reached the recording Scheduler."""
    return wait_until(lambda: next((m for m in scheduler.proxy().seen.get() if m.task.request.task_id == task_id),
                                   None), timeout_s, f"task {task_id!r} at the Scheduler")


def started(directory: Directory, scheduler, task_id: str = "t") -> Producer:
    """The Producer of task `task_id` once it reached the Scheduler, started
    (TaskStarted told, as its Supervisor would)."""
    task = Producer(directory, submitted(scheduler, task_id).task.ticket)
    task.start()
    return task


def accepted(scheduler, count: int = 1) -> list[int]:
    """The tickets of the first `count` tasks that reached the Scheduler."""
    return [submit.task.ticket for submit in wait_for(scheduler, count)[:count]]
