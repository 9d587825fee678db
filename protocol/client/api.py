"""corral's client library: ``Client`` (tasks, sessions and status over
ZeroMQ), ``Session``, their errors, and CurveZMQ keys (``curve_keys``,
``keygen``). The ``corral`` command line built on it is protocol/client/cli.py.

Wire (protocol.wire.tasks): a DEALER socket sends [b"", PROTOCOL_TAG, payload]
(protocol.wire.envelope) and corrald's ROUTER answers the same way on the same
connection. Each TaskRequest gets exactly one TaskReply with the same task_id,
each StatusRequest one StatusReply with the same request_id, each
SessionOpen, SessionClose, SessionList, SessionPause, SessionResume and
SessionFork one SessionReply with the same request_id.

Sessions (``Client.session()``): a VM kept across execs, its files and
processes with it. An exec is a TaskRequest with session_id, so it is
answered, streamed and fed stdin exactly as a task; ``Session.put()`` and
``get()`` are execs of `true` that put or collect one file. A session can be
paused to disk (``pause()``: files and processes kept, its VM freed),
resumed (``resume()``) and forked into new sessions that start from its
state (``fork(n)``).

Threading: a zmq socket must be used by one thread only, so the DEALER belongs
to one background I/O thread. ``submit()`` may be called from any thread: it
encodes the request (bad arguments fail there, in the caller), registers a
Future under the request's id, appends the payload to an outbox and wakes the
I/O thread through an inproc PUSH socket (guarded by a lock). The I/O thread
sends requests, receives replies and resolves the Futures, so many tasks can
be in flight at once.

A task in flight when the connection to corrald drops (corrald crashed or
restarted, or dropped this connection) can no longer be answered: corrald's
ledger of who waits for what died with it or with the connection. Such a
task's Future resolves with error code `connection_lost` (its outcome is
unknown: it may or may not have run) instead of waiting forever.

Streams (``stream()``, ``attach()``): corrald sends a streaming task's output
as TaskOutput chunks, then its one TaskReply. The I/O thread hands each chunk
to the task's ``TaskStream`` (a deque under a Condition, never blocking the
I/O thread); the caller's thread iterates it and, as it consumes chunks,
sends StreamAck through the same outbox as requests (so do ``write()`` and
``close_stdin()`` with TaskStdin). corrald sends at most its window
(tasks.stream_window_bytes) beyond the acked offsets, and all it holds only
when it stops; a handle holds at most MAX_STREAM_HELD per stream, what one
plain reply may carry, and a server that sends more breaks the stream
(StreamBroken) instead of growing the client. The reply resolves the task's
Future after every chunk before it was handed over, and ends the iteration.

Replies are checked before they are believed: wrong framing or a payload that
does not decode is logged and dropped, a reply for an id nobody waits for is
ignored; neither stops the I/O thread.

CurveZMQ (docs/identities.md): given corrald's public key and a client key
pair, the DEALER connects as a Curve client. A refused handshake never
produces a reply, so the I/O thread watches the socket's monitor events and
fails every waiting Future with a HandshakeError whose code says why: key
not on corrald's allow-list, no key for a server that wants one, a key for a
server that wants none, or (most likely) the wrong server key. A connection
whose handshake failed never carried a request, so its end is not a
`connection_lost`.

Nobody there: ZeroMQ retries a failed connect in the background forever, so
the I/O thread watches for attempts that never reached a peer. The DEALER
queues a request only on a live connection (ZMQ_IMMEDIATE): until then it
stays in the outbox, and after a refused attempt everything in the outbox
fails with `reach.Unreachable` (code not_running or permission_denied) at
once, for ipc with the reason the socket file gives (protocol/client/reach.py). Such
a request was never sent, so it can never run later behind the caller's back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import os
import threading
import time
import uuid
from typing import Iterable, Iterator, Mapping, NamedTuple

import zmq

from protocol.wire import envelope, outcomes
from protocol.channel.errors import ProtocolError
from protocol.channel.codec import decode, encode, max_payload_size
from protocol.channel.constants import MAX_STDIN, MAX_STDIN_CHUNK, STDERR, STDOUT
from protocol.client.reach import NOT_RUNNING, Unreachable, ipc_path, probe, refused
from protocol.wire.tasks import (DAEMON_TO_CLIENT, MAX_FORKS, MAX_REPLY_OUTPUT, MAX_STREAM_CHUNK, PRIORITY_NAMES,
                                 PROTOCOL_TAG, ErrorCode, SessionClose, SessionFork, SessionList, SessionOpen,
                                 SessionPause, SessionReply, SessionResume, StatusReply, StatusRequest, StreamAck,
                                 TaskAttach, TaskOutput, TaskReply, TaskRequest, TaskStdin, error_reply,
                                 session_reply)

log = logging.getLogger("corral.client")

# Queued messages per direction before zmq pushes back. The daemon's own queue
# holds 1000 tasks; more than that waiting in our socket helps nobody (the
# overflow waits in the client's outbox until the socket takes it).
SOCKET_HWM = 1000
# A reply frame bigger than the largest valid reply is a broken peer: zmq
# drops the connection instead of allocating for it.
MAX_REPLY_FRAME = max_payload_size(DAEMON_TO_CLIENT)
# How long run() waits beyond the task's own timeout (queueing, VM acquire).
RUN_WAIT_MARGIN_S = 30.0
RUN_WAIT_DEFAULT_S = 120.0
# How long a session's open is waited for (it queues for a VM like a task),
# and its close (the close is answered once its VM is destroyed).
SESSION_OPEN_WAIT_S = 120.0
SESSION_CLOSE_WAIT_S = 60.0
# A pause saves the VM, a resume restores one, a fork does both, its
# restores one after another: seconds each under TCG, more under load.
SESSION_SNAPSHOT_WAIT_S = 300.0
START_HINT = "is it running? start it with scripts/run"
# corrald's default tasks.stream_window_bytes: how far it sends beyond the
# caller's acks. A client of a corrald configured otherwise is given its value.
DEFAULT_STREAM_WINDOW = 256 * 1024
# Output a TaskStream holds per stream, not yet handed to the caller, before
# it takes the server for broken. corrald keeps to its window, but when it
# stops it sends all it holds (its buffer, a few MiB): as much as one plain
# reply may carry per stream is allowed, so the client stays bounded.
MAX_STREAM_HELD = MAX_REPLY_OUTPUT

_TASK = "task"
_STATUS = "status"
_SESSION = "session"  # a session request (SessionOpen, SessionClose, ...), by request_id


class _Outgoing(NamedTuple):
    """A frame in the outbox; ``opens``: a task's or status request's first
    frame (TaskRequest, TaskAttach, StatusRequest), not a StreamAck or TaskStdin."""

    key: tuple[str, str]
    future: concurrent.futures.Future
    payload: bytes
    opens: bool


class ClientClosedError(RuntimeError):
    """The client was closed (or its I/O thread failed) before an answer came."""


class HandshakeError(ConnectionError):
    """corrald refused this connection at its handshake; `code` says why:
    key_refused, key_missing, curve_not_offered, server_key_mismatch or
    handshake_failed."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class SessionError(RuntimeError):
    """corrald answered a session request with an error (a SessionReply's, or
    for put() and get() their exec's): `code` is the ErrorCode
    (session_not_found, session_limit, session_lost, capability_denied, ...,
    or connection_lost when the connection dropped first)."""

    def __init__(self, code: str, message: str, retry_after_ms: int = 0):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.retry_after_ms = retry_after_ms


