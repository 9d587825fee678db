"""Who a caller is, what it may ask for, and whether it can pay: Intake's
admission check after a request is well-formed (docs/identities.md).

Two modes, chosen by `identity.server_secret_key`:

- No server key: no CurveZMQ. Every caller is one local identity
  (`identity.local_name`) with `identity.local_grants`. Meant for an ipc or
  loopback endpoint, where the operating system decides who can connect.
- Server key: the client ROUTER runs CurveZMQ as server, and a ZAP handler
  (ZapHandler, a thread of its own on the same zmq context) admits only the
  client public keys on the allow-list (`identity.client_keys_dir` and
  `identity.clients`). CurveZMQ alone authenticates the server only; the ZAP
  handler is what keeps unknown clients out (Ironhouse). It answers with the
  identity's name as ZAP User-Id, which libzmq attaches to every message from
  that connection as the "User-Id" property: Intake reads the caller's
  identity from the message itself, so it cannot be claimed in a payload.

Admission then checks, in order: every capability asked for is granted to
the identity (else `capability_denied` naming it), and the identity's budget
can pay the task's cost (actors.edge.budget). Nothing is charged for a refused
request.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

import config
from actors.edge.budget import BudgetLedger, TaskCosts, gives_charge_back
from actors.edge.endpoint import SocketThread
from actors.egress.rules import EgressGrant, parse_rules
from actors.errors import CorralError, Rejected
from protocol.wire.tasks import ErrorCode, TaskReply, TaskRequest

log = logging.getLogger("corral.identity")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP RFC (27/ZAP)
ZAP_DOMAIN = b"corral"
ALL_OFFERED = "*"
BIND_RETRY_S = 2.0
MAX_LOGGED_KEYS = 1000  # unknown keys logged once each, up to this many


@dataclass(frozen=True)
class Identity:
    name: str
    grants: frozenset[str]
    egress: EgressGrant = EgressGrant()  # the egress rules it may ask for (docs/egress.md)

    def check(self, request: TaskRequest) -> None:
        for raw in request.capabilities:
            name = raw.decode("ascii", errors="replace")
            if name not in self.grants:
                granted = ", ".join(sorted(self.grants)) or "none"
                raise Rejected(ErrorCode.CAPABILITY_DENIED,
                               f"capability {name!r} is not granted to identity {self.name!r} "
                               f"(granted: {granted})")
        for rule in parse_rules(request.egress_allow):  # well-formed: Intake's validate() parsed them
            if not self.egress.allows(rule):
                raise Rejected(ErrorCode.CAPABILITY_DENIED,
                               f"egress rule {str(rule)!r} is not granted to identity {self.name!r} "
                               f"(egress rules granted: {self.egress})")


def _fail(message: str):
    raise CorralError(f"config: {message}")


def resolve_grants(key: str, names: tuple[str, ...], known: frozenset[str],
                   offered: frozenset[str]) -> frozenset[str]:
    """Grant names from config: "*" is everything offered; an unknown name is an error."""
    grants = set()
    for name in names:
        if name == ALL_OFFERED:
            grants |= offered
        elif name not in known:
            _fail(f"{key}: unknown capability {name!r} (known: {', '.join(sorted(known))}, or \"*\")")
        else:
            grants.add(name)
    return frozenset(grants)


def load_server_key(path: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from corrald's secret certificate, which only
    its owner may read."""
    try:
        mode = os.stat(path).st_mode
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        _fail(f"identity.server_secret_key = {path!r} cannot be read: {e}")
    if secret is None:
        _fail(f"identity.server_secret_key = {path!r} holds no secret key: "
              "give the .key_secret file that corral keygen wrote")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _fail(f"identity.server_secret_key = {path!r} is readable by others "
              f"(mode {stat.S_IMODE(mode):04o}): chmod 600 it")
    return public, secret


def _raw_key(where: str, z85_key: bytes | str) -> bytes:
    text = z85_key.encode() if isinstance(z85_key, str) else z85_key
    if len(text) != 40:
        _fail(f"{where}: {text[:60]!r} is not a Z85 CurveZMQ public key (40 characters)")
    try:
        return z85.decode(text)
    except (ValueError, KeyError, IndexError):
        _fail(f"{where}: {text!r} is not a Z85 CurveZMQ public key")


