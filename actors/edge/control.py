"""The control plane: a socket for operators, apart from the callers' one.

Who is an operator: whoever can open the control socket. It is a unix socket
(ZeroMQ ipc) created in a directory of mode 0700 and given mode 0600, both
owned by corrald's user, so the kernel refuses every other local user before
ZeroMQ sees a byte; it is never reachable over the network.

ControlServer is a thread of its own that owns the ROUTER socket, like the
IntakeServer. It is not an actor, so it may wait (for a SCRAM's VMs to be
paused) without holding any actor up; it acts only by telling actors
messages and by reading what they publish (PoolView, metrics).

Safe mode (SCRAM) is written to a file before anything else happens and
removed only by `resume`, so a daemon that restarts in between starts in safe
mode: no VM boots and every task is refused until an operator resumes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from actors.edge.connections import ConnectionGuard
from actors.edge.endpoint import SocketThread
from actors.messages import CloseSessionAsOperator, InjectFault, SetPoolSize
from actors.session_table import operator_row
from protocol.channel import codec
from protocol.wire import envelope
from protocol.wire.control import (COMMANDS, CONTROL_TAG, OPERATOR_TO_DAEMON, AdminReply, AdminRequest,
                              admin_reply)
from protocol.channel.errors import ProtocolError
from protocol.wire.tasks import PRIORITY_NAMES

log = logging.getLogger("corral.control")

MAX_POOL_SIZE = 256  # as config pool.size allows
VM_FAULTS = ("kill_qemu", "hang_guest", "drop_libvirt", "crash")
CHANNEL_FAULTS = ("corrupt_frame",)
CRASHABLE_ACTORS = ("intake", "scheduler", "sessions", "pool", "ioguard", "watchdog")
PAUSE_POLL_S = 0.002
ENDPOINT_LABEL = "control"


class SafeModeFile:
    """Safe mode that outlives the process: the file exists while it holds."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            # Unreadable: safe mode still holds (failing safe), with what we know.
            return {"reason": f"safe-mode file unreadable ({e})", "since": 0}

    def enter(self, reason: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"reason": reason, "since": time.time()}))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class Mode:
    """What corrald is doing: serving, draining or safe_mode (SCRAM)."""

    name: str = "serving"
    reason: str = ""
    since: float = 0.0  # wall clock, for operators