class SessionFileError(RuntimeError):
    """A file Session.get() asked for could not be collected: `error` is the
    guest's reason (no such file, not a regular file, too large, ...)."""

    def __init__(self, session_id: str, path: str | bytes, error: str):
        shown = os.fsdecode(path)
        super().__init__(f"cannot get {shown} from session {session_id}: {error}")
        self.path = shown
        self.error = error


class SessionInfo(NamedTuple):
    """One of the caller's sessions (Client.sessions())."""

    session_id: str
    labels: dict[str, str]
    age_s: float  # since its VM became its
    idle_s: float  # since its last exec was answered; 0 while one runs
    execs: int  # execs it ran
    state: str  # open, pausing, paused, resuming or closing


class StreamBroken(RuntimeError):
    """corrald sent more of a streaming task's output beyond what this client
    acked than a handle holds (MAX_STREAM_HELD, or the client's window and a
    chunk if larger): a server bug. The chunks from there on were dropped;
    the task's reply still comes through ``TaskStream.reply()``."""


class StreamChunk(NamedTuple):
    """A piece of a streaming task's output, as it arrived."""

    stream: int  # STDOUT (1) or STDERR (2)
    offset: int  # bytes of this stream before this chunk
    data: bytes


class TaskStream:
    """A streaming task (``Client.stream()`` or ``Client.attach()``).

    Iterate it for its output as ``StreamChunk``s, in the order corrald sent
    them; the iteration ends when the task's reply came (or the connection
    dropped: the reply is then connection_lost). What was consumed is acked
    to corrald, which sends at most its window beyond that, so a caller that
    stops reading holds the task up instead of filling memory: a chunk counts
    as consumed once the caller asks for the next one. ``reply()`` gives the
    TaskReply (stdout and stderr empty: they came as chunks), ``write()`` and
    ``close_stdin()`` feed a task submitted with stdin_open. Offsets the
    stream skipped (a reconnect found them no longer held) are counted in
    ``dropped`` per stream.
    """

    def __init__(self, client: Client, task_id: str, future: concurrent.futures.Future, *, stdin_open: bool,
                 stdin_sent: int = 0, stdout_offset: int = 0, stderr_offset: int = 0) -> None:
        self.task_id = task_id
        self._client = client
        self._future = future
        self._window = client.stream_window_bytes
        # Per stream: what corrald may send beyond our ack (its window and a
        # chunk, or what it holds when it stops).
        self._bound = max(MAX_STREAM_HELD, client.stream_window_bytes + MAX_STREAM_CHUNK)
        self._cond = threading.Condition()
        # Written by the I/O thread, read by the caller's, under _cond.
        self._chunks: collections.deque[StreamChunk] = collections.deque()
        self._queued = {STDOUT: 0, STDERR: 0}
        self._received = {STDOUT: stdout_offset, STDERR: stderr_offset}  # end of what arrived
        self._ended = False
        self._broken: str | None = None
        self.dropped = {STDOUT: 0, STDERR: 0}
        # The caller's side: the chunk last handed out, consumed offsets, unacked bytes.
        self._handed_out: StreamChunk | None = None
        self._consumed = dict(self._received)
        self._unacked = 0
        self._stdin_open = stdin_open
        self._stdin_lock = threading.Lock()  # keeps one write()'s frames together
        self._stdin_sent = stdin_sent
        self._stdin_closed = False
        future.add_done_callback(self._end)

    def __iter__(self) -> Iterator[StreamChunk]:
        return self.chunks()

    def chunks(self, wait_s: float | None = None) -> Iterator[StreamChunk]:
        """The output as it arrives; with ``wait_s``, TimeoutError (the task
        still in flight) unless the reply comes within that many seconds."""
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            chunk = self._next_chunk(deadline, wait_s)
            if chunk is None:
                return
            yield chunk

    def reply(self, wait_s: float | None = None) -> TaskReply:
        """The TaskReply, once it came (after every chunk); TimeoutError after
        ``wait_s`` without it (ask again, or ``abandon()``)."""
        try:
            return self._future.result(timeout=wait_s)
        except TimeoutError:
            if self._future.done():
                raise  # abandon()'s: the wait is over, not timed out
            raise TimeoutError(f"no answer from corrald at {self._client.endpoint} within {wait_s:g} s; "
                               f"{START_HINT}") from None

    def done(self) -> bool:
        """Whether the reply (or the end of waiting for it) came."""
        return self._future.done()

    def write(self, data: bytes) -> None:
        """More stdin for the command, sent in TaskStdin frames of at most
        64 KiB. After the task ended it is dropped (nobody reads it). Raises
        ValueError without stdin_open, after close_stdin(), or when all stdin
        of the task would pass MAX_STDIN."""
        data = bytes(memoryview(data))
        if not self._stdin_open:
            raise ValueError(f"task {self.task_id} was not submitted with stdin_open=True")
        with self._stdin_lock:
            if self._stdin_closed:
                raise ValueError(f"stdin of task {self.task_id} is already closed")
            if self._stdin_sent + len(data) > MAX_STDIN:
                raise ValueError(f"stdin of task {self.task_id} would pass the limit of {MAX_STDIN} bytes "
                                 f"({self._stdin_sent} sent, {len(data)} more)")
            for start in range(0, len(data), MAX_STDIN_CHUNK):
                piece = data[start:start + MAX_STDIN_CHUNK]
                self._client._send_frame(self._key, self._future,
                                         encode(TaskStdin(task_id=self.task_id, data=piece, eof=False)))
            self._stdin_sent += len(data)

    def close_stdin(self) -> None:
        """End the command's stdin (EOF); a second call does nothing."""
        if not self._stdin_open:
            raise ValueError(f"task {self.task_id} was not submitted with stdin_open=True")
        with self._stdin_lock:
            if self._stdin_closed:
                return
            self._stdin_closed = True
            self._client._send_frame(self._key, self._future,
                                     encode(TaskStdin(task_id=self.task_id, data=b"", eof=True)))

    @property
    def offsets(self) -> tuple[int, int]:
        """(stdout, stderr): bytes of each stream received so far. After a
        lost connection, ``attach(task_id, *offsets)`` goes on from there,
        nothing lost or repeated that corrald still holds."""
        with self._cond:
            return self._received[STDOUT], self._received[STDERR]

    @property
    def buffered(self) -> int:
        """Bytes of output arrived and not yet handed to the caller."""
        with self._cond:
            return sum(self._queued.values())

    @property
    def stdin_sent(self) -> int:
        """Bytes of stdin this handle gave the task (the request's included)."""
        return self._stdin_sent

    def abandon(self) -> None:
        """Stop waiting: the iteration ends, a late reply or chunk is ignored."""
        self._client._forget(self._key, self._future)

    def __repr__(self) -> str:
        return f"<TaskStream {self.task_id}{' done' if self.done() else ''}>"

    @property
    def _key(self) -> tuple[str, str]:
        return (_TASK, self.task_id)

    # --- the I/O thread's side ------------------------------------------------

    def _deliver(self, output: TaskOutput) -> None:
        """A chunk from corrald; never blocks."""
        stream, start, data = output.stream, output.offset, output.data
        with self._cond:
            if self._ended or self._broken is not None:
                return
            expected = self._received[stream]
            if start < expected:  # bytes we already have (a resend): only the rest is new
                data = data[expected - start:]
                start = expected
            elif start > expected:  # corrald no longer held these
                self.dropped[stream] += start - expected
            if not data:
                return
            if self._queued[stream] + len(data) > self._bound:
                self._broken = (f"corrald at {self._client.endpoint} sent task {self.task_id}'s "
                                f"{'stdout' if stream == STDOUT else 'stderr'} more than {self._bound} bytes "
                                "beyond what this client acked (its window is "
                                f"{self._window} bytes); the output from offset {start} on was dropped")
                log.warning("%s", self._broken)
                self._cond.notify_all()
                return
            self._chunks.append(StreamChunk(stream, start, data))
            self._queued[stream] += len(data)
            self._received[stream] = start + len(data)
            self._cond.notify_all()

    def _end(self, _future) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    # --- the caller's side ------------------------------------------------------

    def _next_chunk(self, deadline: float | None, wait_s: float | None) -> StreamChunk | None:
        with self._cond:
            last, self._handed_out = self._handed_out, None
            if last is not None:  # the caller is back for more: it consumed the last one
                self._consumed[last.stream] = last.offset + len(last.data)
                self._unacked += len(last.data)
            ack = None
            if self._unacked and (self._unacked >= self._window // 4 or not self._chunks):
                ack = StreamAck(task_id=self.task_id, stdout_offset=self._consumed[STDOUT],
                                stderr_offset=self._consumed[STDERR])
                self._unacked = 0
        if ack is not None:  # outside _cond: the client's lock is never taken under it
            self._client._send_frame(self._key, self._future, encode(ack))
        with self._cond:
            while not self._chunks:
                if self._broken is not None:
                    raise StreamBroken(self._broken)
                if self._ended:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no answer from corrald at {self._client.endpoint} within "
                                       f"{wait_s:g} s; {START_HINT}")
                self._cond.wait(remaining)
            chunk = self._chunks.popleft()
            self._queued[chunk.stream] -= len(chunk.data)
            self._handed_out = chunk
            return chunk