def load_client_keys(cfg) -> dict[bytes, str]:
    """The allow-list: raw 32-byte public key -> identity name."""
    named: dict[str, bytes] = {}
    if cfg.client_keys_dir:
        directory = Path(cfg.client_keys_dir)
        if not directory.is_dir():
            _fail(f"identity.client_keys_dir = {str(directory)!r} is not a directory")
        for path in sorted(directory.glob("*.key")):
            config.CHECKS["name"](f"identity.client_keys_dir file {path.name}", path.stem)
            try:
                public, _ = zmq.auth.load_certificate(path)
            except (OSError, ValueError) as e:
                _fail(f"identity.client_keys_dir: {path} cannot be read: {e}")
            named[path.stem] = _raw_key(str(path), public)
    for name, key in cfg.clients.items():
        if name in named:
            _fail(f"identity.clients.{name}: a key of that name is also in identity.client_keys_dir")
        named[name] = _raw_key(f"identity.clients.{name}", key)
    by_key: dict[bytes, str] = {}
    for name, raw in named.items():
        if raw in by_key:
            _fail(f"identity: clients {by_key[raw]!r} and {name!r} have the same public key")
        by_key[raw] = name
    return by_key


def _is_local(endpoint: str) -> bool:
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0]
    return endpoint.startswith("ipc://") or host in ("127.0.0.1", "localhost", "[::1]")


