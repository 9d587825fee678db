"""corral's client library: ``Client`` (tasks and status over ZeroMQ), its
errors, and CurveZMQ keys (``curve_keys``, ``keygen``). The ``corral`` command
line built on it is protocol/client/cli.py.

Wire (protocol.wire.tasks): a DEALER socket sends [b"", PROTOCOL_TAG, payload]
(protocol.wire.envelope) and corrald's ROUTER answers the same way on the same
connection. Each TaskRequest gets exactly one TaskReply with the same task_id,
each StatusRequest one StatusReply with the same request_id.

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
import os
import threading
import uuid
from typing import Iterable, Mapping

import zmq

from protocol.wire import envelope, outcomes
from protocol.channel.errors import ProtocolError
from protocol.channel.codec import decode, encode, max_payload_size
from protocol.client.reach import NOT_RUNNING, Unreachable, ipc_path, probe, refused
from protocol.wire.tasks import (DAEMON_TO_CLIENT, PRIORITY_NAMES, PROTOCOL_TAG, ErrorCode, StatusReply,
                    StatusRequest, TaskReply, TaskRequest, error_reply)

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
START_HINT = "is it running? start it with scripts/run"

_TASK = "task"
_STATUS = "status"


class ClientClosedError(RuntimeError):
    """The client was closed (or its I/O thread failed) before an answer came."""


class HandshakeError(ConnectionError):
    """corrald refused this connection at its handshake; `code` says why:
    key_refused, key_missing, curve_not_offered, server_key_mismatch or
    handshake_failed."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


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


class Client:
    """A connection to corrald; safe to share between threads.

    ``submit()`` returns a ``concurrent.futures.Future`` resolved with the
    TaskReply (or failed with ClientClosedError). Done-callbacks run on the
    I/O thread: keep them short, or every other reply waits for them.
    """

    def __init__(self, endpoint: str | None = None, *, config_path=None, server_key=None,
                 client_key=None) -> None:
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
        self._lock = threading.Lock()  # guards _pending, _closed and _handoff
        self._pending: dict[tuple[str, str], concurrent.futures.Future] = {}
        # Requests for the I/O thread, oldest first; it also holds those the
        # DEALER has no room for yet (daemon down or slow).
        self._outbox: collections.deque[tuple[tuple[str, str], concurrent.futures.Future, bytes]] = \
            collections.deque()
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
               egress_allow: Iterable[str | bytes] = ()) -> concurrent.futures.Future:
        """Send one task; the Future resolves with its TaskReply.

        ``files_in``: (guest path, data, mode) written as the task user before
        the run; ``collect``: guest paths read after it, returned in the
        reply's ``files_out`` as (path, error, data, receipt). ``egress_allow``:
        with capability net:egress, where the task may connect (docs/egress.md).

        Raises TypeError/ValueError for arguments the protocol cannot carry,
        ValueError for a task_id already in flight, ClientClosedError after close().
        The Future fails at once with reach.Unreachable (code not_running or
        permission_denied) when corrald cannot be reached: nothing was sent.
        """
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a list of arguments, not one string")
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
            egress_allow=tuple(_as_bytes(rule, "egress rule") for rule in egress_allow))
        key = (_TASK, task_id)
        return self._send(key, encode(request))

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

    def _send(self, key: tuple[str, str], payload: bytes) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        # Running: a caller's cancel() cannot race the I/O thread's set_result
        # (the daemon has no cancel; abandon a task by not waiting for it).
        future.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                raise ClientClosedError(f"client for {self.endpoint} is closed")
            if key in self._pending:
                raise ValueError(f"{key[0]} id {key[1]!r} is already in flight")
            self._pending[key] = future
            self._outbox.append((key, future, payload))
            # Under the lock: callers share this socket.
            self._handoff.send(b"")
        return future

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
        future.set_exception(TimeoutError(f"abandoned: no answer from corrald at {self.endpoint}"))
        return True

    def _take(self, key: tuple[str, str]) -> concurrent.futures.Future | None:
        # Whoever pops a Future is the only one to resolve it.
        with self._lock:
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
        unsent = {key for key, _, _ in self._outbox}
        with self._lock:
            lost = [(key, future) for key, future in self._pending.items() if key not in unsent]
            for key, _ in lost:
                del self._pending[key]
        text = (f"the connection to corrald at {self.endpoint} dropped while this was in flight "
                "(corrald stopped or restarted?); its outcome is unknown: resubmit if needed")
        for (kind, ident), future in lost:
            if kind == _TASK:
                future.set_result(error_reply(ident, ErrorCode.CONNECTION_LOST, text, outcome=outcomes.UNKNOWN))
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
            key, future, _ = outbox.popleft()
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
                key, future, _ = outbox.popleft()
                if self._take(key) is future:
                    future.set_exception(self._handshake_refused)
            return
        while outbox:
            key, future, payload = outbox[0]
            if self._pending.get(key) is not future:
                outbox.popleft()  # abandoned (run() gave up) before it left: do not send
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
        if isinstance(reply, TaskReply):
            key = (_TASK, reply.task_id)
        else:
            key = (_STATUS, reply.request_id)
        future = self._take(key)
        if future is None:
            log.debug("ignored a reply for unknown %s id %r", *key)
            return
        future.set_result(reply)