NO_DETAIL_FAILURES = 5  # handshakes failed in a row without a reason before the client gives one
MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)


def _z85_key(value: str | bytes | os.PathLike, what: str) -> bytes:
    """A Z85 public key given as such, or read from a certificate file."""
    if isinstance(value, (str, bytes)) and len(value) == 40 and not os.path.exists(value):
        return value.encode() if isinstance(value, str) else value
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {os.fsdecode(value)!r} is neither a Z85 key nor a readable "
                         f"certificate file: {exc}") from None
    return public


def curve_keys(server_key, client_key) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) Z85 keys. `server_key`:
    corrald's public key or its .key file; `client_key`: the client's
    .key_secret file (corral keygen) or a (public, secret) pair."""
    if (server_key is None) != (client_key is None):
        raise ValueError("CurveZMQ needs both the server's public key and a client key pair")
    server_public = _z85_key(server_key, "server key")
    if isinstance(client_key, tuple):
        public, secret = (k.encode() if isinstance(k, str) else k for k in client_key)
    else:
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(client_key)
        except (OSError, ValueError) as exc:
            raise ValueError(f"client key {os.fsdecode(client_key)!r} cannot be read: {exc}") from None
        if secret is None:
            raise ValueError(f"client key {os.fsdecode(client_key)!r} holds no secret key: give the "
                             ".key_secret file corral keygen wrote")
    return server_public, public, secret


def keygen(name: str, directory: str | os.PathLike = ".") -> tuple[str, str]:
    """Write NAME.key (public, 0644) and NAME.key_secret (secret, 0600) in
    pyzmq's certificate format; never overwrites. Returns both paths."""
    import zmq.auth

    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or not name[0].isalnum():
        raise ValueError(f"key name {name!r} must be letters, digits, '-', '_' or '.'")
    os.makedirs(directory, exist_ok=True)
    public_path, secret_path = (os.path.join(directory, name + suffix) for suffix in (".key", ".key_secret"))
    for path in (public_path, secret_path):
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists; remove it first to replace the key")
    # The umask makes the secret file 0600 from its creation on, not after a chmod.
    old_umask = os.umask(0o077)
    try:
        zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old_umask)
    os.chmod(public_path, 0o644)
    os.chmod(secret_path, 0o600)
    return public_path, secret_path


def _default_endpoint(config_path) -> str:
    import config  # here, so importing the client does not read any file

    return config.load(config_path).daemon.endpoint


def _as_bytes(value: str | bytes | os.PathLike, what: str) -> bytes:
    if isinstance(value, (str, bytes, os.PathLike)):
        return os.fsencode(value)
    raise TypeError(f"{what} must be str or bytes, got {type(value).__name__}")


def _priority_value(priority: str | int) -> int:
    if isinstance(priority, str) and priority.lower() in PRIORITY_NAMES:
        return PRIORITY_NAMES[priority.lower()]
    if isinstance(priority, int) and not isinstance(priority, bool) and priority in PRIORITY_NAMES.values():
        return priority
    raise ValueError(f"priority {priority!r} is not one of {', '.join(PRIORITY_NAMES)}")