class ZapHandler:
    """Answers ZAP requests of one zmq context from a thread of its own:
    CURVE clients whose key is on the allow-list get in under their name,
    anything else is denied (status 400, which the client sees as a
    handshake failed for authentication)."""

    def __init__(self, context: zmq.Context, keys: dict[bytes, str], metrics=None):
        self.context = context
        self.keys = keys
        self.metrics = metrics
        self._stop = threading.Event()
        self._logged: set[bytes] = set()
        self._thread = SocketThread(self._run, "intake-zap", "cannot start the ZAP handler")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        socket = self.context.socket(zmq.REP)
        socket.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + BIND_RETRY_S
        while True:
            try:
                socket.bind(ZAP_ENDPOINT)
                break
            except zmq.ZMQError as e:
                # A handler that just stopped may still hold the address until
                # libzmq's reaper closes its socket.
                if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    socket.close(0)
                    self._thread.ready(e)
                    return
                time.sleep(0.01)
        self._thread.ready()
        try:
            while not self._stop.is_set():
                if socket.poll(200):
                    request = socket.recv_multipart()
                    try:
                        reply = self.answer(request)
                    except Exception:  # this thread must live: libzmq waits on it for every handshake
                        log.exception("ZAP handler failed on a request; denying it")
                        reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error",
                                 b"", b""]
                    socket.send_multipart(reply)
        finally:
            socket.unbind(ZAP_ENDPOINT)
            socket.close(0)

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The ZAP reply [version, request id, status, text, user id, metadata]."""
        if len(frames) < 6 or frames[0] != b"1.0":
            return [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _routing_id, mechanism, *credentials = frames
        name = None
        if domain == ZAP_DOMAIN and mechanism == b"CURVE" and len(credentials) == 1:
            name = self.keys.get(credentials[0])
        if name is None:
            self._denied(mechanism, credentials, address)
            return [version, request_id, b"400", b"client key not on the allow-list", b"", b""]
        return [version, request_id, b"200", b"OK", name.encode(), b""]

    def _denied(self, mechanism: bytes, credentials: list[bytes], address: bytes) -> None:
        if self.metrics is not None:
            self.metrics.handshakes_denied.inc()
        key = credentials[0] if mechanism == b"CURVE" and credentials else mechanism
        if key not in self._logged and len(self._logged) < MAX_LOGGED_KEYS:
            self._logged.add(key)
            shown = z85.encode(key).decode() if len(key) == 32 else key.decode(errors="replace")
            log.warning("refused a client from %s: key %s is not on the allow-list",
                        address.decode(errors="replace") or "?", shown)


class Admission:
    """Identities, grants and budgets, as IntakeServer applies them."""

    def __init__(self, local: Identity | None, identities: dict[str, Identity],
                 ledger: BudgetLedger | None, costs: TaskCosts | None,
                 server_key: tuple[bytes, bytes] | None = None, client_keys: dict[bytes, str] | None = None,
                 metrics=None):
        self.local = local  # the identity of every caller when there is no Curve
        self.identities = identities
        self.ledger = ledger
        self.costs = costs
        self.server_key = server_key
        self.client_keys = client_keys or {}
        self.metrics = metrics
        self.charges: dict[int, tuple[str, float]] = {}  # ticket -> (identity, cost), intake thread only
        self.zap: ZapHandler | None = None
        if metrics is not None and ledger is not None:
            metrics.watch_budgets(ledger.snapshot)
            for name in identities:
                ledger.open(name)

    @property
    def curve(self) -> bool:
        return self.server_key is not None

    @classmethod
    def unlimited(cls, offered: frozenset[str]) -> Admission:
        """One local identity granted every offered capability, no budget (tests)."""
        local = Identity("local", offered, EgressGrant(everything=True))
        return cls(local, {"local": local}, None, None)

    @classmethod
    def from_config(cls, cfg: config.Config, known: frozenset[str], offered: frozenset[str],
                    metrics=None) -> Admission:
        ident = cfg.identity
        ledger = BudgetLedger.from_config(cfg.budget)
        costs = TaskCosts.from_config(cfg.budget)
        for name in cfg.budget.capability_costs:
            if name not in known:
                _fail(f"budget.capability_costs: unknown capability {name!r}")
        if not ident.server_secret_key:
            if ident.client_keys_dir or ident.clients or ident.grants:
                _fail("identity.client_keys_dir, identity.clients and identity.grants need "
                      "identity.server_secret_key: without CurveZMQ no client can be told apart")
            if ident.egress_allow:
                _fail("identity.egress_allow needs identity.server_secret_key: without CurveZMQ no client "
                      "can be told apart")
            local = Identity(ident.local_name, resolve_grants("identity.local_grants", ident.local_grants,
                                                              known, offered),
                             EgressGrant.parse(ident.local_egress_allow))
            if not _is_local(cfg.daemon.endpoint):
                log.warning("%s takes connections from other hosts without CurveZMQ: every caller is "
                            "identity %r; set identity.server_secret_key", cfg.daemon.endpoint, local.name)
            return cls(local, {local.name: local}, ledger, costs, metrics=metrics)
        server_key = load_server_key(ident.server_secret_key)
        client_keys = load_client_keys(ident)
        if not client_keys:
            log.warning("CurveZMQ is on but no client key is allowed: every client will be refused")
        names = set(client_keys.values())
        for section, entries in (("identity.grants", ident.grants), ("identity.egress_allow", ident.egress_allow),
                                 ("budget.overrides", cfg.budget.overrides)):
            for name in entries:
                if name not in names:
                    _fail(f"{section}.{name}: no client key of that name "
                          "(identity.client_keys_dir or identity.clients)")
        default = resolve_grants("identity.default_grants", ident.default_grants, known, offered)
        egress_default = EgressGrant.parse(ident.default_egress_allow)
        identities = {
            name: Identity(name, resolve_grants(f"identity.grants.{name}", ident.grants[name], known, offered)
                           if name in ident.grants else default,
                           EgressGrant.parse(ident.egress_allow[name]) if name in ident.egress_allow
                           else egress_default)
            for name in sorted(names)}
        return cls(None, identities, ledger, costs, server_key, client_keys, metrics)

    # --- the socket -------------------------------------------------------------

    def secure(self, router: zmq.Socket, context: zmq.Context) -> None:
        """Before bind: make `router` a CurveZMQ server whose clients the ZAP
        handler checks. The handler is running before the socket can take a
        connection, so no client is ever let in unchecked."""
        if not self.curve:
            return
        self.zap = ZapHandler(context, self.client_keys, self.metrics)
        self.zap.start()
        router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, self.server_key[1])

    def close(self) -> None:
        if self.zap is not None:
            self.zap.stop()
            self.zap = None

    def user_of(self, frames: list[zmq.Frame]) -> bytes | None:
        """The ZAP User-Id libzmq attached to a received message (None without Curve)."""
        if not self.curve or len(frames) < 2:
            return None
        try:
            user = frames[-1].get("User-Id")
        except zmq.ZMQError:  # no such property: the connection had no ZAP
            return None
        return user.encode() if isinstance(user, str) else user

    # --- requests -----------------------------------------------------------------

    def identity_of(self, user: bytes | None) -> Identity:
        if not self.curve:
            return self.local
        identity = self.identities.get((user or b"").decode(errors="replace"))
        if identity is None:  # the ZAP handler admits only names it knows: a bug if reached
            raise Rejected(ErrorCode.UNAUTHENTICATED, "this connection has no known identity")
        return identity

    def admit(self, user: bytes | None, request: TaskRequest, ticket: int, times: int = 1) -> str:
        """Check grants and charge the budget for `ticket` (`times` such
        tasks: a fork's new sessions), or raise Rejected; returns the
        identity's name."""
        identity = self.identity_of(user)
        identity.check(request)
        if self.ledger is not None:
            cost = self.costs.of(request) * times
            self.ledger.charge(identity.name, cost)
            self.charges[ticket] = (identity.name, cost)
        return identity.name

    def answered(self, ticket: int, reply: TaskReply) -> None:
        """The one answer for `ticket` went out: refund a task that never reached a VM."""
        charge = self.charges.pop(ticket, None)
        if charge is not None and gives_charge_back(reply):
            self.ledger.refund(*charge)
