"""Who is connected to one of corrald's ROUTER sockets, how many may be, and
which connection an answer may go to (docs/operations.md, "Connections and
file descriptors"; docs/attacks.md, "Hostile callers on the sockets").

libzmq accepts every connection itself and gives no way to refuse one. Its
ipc listener aborts the whole process when accept() fails with EMFILE, its
tcp listener spins on it. So a ConnectionGuard watches the ROUTER's monitor
socket: every ACCEPTED event carries the new connection's fd, and past the
endpoint's limit the newest connection is shed at once with
shutdown(SHUT_RDWR) (never close(): the fd is libzmq's, which closes it when
it reads the EOF). The monitor also bounds how far libzmq can run ahead: its
io thread blocks once about a thousand events wait unread, so the fds held by
connections never exceed the limit plus that many (MONITOR_SLACK), which the
start-up fd budget (plan_fd_budget) reserves.

Answers follow a connection, not a routing id. A ROUTER routes by routing id,
and a peer may claim any id nobody holds at that moment (ZMQ_ROUTING_ID), so
the id of a caller that went away can be taken by anyone. Each message is
bound to the Connection that sent it (its SRCFD and the generation of that fd
as the monitor tells it), and an answer is sent only while that connection
lives. Two orderings make this exact:

- libzmq emits DISCONNECTED for a connection only after every message it
  read from it is in the ROUTER's queue, and a new connection on the same fd
  is ACCEPTED only after that. A DISCONNECTED is applied only once the
  ROUTER was read empty after the event was seen, so a message is never bound
  to a connection newer than the one that sent it (at worst to an older, and
  then dead, one: that fails safe).
- The DISCONNECTED of a connection is emitted before its routing id is freed
  in the ROUTER. send() looks the routing id up (the first frame) and then
  reads the monitor: if the connection is gone by then, the rest of the
  message is one empty frame, which carries nothing to whoever got the id.
"""

from __future__ import annotations

import collections
import ctypes
import fcntl
import itertools
import logging
import os
import resource
import socket
import struct
import time
from dataclasses import dataclass

import zmq

log = logging.getLogger("corral.connections")

EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
          | zmq.EVENT_MONITOR_STOPPED)
CLOSE_WAIT_S = 3.0  # longer than the ROUTERs' linger (1 s)
_EVENT = struct.Struct("=HI")  # monitor frame 1: event id, value (the fd)
# Monitor events libzmq queues before its io thread blocks: its own socket's
# send high-water mark (1000) plus ours (1). Each unread ACCEPTED is a
# connection holding an fd that no limit has looked at yet.
MONITOR_SLACK = 1001
# Connections that never finish the ZMTP/CurveZMQ handshake are closed by
# libzmq after ZMQ_HANDSHAKE_IVL, left at its default (30 s); until then they
# count. (Setting it on the ROUTER made a reply sent just before the ROUTER
# closed get lost now and then: test_intake's stopping test, ~1 run in 10.)
_connection_ids = itertools.count(1)
# Each connection costs libzmq ~27 KiB. glibc keeps what a burst freed (RSS
# ratcheted to 406 MiB after 10k connections came and went, and grew with each
# burst) until malloc_trim() gives it back: done after this many connections
# came or went, at most once a second (a trim owed is done by tick()).
TRIM_AFTER_EVENTS = 2048
TRIM_INTERVAL_S = 1.0


@dataclass(eq=False)
class Connection:
    """One accepted connection, from its ACCEPTED to its DISCONNECTED."""

    id: int
    fd: int
    handshakes_before: int = 0  # handshakes the monitor had reported when it was accepted
    closed: bool = False  # its DISCONNECTED has been read
    mute: bool = False  # closed with no handshake reported in its lifetime: it sent no message
    shed: bool = False  # over the limit: shut down on acceptance
    routing_id: bytes | None = None  # of its first message: fixed for a connection's life