class ControlServer:
    """The thread that owns the operators' ROUTER socket."""

    def __init__(self, endpoint: str, service, faults_enabled: bool, scram_pause_timeout_s: float,
                 max_connections: int = 16):
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.guard: ConnectionGuard | None = None
        self.path = Path(endpoint[len("ipc://"):])
        self.service = service
        self.faults_enabled = faults_enabled
        self.scram_pause_timeout_s = scram_pause_timeout_s
        self.context = zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = SocketThread(self._run, "control-server",
                                    f"cannot listen for operators on {endpoint}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _bind(self, router) -> None:
        # The directory's mode is what keeps other users out: they cannot even
        # reach the socket file. The file's own mode is a second lock.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        router.bind(self.endpoint)
        os.chmod(self.path, 0o600)

    def _run(self) -> None:
        router = self.context.socket(zmq.ROUTER)
        guard = None
        try:
            router.setsockopt(zmq.LINGER, 1000)
            router.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
            guard = self.guard = ConnectionGuard(router, ENDPOINT_LABEL, self.max_connections,
                                                 self.service.metrics)
            self._bind(router)
            guard.bound(self.endpoint)
        except (zmq.ZMQError, OSError) as e:
            if guard is not None:
                guard.close(lambda: router.close(0))
            else:
                router.close(0)
            self._thread.ready(e)
            return
        self._thread.ready()
        log.info("operators' socket on %s", self.endpoint)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(guard.monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(200):
                    guard.pump(lambda: self._read_requests(router))
                else:
                    guard.tick()
        finally:
            guard.close(router.close)
            self.path.unlink(missing_ok=True)

    def _read_requests(self, router) -> bool:
        """Answer what the ROUTER holds, each over the connection it came on;
        True once it is read empty."""
        for _ in range(64):
            try:
                parts = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            conn = self.guard.connection_of(parts[-1], parts[0].bytes)
            frames = [p.bytes for p in parts]
            reply = self._handle(frames)
            if not self.guard.send(conn, [frames[0], *envelope.build(CONTROL_TAG, codec.encode(reply))]):
                self.service.metrics.answers_undeliverable.labels(ENDPOINT_LABEL).inc()
                log.warning("the reply to an operator's %r went nowhere: the connection is gone",
                            reply.request_id)
        return False

    def _handle(self, frames: list[bytes]) -> AdminReply:
        try:
            request = codec.decode(envelope.parse(CONTROL_TAG, frames[1:]), OPERATOR_TO_DAEMON)
        except envelope.MalformedEnvelope as e:
            return admin_reply("", str(e), error_code="invalid_request")
        except ProtocolError as e:
            return admin_reply("", f"undecodable request: {e}", error_code="invalid_request")
        args = [a.decode(errors="replace") for a in request.args]
        log.info("operator: %s %s", request.command, " ".join(args))
        try:
            text, fields = self._command(request, args)
        except CommandError as e:
            return admin_reply(request.request_id, str(e), error_code=e.code)
        except Exception as e:  # an operator's command must never end the control plane
            log.exception("control command %s failed", request.command)
            return admin_reply(request.request_id, f"internal error: {e!r}", error_code="internal")
        return admin_reply(request.request_id, text, fields)

    def _command(self, request: AdminRequest, args: list[str]) -> tuple[str, dict]:
        command = request.command
        if command not in COMMANDS:
            raise CommandError("unknown_command",
                               f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
        handler = getattr(self, "_" + command.replace("-", "_"))
        return handler(*args) if _arity_ok(handler, args) else _usage(command)

    # --- commands ------------------------------------------------------------

    def _status(self) -> tuple[str, dict]:
        service = self.service
        mode = service.mode
        metrics = service.metrics
        depth = metrics.gauge_values(metrics.queue_depth)
        fields = {"mode": mode.name, "mode_reason": mode.reason,
                  "mode_since": _iso(mode.since) if mode.since else "",
                  "accelerator": service.hypervisor.accelerator,
                  "pool_size": service.pool_view.size,
                  "accepted": metrics.counter_total(metrics.accepted),
                  "answered": metrics.counter_total(metrics.tasks),
                  "unanswered": service.server.unanswered()}
        fields.update({f"queue_{name}": depth.get(name, 0) for name in PRIORITY_NAMES})
        fields.update({f"vm {vm_id}": state for vm_id, state in sorted(service.pool_view.states.items())})
        return f"corrald is {mode.name}", fields

    def _scram(self, *reason_words: str) -> tuple[str, dict]:
        reason = " ".join(reason_words) or "operator SCRAM"
        started = time.monotonic()
        self.service.enter_safe_mode(reason)
        unpaused = self._wait_all_paused(started + self.scram_pause_timeout_s)
        elapsed_ms = (time.monotonic() - started) * 1000
        self.service.metrics.scram_pause_seconds.set(elapsed_ms / 1000)
        fields = {"paused_in_ms": f"{elapsed_ms:.1f}", "vms_running": len(unpaused)}
        if unpaused:
            raise CommandError("scram_incomplete", f"safe mode is on, but after {elapsed_ms:.0f} ms "
                                                   f"these VMs still run: {', '.join(unpaused)}")
        return f"SCRAM: safe mode on, every VM paused in {elapsed_ms:.1f} ms", fields

    def _wait_all_paused(self, deadline: float) -> list[str]:
        """This instance's domains that still run at the deadline (none: all paused)."""
        while True:
            running = [name for name, state in self.service.hypervisor.domain_states().items()
                       if state != "paused"]
            if not running or time.monotonic() >= deadline:
                return running
            self.guard.read_events()  # keep shedding a flood meanwhile: libzmq waits on this monitor
            time.sleep(PAUSE_POLL_S)

    def _resume(self) -> tuple[str, dict]:
        was = self.service.mode.name
        self.service.resume_service()
        return f"resumed from {was}: serving", {}

    def _drain(self) -> tuple[str, dict]:
        self.service.drain()
        return "draining: new tasks are refused, queued and running tasks finish", {}

    def _pool_size(self, size: str) -> tuple[str, dict]:
        try:
            wanted = int(size)
        except ValueError:
            wanted = -1
        if not 0 <= wanted <= MAX_POOL_SIZE:
            raise CommandError("invalid_argument", f"pool size must be 0..{MAX_POOL_SIZE}, got {size!r}")
        self.service.directory.tell("pool", SetPoolSize(wanted))
        return f"pool size set to {wanted}", {"pool_size": wanted}

    def _sessions(self) -> tuple[str, dict]:
        """Read from the view the Sessions actor publishes: no actor is asked."""
        now = time.monotonic()
        rows = dict(operator_row(summary, now) for summary in self.service.sessions_view.sessions)
        return f"{len(rows)} session{'' if len(rows) == 1 else 's'}", rows

    def _session_close(self, session_id: str) -> tuple[str, dict]:
        if all(summary.session_id != session_id for summary in self.service.sessions_view.sessions):
            raise CommandError("invalid_argument", f"no session {session_id!r} (see `corral admin sessions`)")
        self.service.directory.tell("sessions", CloseSessionAsOperator(session_id))
        return f"session {session_id} is being closed: its execs are answered session_lost, its VM destroyed", {}

    def _fault(self, kind: str, target: str = "") -> tuple[str, dict]:
        if not self.faults_enabled:
            raise CommandError("faults_disabled", "fault injection is off (set control.faults = true)")
        if kind in CHANNEL_FAULTS and target:
            actor = "ioguard"
        elif kind == "crash" and target in CRASHABLE_ACTORS:
            actor, target = target, ""
        elif kind in VM_FAULTS and target:
            actor = "pool"  # it hands the fault to the VM's Supervisor
        else:
            raise CommandError("invalid_argument", f"fault {kind!r} {target!r}: use one of "
                               f"{', '.join(VM_FAULTS + CHANNEL_FAULTS)} VM_ID, "
                               f"or crash {'|'.join(CRASHABLE_ACTORS)}")
        if target and target not in self.service.pool_view.owned:
            raise CommandError("invalid_argument", f"no VM {target!r} in the pool")
        self.service.directory.tell(actor, InjectFault(kind, target))
        return f"fault {kind} sent to {target or actor}", {}


class CommandError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _arity_ok(handler, args: list[str]) -> bool:
    import inspect

    params = inspect.signature(handler).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    required = sum(1 for p in params if p.default is p.empty)
    return required <= len(args) <= len(params)


def _usage(command: str):
    usage = {"pool-size": "pool-size N", "session-close": "session-close SESSION_ID",
             "fault": "fault KIND [TARGET]"}.get(command, command)
    raise CommandError("invalid_argument", f"usage: {usage}")


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