def _env_pairs(env: Mapping | Iterable | None) -> tuple[tuple[bytes, bytes], ...]:
    if env is None:
        return ()
    items = env.items() if isinstance(env, Mapping) else env
    return tuple((_as_bytes(key, "env key"), _as_bytes(value, "env value")) for key, value in items)


def _whole_seconds(value: int | None, what: str) -> int:
    """Seconds as the wire carries them (0: corrald's default)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
    return math.ceil(value)


def _label_pairs(labels: Mapping | Iterable | None) -> tuple[tuple[bytes, bytes], ...]:
    if labels is None:
        return ()
    items = labels.items() if isinstance(labels, Mapping) else labels
    return tuple((_as_bytes(key, "label key"), _as_bytes(value, "label value")) for key, value in items)


def _parse_labels(lines: bytes) -> dict[str, str]:
    """A listing's labels, k=v lines, as a dict."""
    labels = {}
    for line in lines.decode("utf-8", errors="replace").splitlines():
        key, _, value = line.partition("=")
        labels[key] = value
    return labels


class Session:
    """A session of this client's identity: ``Client.session()`` opens one,
    ``Session(client, session_id)`` takes up one opened before (by this
    identity: to any other it does not exist). As a context manager it
    closes the session on the way out.

    ``exec()`` runs a command in the session's VM, where files and processes
    of earlier execs are still there; ``put()`` and ``get()`` copy a file in
    or out between execs. Each is answered like a task, and an exec in a
    session that is no longer open is answered session_not_found (one that
    was open when it began and ended under it: session_lost).
    """

    def __init__(self, client: Client, session_id: str) -> None:
        self.client = client
        self.session_id = session_id
        self.closed = False

    def exec(self, argv: Iterable[str | bytes], *, stream: bool = False, stdin: bytes = b"",
             stdin_open: bool = False, timeout_s: float | None = None, wait_s: float | None = None,
             **task_args) -> TaskReply | TaskStream:
        """Run ``argv`` in the session: its TaskReply, or with ``stream`` a
        TaskStream (output as it comes; ``stdin_open`` to feed it with
        ``write()``). Other arguments as ``Client.submit()`` (env, cwd,
        output_cap, files_in, collect, task_id, priority); ``wait_s`` as
        ``Client.run()``. A refused or failed exec is a reply with its
        error_code, as for a task."""
        if stream:
            if wait_s is not None:
                raise ValueError("wait_s is for exec() without stream: give a TaskStream's chunks() or "
                                 "reply() a wait instead")
            return self.client.stream(argv, stdin=stdin, stdin_open=stdin_open, timeout_s=timeout_s,
                                      session_id=self.session_id, **task_args)
        if stdin_open:
            raise ValueError("stdin_open needs stream=True (the TaskStream's write() feeds it)")
        return self.client.run(argv, stdin=stdin, timeout_s=timeout_s, wait_s=wait_s,
                               session_id=self.session_id, **task_args)

    def put(self, path: str | bytes, data: bytes, mode: int = 0o644, *, timeout_s: float | None = None) -> None:
        """Write ``data`` to ``path`` in the session's VM, as the task user
        (SessionError put_failed if the guest cannot, with its reason)."""
        self._checked(self.exec(["true"], files_in=[(path, data, mode)], timeout_s=timeout_s))

    def get(self, path: str | bytes, *, timeout_s: float | None = None) -> bytes:
        """The content of file ``path`` in the session's VM; SessionFileError
        naming the guest's reason when it cannot be collected."""
        reply = self._checked(self.exec(["true"], collect=[path], timeout_s=timeout_s))
        if not reply.files_out:
            raise SessionFileError(self.session_id, path, "corrald returned no file")
        _, error, data, _ = reply.files_out[0]
        if error:
            raise SessionFileError(self.session_id, path, error)
        return data

    def close(self, wait_s: float = SESSION_CLOSE_WAIT_S) -> bool:
        """Close the session: its VM is destroyed (an exec still running in
        it is answered session_lost). False if it was not open any more
        (ended by its idle time or lifetime, or closed before); other errors
        raise SessionError."""
        try:
            self.client.close_session(self.session_id, wait_s)
        except SessionError as exc:
            if exc.code != ErrorCode.SESSION_NOT_FOUND:
                raise
            self.closed = True
            return False
        self.closed = True
        return True

    def pause(self, wait_s: float = SESSION_SNAPSHOT_WAIT_S) -> None:
        """Pause the session to disk: its VM's memory (files, processes) is
        saved and the VM freed; execs are refused session_paused until
        ``resume()``. SessionError session_busy while an exec runs in it."""
        self.client.pause_session(self.session_id, wait_s)

    def resume(self, wait_s: float = SESSION_SNAPSHOT_WAIT_S) -> None:
        """Resume the paused session in a VM restored from its snapshot."""
        self.client.resume_session(self.session_id, wait_s)

    def fork(self, count: int = 1, wait_s: float = SESSION_SNAPSHOT_WAIT_S) -> list[Session]:
        """``count`` new sessions of this client, each starting from this
        session's state now (see ``Client.fork_session()``)."""
        return [Session(self.client, session_id)
                for session_id in self.client.fork_session(self.session_id, count, wait_s)]

    def _checked(self, reply: TaskReply) -> TaskReply:
        if reply.error_code:
            raise SessionError(reply.error_code, reply.error_message, reply.retry_after_ms)
        return reply

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.close()
            return
        try:  # the error on the way out is the one the caller needs to see
            self.close()
        except Exception as close_error:
            log.warning("session %s was not closed (%s); its idle time will end it", self.session_id, close_error)

    def __repr__(self) -> str:
        return f"<Session {self.session_id}{' closed' if self.closed else ''}>"