class ConnectionGuard:
    """The monitor of one ROUTER; used only by the thread that owns the ROUTER.
    Set it up before the ROUTER binds, so no connection is ever unseen."""

    def __init__(self, router: zmq.Socket, name: str, limit: int, metrics):
        self.router = router
        self.name = name  # "client" or "control": the metrics' endpoint label
        self.limit = limit
        self.metrics = metrics
        address = f"inproc://corral-monitor-{name}-{id(self):x}"
        router.monitor(address, EVENTS)
        self.monitor = router.context.socket(zmq.PAIR)
        self.monitor.setsockopt(zmq.RCVHWM, 1)
        self.monitor.setsockopt(zmq.LINGER, 0)
        self.monitor.connect(address)
        self._local: str | int | None = None  # our end of an accepted socket: ipc path or tcp port
        self._pending: collections.deque[tuple[bool, Connection]] = collections.deque()  # (accepted?, conn)
        self._latest: dict[int, Connection] = {}  # fd -> its newest connection as far as read
        self._bound: dict[int, Connection] = {}  # fd -> the connection messages are bound to
        self._admitted = 0  # open and not shed: what the limit counts
        self._to_shed: list[Connection] = []
        self._events_since_trim = 0
        self._last_trim = 0.0
        self._handshakes = 0  # HANDSHAKE_SUCCEEDED events read (their value is not the fd)
        # fds are handed out lowest first: an accepted one this high means the
        # process is short of fds whatever the count says (a leak elsewhere).
        self._fd_ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - MONITOR_SLACK - FD_MARGIN
        self.refused = metrics.connections_refused.labels(name)
        metrics.connections.labels(name).set_function(lambda: len(self._latest))

    def bound(self, endpoint: str) -> None:
        """After bind: how to recognise an accepted socket of this endpoint."""
        if endpoint.startswith("ipc://"):
            self._local = endpoint[len("ipc://"):]
        else:
            self._local = int(endpoint.rsplit(":", 1)[1])

    def close(self, router_close) -> None:
        """Close the ROUTER with `router_close`, then the reading end once the
        monitor has stopped: libzmq sends events (blocking its io thread) until
        the ROUTER is gone, after it lingered to send what it holds."""
        router_close()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            if self.monitor.poll(int(left * 1000) + 1):
                head = self.monitor.recv_multipart()[0]
                if _EVENT.unpack(head)[0] == zmq.EVENT_MONITOR_STOPPED:
                    break
        self.monitor.close(0)

    # --- the monitor -------------------------------------------------------------

    def read_events(self, settle: bool = True) -> bool:
        """Take every event the monitor holds (freeing libzmq's io thread) and
        shed what is over the limit; True if there were any. `settle`: if the
        ROUTER holds no message now, none can be from before these events,
        so they are applied at once."""
        got = False
        while True:
            try:
                head, _endpoint = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            got = True
            event, fd = _EVENT.unpack(head)
            if event == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            elif event == zmq.EVENT_DISCONNECTED:
                self._disconnected(fd)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes += 1
        if self._to_shed:
            for conn in self._to_shed:
                if not conn.closed:  # read its DISCONNECTED since: the fd may be another's
                    self._shut_down(conn)
            self._to_shed.clear()
        if settle and self._pending and not self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._apply(len(self._pending))
        self.tick()
        return got

    def tick(self) -> None:
        """Trim freed memory if a burst of connections owes it and it is time."""
        if self._events_since_trim >= TRIM_AFTER_EVENTS and time.monotonic() - self._last_trim >= TRIM_INTERVAL_S:
            self._events_since_trim = 0
            self._last_trim = time.monotonic()
            trim_freed_memory()

    def poll_timeout_ms(self) -> int | None:
        """How long its server may wait for sockets before calling tick()."""
        return None if self._events_since_trim < TRIM_AFTER_EVENTS else int(TRIM_INTERVAL_S * 1000)

    def _accepted(self, fd: int) -> None:
        conn = Connection(next(_connection_ids), fd, self._handshakes)
        self._events_since_trim += 1
        self._latest[fd] = conn
        self._pending.append((True, conn))
        if self._admitted >= self.limit or fd >= self._fd_ceiling:
            conn.shed = True
            self._to_shed.append(conn)
            self.refused.inc()
        else:
            self._admitted += 1

    def _disconnected(self, fd: int) -> None:
        conn = self._latest.pop(fd, None)
        if conn is None:
            return
        conn.closed = True
        conn.mute = self._handshakes == conn.handshakes_before
        self._events_since_trim += 1
        if not conn.shed:
            self._admitted -= 1
        self._pending.append((False, conn))

    def _shut_down(self, conn: Connection) -> None:
        """shutdown() the connection's socket. Through a duplicate of the fd,
        checked to be an accepted socket of this endpoint: if libzmq closed
        the fd meanwhile and another part of corrald got its number, that
        socket is left alone."""
        try:
            dup = fcntl.fcntl(conn.fd, fcntl.F_DUPFD_CLOEXEC, 0)
        except OSError:  # closed meanwhile, or no fd to spare: the next one is shed instead
            return
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return
        try:
            local = sock.getsockname()
            ours = local == self._local if isinstance(local, str) else (
                isinstance(local, tuple) and local[1] == self._local)
            if ours:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()

    def _apply(self, count: int) -> None:
        """Bind messages to the first `count` events read."""
        for _ in range(min(count, len(self._pending))):
            accepted, conn = self._pending.popleft()
            if accepted:
                self._bound[conn.fd] = conn
            elif self._bound.get(conn.fd) is conn:
                del self._bound[conn.fd]

    # --- messages ----------------------------------------------------------------

    def pump(self, read_messages) -> None:
        """Read the monitor, then the ROUTER through `read_messages()` (which
        returns True if it read the ROUTER empty); a DISCONNECTED read before an
        empty ROUTER is applied after it."""
        self.read_events()
        seen = len(self._pending)
        emptied = read_messages()
        if emptied:
            self._apply(seen)
        else:  # the ROUTER may still hold messages from before those DISCONNECTEDs
            while self._pending and self._pending[0][0]:
                self._apply(1)

    def connection_of(self, frame: zmq.Frame, routing_id: bytes) -> Connection | None:
        """The connection a received message came from: the oldest it can be.
        Passed over: a connection that closed with no handshake reported
        between its ACCEPTED and its DISCONNECTED (it sent nothing: a client's
        probe of the socket just before it connects on the same fd), and one
        whose messages had another routing id."""
        fd = frame.get(zmq.SRCFD)

        def could_have_sent(conn: Connection | None) -> bool:
            return conn is not None and not conn.mute and conn.routing_id in (None, routing_id)

        for attempt in range(2):  # its ACCEPTED was emitted before it: read or still in the monitor
            conn = self._bound.get(fd)
            if not could_have_sent(conn):
                conn = next((pending for accepted, pending in self._pending
                             if accepted and pending.fd == fd and could_have_sent(pending)), None)
            if conn is not None or attempt:
                break
            self.read_events(settle=False)  # this message is out of the ROUTER: nothing may be applied
        if conn is not None and conn.routing_id is None:
            conn.routing_id = routing_id
        return conn

    def send(self, conn: Connection | None, frames: list[bytes]) -> bool:
        """Send `frames` (routing id first) only over `conn`; False if it is gone."""
        self.read_events()
        if conn is None or conn.closed:
            return False
        self.router.send(frames[0], zmq.SNDMORE)  # the routing id is looked up now
        self.read_events()
        if conn.closed:  # the id may have been freed and taken before that look-up
            self.router.send(b"")
            return False
        self.router.send_multipart(frames[1:])
        return True


def trim_freed_memory() -> None:
    """Give memory glibc holds free back to the OS (all arenas)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def caller_of(frame: zmq.Frame, curve: bool) -> str:
    """Who sent a message, for the record: the ZAP User-Id with CurveZMQ, else
    the peer's uid on ipc (SO_PEERCRED, "localhost:uid:gid:pid"), else its address."""
    try:
        if curve:
            return "key " + frame.get("User-Id")
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return "?"
    parts = address.split(":")
    return f"uid {parts[1]}" if len(parts) == 4 and parts[0] == "localhost" else address


# --- the fd budget --------------------------------------------------------------

# fds corrald needs besides its callers: Python, libvirt, zmq's own sockets,
# the metrics server, logs and files, with room to spare.
BASE_FDS = 256
FDS_PER_VM = 8  # its channel and QMP sockets (measured: 2 each), with room for a console log and more
MIN_CONNECTIONS = 4
FD_MARGIN = 64  # kept free below the open-file limit besides MONITOR_SLACK


@dataclass(frozen=True)
class FdBudget:
    nofile: int  # the soft RLIMIT_NOFILE after raising it
    client: int  # connection limits that fit it
    control: int


def plan_fd_budget(client_limit: int, control_limit: int, max_vms: int) -> FdBudget:
    """Raise the soft fd limit to the hard one, and fit the connection limits
    into it: limits + MONITOR_SLACK per endpoint + VMs + BASE_FDS. A limit that
    does not fit is lowered, with one warning naming the fix; CorralError when
    not even MIN_CONNECTIONS fit."""
    from actors.errors import CorralError

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    reserved = 2 * MONITOR_SLACK + max_vms * FDS_PER_VM + BASE_FDS
    room = soft - reserved
    wanted = client_limit + control_limit
    if room >= wanted:
        return FdBudget(soft, client_limit, control_limit)
    control = min(control_limit, max(MIN_CONNECTIONS, room // 16))
    client = room - control
    if client < MIN_CONNECTIONS:
        raise CorralError(
            f"the open-file limit ({soft}) leaves no room for callers: {reserved} fds are reserved "
            f"for {max_vms} VMs and the sockets' accept bursts; raise it (LimitNOFILE= in the unit, "
            f"ulimit -n) to at least {reserved + wanted}")
    log.warning("the open-file limit (%d) fits %d client and %d control connections, not the %d and %d "
                "configured (%d fds are reserved for VMs and accept bursts); raise it (LimitNOFILE=, "
                "ulimit -n) to at least %d or lower daemon.max_connections / control.max_connections",
                soft, client, control, client_limit, control_limit, reserved, reserved + wanted)
    return FdBudget(soft, client, control)