class Client:
    """A connection to corrald; safe to share between threads.

    ``submit()`` returns a ``concurrent.futures.Future`` resolved with the
    TaskReply (or failed with ClientClosedError). Done-callbacks run on the
    I/O thread: keep them short, or every other reply waits for them.
    ``stream()`` returns a ``TaskStream``: the output as it comes, stdin to
    feed, then the reply. ``stream_window_bytes``: corrald's
    tasks.stream_window_bytes, when not the default.
    """

    def __init__(self, endpoint: str | None = None, *, config_path=None, server_key=None,
                 client_key=None, stream_window_bytes: int = DEFAULT_STREAM_WINDOW) -> None:
        if not (isinstance(stream_window_bytes, int) and stream_window_bytes > 0):
            raise ValueError(f"stream_window_bytes must be a positive number of bytes, got {stream_window_bytes!r}")
        self.stream_window_bytes = stream_window_bytes
        self.endpoint = endpoint if endpoint is not None else _default_endpoint(config_path)
        # Bad key arguments fail here, in the caller (see curve_keys).
        self._curve = None if server_key is None and client_key is None else curve_keys(server_key, client_key)
        self._failures_without_detail = 0  # handshakes failed in a row without a reason (I/O thread)
        self._handshaken = False  # the connection is up: its end loses what was in flight (I/O thread)
        # The last handshake's verdict, kept: libzmq may not try again after a
        # refusal, so a request made after the failure event gets it too (I/O thread).
        self._handshake_refused: HandshakeError | None = None
        # Whether the current connect attempt reached a peer, and whether the
        # last one was refused (nobody listening, no permission) (I/O thread).
        self._attempt_reached_peer = False
        self._last_attempt_refused = False
        self._lock = threading.Lock()  # guards _pending, _streams, _closed and _handoff
        self._pending: dict[tuple[str, str], concurrent.futures.Future] = {}
        # The streaming tasks among _pending: where their chunks go. An entry
        # leaves with its Future's (whoever pops one pops both).
        self._streams: dict[tuple[str, str], TaskStream] = {}
        # Frames for the I/O thread, oldest first; it also holds those the
        # DEALER has no room for yet (daemon down or slow).
        self._outbox: collections.deque[_Outgoing] = collections.deque()
        self._closed = False
        self._context = zmq.Context()
        try:
            self._dealer = self._context.socket(zmq.DEALER)
            self._dealer.setsockopt(zmq.LINGER, 0)
            self._dealer.setsockopt(zmq.SNDHWM, SOCKET_HWM)
            self._dealer.setsockopt(zmq.RCVHWM, SOCKET_HWM)
            self._dealer.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_FRAME)
            # Requests wait in the outbox, not in a pipe to nobody: one failed as
            # unreachable must not go out when corrald starts later.
            self._dealer.setsockopt(zmq.IMMEDIATE, 1)
            if self._curve is not None:
                self._dealer.setsockopt(zmq.CURVE_SERVERKEY, self._curve[0])
                self._dealer.setsockopt(zmq.CURVE_PUBLICKEY, self._curve[1])
                self._dealer.setsockopt(zmq.CURVE_SECRETKEY, self._curve[2])
            # Before connect, so no handshake's outcome is missed; used by the I/O thread.
            self._monitor = self._dealer.get_monitor_socket(MONITOR_EVENTS)
            self._dealer.connect(self.endpoint)  # a bad endpoint fails here, in the caller
            # Wake-ups for the I/O thread. Unbounded: submit() must never block
            # on them, and the I/O thread drains them at once.
            handoff_address = f"inproc://corral-client-{uuid.uuid4().hex}"
            self._inbox = self._context.socket(zmq.PULL)
            self._inbox.setsockopt(zmq.LINGER, 0)
            self._inbox.setsockopt(zmq.RCVHWM, 0)
            self._inbox.bind(handoff_address)
            self._handoff = self._context.socket(zmq.PUSH)
            self._handoff.setsockopt(zmq.LINGER, 0)
            self._handoff.setsockopt(zmq.SNDHWM, 0)
            self._handoff.connect(handoff_address)
        except BaseException:
            self._context.destroy(linger=0)
            raise
        # Sockets made here are used only by the I/O thread from now on;
        # Thread.start() is the memory barrier zmq asks for when a socket moves.
        self._io_thread = threading.Thread(target=self._io_main, name=f"corral-client {self.endpoint}",
                                           daemon=True)
        self._io_thread.start()

    # --- public API ---------------------------------------------------------

    def submit(self, argv: Iterable[str | bytes], *, priority: str | int = "normal",
               capabilities: Iterable[str | bytes] = (), env: Mapping | Iterable | None = None,
               cwd: str | bytes = b"", stdin: bytes = b"", timeout_s: float | None = None,
               output_cap: int = 0, task_id: str | None = None,
               files_in: Iterable[tuple[str | bytes, bytes, int]] = (),
               collect: Iterable[str | bytes] = (),
               egress_allow: Iterable[str | bytes] = (), session_id: str = "") -> concurrent.futures.Future:
        """Send one task; the Future resolves with its TaskReply.

        ``files_in``: (guest path, data, mode) written as the task user before
        the run; ``collect``: guest paths read after it, returned in the
        reply's ``files_out`` as (path, error, data, receipt). ``egress_allow``:
        with capability net:egress, where the task may connect (docs/egress.md).
        ``session_id``: run it as an exec in that open session (no
        capabilities or egress rules: the session's apply; see ``session()``).

        Raises TypeError/ValueError for arguments the protocol cannot carry,
        ValueError for a task_id already in flight, ClientClosedError after close().
        The Future fails at once with reach.Unreachable (code not_running or
        permission_denied) when corrald cannot be reached: nothing was sent.
        """
        request = self._task_request(argv, priority=priority, capabilities=capabilities, env=env, cwd=cwd,
                                     stdin=stdin, timeout_s=timeout_s, output_cap=output_cap, task_id=task_id,
                                     files_in=files_in, collect=collect, egress_allow=egress_allow,
                                     session_id=session_id)
        return self._send((_TASK, request.task_id), encode(request))

    def stream(self, argv: Iterable[str | bytes], *, stdin: bytes = b"", stdin_open: bool = False,
               **submit_args) -> TaskStream:
        """Send one task whose output comes while it runs: iterate the
        returned TaskStream for it, then take ``reply()``. ``stdin`` goes with
        the request; with ``stdin_open`` more follows through ``write()``
        until ``close_stdin()`` (MAX_STDIN in all). Other arguments and errors
        as ``submit()``; an unreachable corrald ends the iteration at once and
        ``reply()`` raises reach.Unreachable."""
        request = self._task_request(argv, stdin=stdin, stream=True, stdin_open=stdin_open, **submit_args)
        return self._send_stream(request.task_id, encode(request), stdin_open=stdin_open,
                                 stdin_sent=len(request.stdin))

    def attach(self, task_id: str, stdout_offset: int = 0, stderr_offset: int = 0) -> TaskStream:
        """Take up, on this connection, a streaming task sent on one that was
        lost (same identity): its output from these offsets, as far as
        corrald still holds it (what it no longer holds is counted in the
        handle's ``dropped``), then its reply. A task corrald does not know
        for this identity is answered unknown_task. ``write()`` is allowed:
        corrald ignores stdin for a task not submitted with stdin_open."""
        attach = TaskAttach(task_id=task_id, stdout_offset=stdout_offset, stderr_offset=stderr_offset)
        return self._send_stream(task_id, encode(attach), stdin_open=True, stdout_offset=stdout_offset,
                                 stderr_offset=stderr_offset)

    def _task_request(self, argv: Iterable[str | bytes], *, priority: str | int = "normal",
                      capabilities: Iterable[str | bytes] = (), env: Mapping | Iterable | None = None,
                      cwd: str | bytes = b"", stdin: bytes = b"", timeout_s: float | None = None,
                      output_cap: int = 0, task_id: str | None = None,
                      files_in: Iterable[tuple[str | bytes, bytes, int]] = (),
                      collect: Iterable[str | bytes] = (), egress_allow: Iterable[str | bytes] = (),
                      stream: bool = False, stdin_open: bool = False, session_id: str = "") -> TaskRequest:
        """The TaskRequest; bad arguments fail here (or in encode()), in the caller."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of arguments, not one string")
        capabilities, egress_allow = tuple(capabilities), tuple(egress_allow)
        if session_id and (capabilities or egress_allow):
            raise ValueError("an exec in a session takes no capabilities or egress rules: the session's, "
                             "fixed when it opened, apply")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        if task_id is None:
            task_id = uuid.uuid4().hex[:16]
        request = TaskRequest(
            task_id=task_id,
            priority=_priority_value(priority),
            argv=tuple(_as_bytes(arg, "argv item") for arg in argv),
            env=_env_pairs(env),
            cwd=_as_bytes(cwd, "cwd"),
            stdin=bytes(memoryview(stdin)),  # bytes-like only (bytes(5) is five NULs)
            timeout_ms=0 if timeout_s is None else max(1, round(timeout_s * 1000)),  # 0: daemon default
            output_cap=output_cap,
            capabilities=tuple(_as_bytes(cap, "capability") for cap in capabilities),
            files_in=tuple((_as_bytes(path, "file path"), mode, bytes(memoryview(data)))
                           for path, data, mode in files_in),
            collect=tuple(_as_bytes(path, "collect path") for path in collect),
            stream=stream, stdin_open=stdin_open,
            egress_allow=tuple(_as_bytes(rule, "egress rule") for rule in egress_allow),
            session_id=session_id)
        return request

    def run(self, argv: Iterable[str | bytes], *, wait_s: float | None = None,
            timeout_s: float | None = None, task_id: str | None = None, **submit_args) -> TaskReply:
        """Submit one task and wait for its reply.

        ``wait_s`` defaults to timeout_s + 30 s (120 s without a timeout); on
        expiry TimeoutError names the endpoint, and a late reply is dropped.
        """
        if wait_s is None:
            wait_s = RUN_WAIT_DEFAULT_S if timeout_s is None else timeout_s + RUN_WAIT_MARGIN_S
        if task_id is None:
            task_id = uuid.uuid4().hex[:16]
        future = self.submit(argv, timeout_s=timeout_s, task_id=task_id, **submit_args)
        return self._wait((_TASK, task_id), future, wait_s)

    def session(self, caps: Iterable[str | bytes] = (), *, idle_s: int | None = None, life_s: int | None = None,
                labels: Mapping | Iterable | None = None, egress_allow: Iterable[str | bytes] = (),
                wait_s: float = SESSION_OPEN_WAIT_S) -> Session:
        """Open a session: a VM with capabilities ``caps`` (fixed for its
        life) kept for this identity across execs, closed after ``idle_s``
        seconds without an exec or ``life_s`` after it opened (None:
        corrald's defaults, sessions.default_idle_s and default_life_s).
        ``labels``: key=value pairs its listings show. ``egress_allow``: with
        net:egress, where its execs may connect.

        Waits up to ``wait_s`` for the open (it queues for a VM like a task);
        raises SessionError with corrald's code if refused (session_limit,
        capability_denied, busy, ...), TimeoutError if no answer came (a
        session opened after that is closed by its idle time). Use the
        Session as a context manager to close it on the way out."""
        request = SessionOpen(
            request_id=uuid.uuid4().hex[:16],
            capabilities=tuple(_as_bytes(cap, "capability") for cap in caps),
            idle_s=_whole_seconds(idle_s, "idle_s"), max_life_s=_whole_seconds(life_s, "life_s"),
            labels=_label_pairs(labels),
            egress_allow=tuple(_as_bytes(rule, "egress rule") for rule in egress_allow))
        reply = self._session_call(request, wait_s)
        return Session(self, reply.session_id)

    def sessions(self, wait_s: float = 5) -> list[SessionInfo]:
        """This identity's sessions (open, paused, ...: SessionInfo.state),
        oldest first (another identity's are never shown)."""
        reply = self._session_call(SessionList(request_id=uuid.uuid4().hex[:16]), wait_s)
        return [SessionInfo(session_id, _parse_labels(labels), age_ms / 1000, idle_ms / 1000, execs, state)
                for session_id, labels, age_ms, idle_ms, execs, state in reply.sessions]

    def close_session(self, session_id: str, wait_s: float = SESSION_CLOSE_WAIT_S) -> None:
        """Close this identity's session ``session_id`` once its VM is
        destroyed (an exec still running in it is answered session_lost).
        SessionError session_not_found if it is not open (closed already,
        ended by its idle time or lifetime, or never this identity's)."""
        self._session_call(SessionClose(request_id=uuid.uuid4().hex[:16], session_id=session_id), wait_s)

    def pause_session(self, session_id: str, wait_s: float = SESSION_SNAPSHOT_WAIT_S) -> None:
        """Pause this identity's session ``session_id`` to disk, answered
        once its VM is saved and gone (a paused session is answered at
        once). SessionError session_busy while an exec runs in it (or it is
        being paused, resumed or forked), session_not_found if it is not
        this identity's, session_lost if the save failed (the session ended)."""
        self._session_call(SessionPause(request_id=uuid.uuid4().hex[:16], session_id=session_id), wait_s)

    def resume_session(self, session_id: str, wait_s: float = SESSION_SNAPSHOT_WAIT_S) -> None:
        """Resume this identity's paused session ``session_id``: answered once
        execs can run in it again, in a VM restored from its snapshot (an
        open session is answered at once). SessionError session_lost if the
        restore failed (the session ended)."""
        self._session_call(SessionResume(request_id=uuid.uuid4().hex[:16], session_id=session_id), wait_s)

    def fork_session(self, session_id: str, count: int = 1, wait_s: float = SESSION_SNAPSHOT_WAIT_S) -> list[str]:
        """Fork this identity's open or paused session ``session_id`` into
        ``count`` (1..MAX_FORKS) new sessions, each starting from its state
        now with randomness, clock and VM of its own; the ids of the new
        ones. All or none: SessionError (session_limit, session_busy,
        session_lost, ...) and no new session is left."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORKS:
            raise ValueError(f"count must be a whole number from 1 to {MAX_FORKS}, not {count!r}")
        reply = self._session_call(SessionFork(request_id=uuid.uuid4().hex[:16], session_id=session_id,
                                               count=count), wait_s)
        return [record[0] for record in reply.sessions]

    def _session_call(self, request, wait_s: float) -> SessionReply:
        """Send a session request and wait for its SessionReply; SessionError if it says one."""
        key = (_SESSION, request.request_id)
        reply = self._wait(key, self._send(key, encode(request)), wait_s)
        if reply.error_code:
            raise SessionError(reply.error_code, reply.error_message, reply.retry_after_ms)
        return reply

    def status(self, wait_s: float = 5) -> StatusReply:
        """Queue depth per priority, pool VMs per state, task counts."""
        key = (_STATUS, uuid.uuid4().hex[:16])
        future = self._send(key, encode(StatusRequest(request_id=key[1])))
        return self._wait(key, future, wait_s)

    def close(self) -> None:
        """Stop the I/O thread; every Future still waiting fails with ClientClosedError."""
        with self._lock:
            self._closed = True
            if self._handoff is not None:
                self._handoff.send(b"stop")  # after every request already handed off
        if threading.current_thread() is self._io_thread:
            return  # called from a done-callback: the thread ends once it returns
        self._io_thread.join()
        with self._lock:
            handoff, self._handoff = self._handoff, None
        if handoff is not None:  # only the first close() tears down
            handoff.close()
            self._context.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self.endpoint} in flight={len(self._pending)}{' closed' if self._closed else ''}>"

    # --- caller side ----------------------------------------------------------

    @staticmethod
    def _new_future() -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        # Running: a caller's cancel() cannot race the I/O thread's set_result
        # (the daemon has no cancel; abandon a task by not waiting for it).
        future.set_running_or_notify_cancel()
        return future

    def _send(self, key: tuple[str, str], payload: bytes) -> concurrent.futures.Future:
        future = self._new_future()
        self._register(key, future, payload)
        return future

    def _send_stream(self, task_id: str, payload: bytes, **handle_args) -> TaskStream:
        future = self._new_future()
        stream = TaskStream(self, task_id, future, **handle_args)
        self._register((_TASK, task_id), future, payload, stream)
        return stream

    def _register(self, key: tuple[str, str], future: concurrent.futures.Future, payload: bytes,
                  stream: TaskStream | None = None) -> None:
        """Wait for ``key``'s answer and hand its first frame to the I/O thread."""
        with self._lock:
            if self._closed:
                raise ClientClosedError(f"client for {self.endpoint} is closed")
            if key in self._pending:
                raise ValueError(f"{key[0]} id {key[1]!r} is already in flight")
            self._pending[key] = future
            if stream is not None:
                self._streams[key] = stream
            self._outbox.append(_Outgoing(key, future, payload, opens=True))
            # Under the lock: callers share this socket.
            self._handoff.send(b"")

    def _send_frame(self, key: tuple[str, str], future: concurrent.futures.Future, payload: bytes) -> bool:
        """A further frame of a task still waited for (StreamAck, TaskStdin),
        after its request; False, and dropped, once it is not (answered,
        abandoned, lost, or the client closed)."""
        with self._lock:
            if self._closed or self._pending.get(key) is not future:
                return False
            self._outbox.append(_Outgoing(key, future, payload, opens=False))
            self._handoff.send(b"")
        return True

    def _wait(self, key: tuple[str, str], future: concurrent.futures.Future, wait_s: float):
        try:
            return future.result(timeout=wait_s)
        except TimeoutError:
            if not self._forget(key, future):
                return future.result()  # the reply won the race with the deadline
            raise TimeoutError(f"no answer from corrald at {self.endpoint} within {wait_s:g} s; "
                               f"{START_HINT}") from None

    def _forget(self, key: tuple[str, str], future: concurrent.futures.Future) -> bool:
        """Stop waiting for ``key``; False if its reply already arrived."""
        with self._lock:
            if self._pending.get(key) is not future:
                return False
            del self._pending[key]
            self._streams.pop(key, None)
        future.set_exception(TimeoutError(f"abandoned: no answer from corrald at {self.endpoint}"))
        return True

    def _take(self, key: tuple[str, str]) -> concurrent.futures.Future | None:
        # Whoever pops a Future is the only one to resolve it.
        with self._lock:
            self._streams.pop(key, None)
            return self._pending.pop(key, None)

    # --- the I/O thread -------------------------------------------------------

    def _io_main(self) -> None:
        failure: BaseException | None = None
        try:
            self._io_loop()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("corral client I/O thread failed")
            failure = exc
        finally:
            self._dealer.close()
            self._inbox.close()
            with self._lock:
                self._closed = True
                orphans = list(self._pending.items())
                self._pending.clear()
                self._streams.clear()
            for (kind, ident), future in orphans:
                reason = f"I/O thread failed: {failure!r}" if failure else "client closed"
                future.set_exception(ClientClosedError(
                    f"{reason} before corrald at {self.endpoint} answered {kind} {ident}"))

    def _io_loop(self) -> None:
        monitor = self._monitor
        poller = zmq.Poller()
        poller.register(self._inbox, zmq.POLLIN)
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                poller.modify(self._dealer, zmq.POLLIN | (zmq.POLLOUT if self._outbox else 0))
                events = dict(poller.poll())
                if self._inbox in events and not self._drain_wakeups():
                    return
                if events.get(self._dealer, 0) & zmq.POLLIN:
                    self._receive_replies()
                if monitor in events:
                    self._monitor_events(monitor)
                self._flush_outbox()
        finally:
            self._dealer.disable_monitor()
            monitor.close()

    def _monitor_events(self, monitor) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while monitor.poll(0):
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_CONNECT_RETRIED:
                # Scheduled after each attempt: one that met nobody was refused.
                if not self._attempt_reached_peer:
                    self._last_attempt_refused = True
                    self._fail_unsent()
                self._attempt_reached_peer = False
            elif event["event"] == zmq.EVENT_CONNECTED:
                self._attempt_reached_peer = True
                self._last_attempt_refused = False
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = True
                self._handshake_refused = None
                self._failures_without_detail = 0
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._attempt_reached_peer = True
                if self._handshaken:  # a connection that failed its handshake carried nothing
                    self._handshaken = False
                    # libzmq queued what the connection brought before reporting its
                    # end: replies read now are answers, not connection_lost.
                    self._receive_replies()
                    self._connection_dropped()
            else:
                self._handshake_failed(event)

    def _handshake_failed(self, event: dict) -> None:
        """Fail every waiting Future with the reason, once it is known."""
        error = self._handshake_error(event)
        if error is None:
            return
        self._handshake_refused = error
        with self._lock:
            waiting = list(self._pending.values())
            self._pending.clear()
            self._streams.clear()
        log.debug("handshake with %s failed (%s); failing %d waiting", self.endpoint, error.code, len(waiting))
        for future in waiting:
            future.set_exception(error)

    def _handshake_error(self, event: dict) -> HandshakeError | None:
        """The error an event means, or None while it is not known yet."""
        kind, value, where = event["event"], event["value"], f"corrald at {self.endpoint}"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # The peer hung up without saying why. Without keys that can only be
            # a server wanting a mechanism we lack (it closed before its ERROR was
            # read). With keys, a Curve server that cannot open our HELLO (wrong
            # server key) always does so, and a server without Curve sometimes
            # does before it says so on a later attempt (libzmq reconnects every
            # 100 ms): wait for a few.
            if self._curve is None:
                return self._key_missing(where)
            self._failures_without_detail += 1
            if self._failures_without_detail < NO_DETAIL_FAILURES:
                return None
            return HandshakeError("server_key_mismatch", f"the CurveZMQ handshake with {where} failed "
                                  f"{NO_DETAIL_FAILURES} times without a reason: most likely the server "
                                  "key given is not corrald's public key (or corrald runs without CurveZMQ)")
        self._failures_without_detail = 0
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return HandshakeError("key_refused", f"{where} refused this client's key "
                                  f"{self._curve[1].decode() if self._curve else ''} (status {value}): it is "
                                  "not on corrald's allow-list (identity.client_keys_dir or identity.clients)")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self._curve is None:
                return self._key_missing(where)
            return HandshakeError("curve_not_offered", f"{where} does not use CurveZMQ: connect without "
                                  "--server-key and --key")
        return HandshakeError("handshake_failed", f"the handshake with {where} failed "
                              f"(zmq event {kind:#x}, value {value:#x})")

    @staticmethod
    def _key_missing(where: str) -> HandshakeError:
        return HandshakeError("key_missing", f"{where} requires CurveZMQ: connect with its public key "
                              "and a client key pair (--server-key FILE --key FILE; see corral keygen)")

    def _connection_dropped(self) -> None:
        """Everything sent and not answered is lost with the connection."""
        # A task whose first frame still waits here was never sent: it waits
        # for the next connection. Any further frame of a lost one is dropped
        # when its turn comes (its Future no longer waits).
        unsent = {outgoing.key for outgoing in self._outbox if outgoing.opens}
        with self._lock:
            lost = [(key, future) for key, future in self._pending.items() if key not in unsent]
            for key, _ in lost:
                del self._pending[key]
                self._streams.pop(key, None)
        text = (f"the connection to corrald at {self.endpoint} dropped while this was in flight "
                "(corrald stopped or restarted?); its outcome is unknown: resubmit if needed")
        for (kind, ident), future in lost:
            if kind == _TASK:
                future.set_result(error_reply(ident, ErrorCode.CONNECTION_LOST, text, outcome=outcomes.UNKNOWN))
            elif kind == _SESSION:
                future.set_result(session_reply(ident, error_code=ErrorCode.CONNECTION_LOST, error_message=text))
            else:
                future.set_exception(ClientClosedError(text))

    def _fail_unsent(self) -> None:
        """After a refused connect: fail what waits in the outbox, with the
        reason an ipc socket file gives (none if corrald is there by now)."""
        if ipc_path(self.endpoint) is None:
            error = refused(self.endpoint)
        else:
            try:
                probe(self.endpoint)
                return  # it listens now: the next attempt will connect
            except Unreachable as exc:
                error = exc
        if error.code == NOT_RUNNING:
            error = Unreachable(error.code, f"{error}: start it with scripts/run")
        outbox = self._outbox
        while outbox:
            key, future, _, _ = outbox.popleft()
            if self._take(key) is future:
                future.set_exception(error)

    def _drain_wakeups(self) -> bool:
        """Consume wake-ups; False once close() asks to stop."""
        while True:
            try:
                if self._inbox.recv(zmq.NOBLOCK) == b"stop":
                    return False
            except zmq.Again:
                return True

    def _flush_outbox(self) -> None:
        # Only this thread pops; callers append. Both are atomic on a deque.
        outbox = self._outbox
        if outbox and self._last_attempt_refused and ipc_path(self.endpoint) is not None:
            self._fail_unsent()  # check the socket file now, not at the next attempt
        if self._handshake_refused is not None:
            while outbox:
                key, future, _, _ = outbox.popleft()
                if self._take(key) is future:
                    future.set_exception(self._handshake_refused)
            return
        while outbox:
            key, future, payload, _ = outbox[0]
            if self._pending.get(key) is not future:
                outbox.popleft()  # abandoned (run() gave up) or over before it left: do not send
                continue
            try:
                self._dealer.send_multipart(envelope.build(PROTOCOL_TAG, payload), zmq.NOBLOCK)
            except zmq.Again:
                return  # the DEALER is full; POLLOUT says when to go on
            outbox.popleft()

    def _receive_replies(self) -> None:
        # Bounded per round so a flood of replies cannot starve new requests.
        for _ in range(SOCKET_HWM):
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle_reply(frames)
            except Exception:  # one bad reply must not end the client
                log.exception("corral client: failed to handle a reply from %s", self.endpoint)

    def _handle_reply(self, frames: list[bytes]) -> None:
        try:
            reply = decode(envelope.parse(PROTOCOL_TAG, frames), DAEMON_TO_CLIENT)
        except envelope.MalformedEnvelope as exc:
            log.warning("ignored a reply from %s: %s (%d frames, first %r)",
                        self.endpoint, exc, len(frames), frames[:2])
            return
        except ProtocolError as exc:
            log.warning("ignored a malformed reply from %s: %s (%s)", self.endpoint, exc, exc.code)
            return
        if isinstance(reply, TaskOutput):
            with self._lock:
                stream = self._streams.get((_TASK, reply.task_id))
            if stream is None:
                log.debug("ignored output for task id %r nobody streams", reply.task_id)
                return
            stream._deliver(reply)
            return
        if isinstance(reply, TaskReply):
            key = (_TASK, reply.task_id)
        elif isinstance(reply, SessionReply):
            key = (_SESSION, reply.request_id)
        else:
            key = (_STATUS, reply.request_id)
        future = self._take(key)
        if future is None:
            log.debug("ignored a reply for unknown %s id %r", *key)
            return
        future.set_result(reply)
