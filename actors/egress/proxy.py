"""EgressProxy: the host end of every net:egress VM's egress port, and the
only way out of such a VM (docs/egress.md).

Each stream the guest's relay opens is one TCP connection a task made to the
guest's proxy address. Here it is an HTTP proxy client: its first request is
`CONNECT host:port` (HTTPS, or any TCP an address rule allows) or an
absolute-form `GET http://host/...` (plain HTTP). The proxy checks the target
against the rules of the task running on that VM now, resolves a name itself,
checks every address it resolved against the always-denied set (a name
resolving to the host, loopback, link-local or a private range gets nowhere),
connects only to those addresses, and then relays bytes. What the client says
after that (a TLS SNI, a Host header) cannot move the connection: it is made.

Rules are per task: the Supervisor calls begin_task before the VM resumes for
a task and end_task when the task is answered; end_task closes every stream
of that VM, and between tasks every new stream is refused. So a rule change
takes effect for the next task, never mid-task. Each decision is logged
(task, identity, VM, destination, verdict, why) and counted in
corral_egress_connections_total{verdict}.

One thread runs one asyncio loop for all VMs; the public methods only post to
it, so no actor ever waits on the proxy. The port speaks the guest channel's
frames (magic, length, CRC, sequence) with protocol/channel/egress.py's
messages; a guest that breaks them (it is root there, so hostile) is reported
to its Supervisor as a protocol violation and the VM ends.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from actors.egress import dns
from actors.egress.rules import (NEVER, Decision, IPNetwork, Rule, WEB_PORTS, decide_address, host_addresses,
                                 matching_domain_rule, parse_host)
from protocol.channel import codec
from protocol.channel.egress import (GUEST_SENDS, MAX_CHUNK, MAX_STREAMS, PROXY_HOST, PROXY_PORT, StreamClose,
                                     StreamData, StreamEof, StreamOpen)
from protocol.channel.errors import ProtocolError
from protocol.channel.frame import FrameDecoder, FrameEncoder

log = logging.getLogger("corral.egress")

MAX_HEAD = 8192  # a proxy request's head (request line and headers)
MAX_BUFFERED = 1 << 20  # guest bytes held per VM for streams that have not taken them yet
CONNECT_RETRY_S = 0.05  # QEMU creates the port's socket as the VM starts
HOST_ADDRESSES_TTL_S = 1.0
DROPPED_HEADERS = (b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive")
PROXY_ENV = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
PROXY_URL = f"http://{PROXY_HOST}:{PROXY_PORT}".encode()


def task_env(env: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...]:
    """A net:egress task's environment: the guest's proxy address as http(s)_proxy,
    unless the caller set them."""
    names = {key for key, _ in env}
    return env + tuple((name.encode(), PROXY_URL) for name in PROXY_ENV if name.encode() not in names)


@dataclass(frozen=True)
class EgressSettings:
    resolver: tuple[str, int] | None  # None: the host's resolver (getaddrinfo)
    connect_timeout_s: float = 10.0
    resolve_timeout_s: float = 5.0
    request_timeout_s: float = 30.0  # the proxy request's head must come within this
    attach_timeout_s: float = 30.0  # the port's socket must appear within this

    @classmethod
    def from_config(cls, egress) -> EgressSettings:
        return cls(resolver=parse_resolver(egress.resolver), connect_timeout_s=egress.connect_timeout_s,
                   resolve_timeout_s=egress.resolve_timeout_s, request_timeout_s=egress.request_timeout_s)


def parse_resolver(text: str) -> tuple[str, int] | None:
    """"" -> None (the host's resolver); "IP" or "IP:PORT" ("[IPv6]:PORT") -> (ip, port)."""
    if not text:
        return None
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # ValueError if it is no address
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not 1-65535")
    return host, port


@dataclass(frozen=True)
class TaskEgress:
    """What one task may reach: its rules, and who it is for the audit log."""

    task_id: str
    identity: str
    rules: tuple[Rule, ...]


class Stream:
    def __init__(self, stream_id: int):
        self.id = stream_id
        self.inbox: asyncio.Queue = asyncio.Queue()  # bytes from the guest, None at its EOF
        self.buffered = 0
        self.session: asyncio.Task | None = None
        self.closed = False


@dataclass
class VmPort:
    vm_id: str
    socket_path: Path
    on_violation: Callable[[str, str], None]  # (code, detail), called on the loop's thread
    task: TaskEgress | None = None
    streams: dict[int, Stream] = field(default_factory=dict)
    last_stream: int = 0
    writer: asyncio.StreamWriter | None = None
    encoder: FrameEncoder = field(default_factory=lambda: FrameEncoder(zlib.crc32))
    buffered: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)
    serving: asyncio.Task | None = None

    def send(self, message) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(self.encoder.encode(codec.encode(message)))


class Denied(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ProxyRequest:
    connect: bool
    host: str
    port: int
    forward_head: bytes  # what goes to the server first (plain HTTP); b"" for CONNECT


def parse_request(head: bytes) -> ProxyRequest:
    """A proxy request's head (up to and without the blank line); Denied(400) if
    it is not a CONNECT or an absolute-form http:// request."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise Denied(400, "not an HTTP proxy request")
    method, target, version = parts
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError:
        raise Denied(400, "request target is not ASCII") from None
    if method == b"CONNECT":
        host, sep, port = target_text.rpartition(":")
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise Denied(400, f"CONNECT target {target_text!r} is not host:port")
        return ProxyRequest(True, host.removeprefix("[").removesuffix("]"), int(port), b"")
    url = urlsplit(target_text)
    if url.scheme != "http" or not url.hostname:
        raise Denied(400, f"{target_text[:100]!r}: only CONNECT (for HTTPS) and absolute http:// requests "
                          "go through this proxy")
    try:
        port = url.port or 80
    except ValueError:
        raise Denied(400, f"{target_text[:100]!r} has a bad port") from None
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = [line for line in lines[1:] if line and line.split(b":", 1)[0].strip().lower() not in DROPPED_HEADERS]
    if not any(line.split(b":", 1)[0].strip().lower() == b"host" for line in headers):
        headers.insert(0, b"Host: " + url.netloc.encode())
    forward = b"\r\n".join([b" ".join((method, path.encode(), version)), *headers, b"Connection: close"])
    return ProxyRequest(False, url.hostname, port, forward + b"\r\n\r\n")


def response(status: int, reason: str) -> bytes:
    text = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
    if status == 200:
        return b"HTTP/1.1 200 Connection established\r\n\r\n"
    body = f"corral egress: {reason}\n".encode()
    return (f"HTTP/1.1 {status} {text}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


class EgressProxy:
    def __init__(self, settings: EgressSettings, metrics=None, never: tuple[IPNetwork, ...] = NEVER,
                 local_addresses: Callable[[], frozenset] = host_addresses):
        self.settings = settings
        self.metrics = metrics
        # Unit tests of the proxy alone leave loopback out of both; corrald never does.
        self.never = never
        self.local_addresses = local_addresses
        self.loop = asyncio.new_event_loop()
        self.ports: dict[str, VmPort] = {}  # the loop's thread only
        self._host = (0.0, frozenset())
        self._thread = threading.Thread(target=self._run, name="egress-proxy", daemon=True)

    # --- any thread: each posts to the loop and returns at once ---------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop_all)
            self._thread.join(5)

    def attach(self, vm_id: str, socket_path: Path, on_violation: Callable[[str, str], None]) -> None:
        """Serve this VM's egress port (its socket appears as the VM starts)."""
        self._post(self._attach, vm_id, Path(socket_path), on_violation)

    def detach(self, vm_id: str) -> None:
        self._post(self._detach, vm_id)

    def begin_task(self, vm_id: str, task: TaskEgress) -> None:
        """From now on this VM's new streams are checked against `task`'s rules."""
        self._post(self._begin_task, vm_id, task)

    def end_task(self, vm_id: str) -> None:
        """Close every stream of this VM and refuse new ones until the next task."""
        self._post(self._end_task, vm_id)

    def _post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: corrald is stopping
            pass

    # --- the loop's thread ----------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def _stop_all(self) -> None:
        tasks = [p.serving for p in self.ports.values() if p.serving is not None]
        tasks += [s.session for p in self.ports.values() for s in p.streams.values() if s.session is not None]
        for vm_id in list(self.ports):
            self._detach(vm_id)
        finished = asyncio.gather(*tasks, return_exceptions=True)
        finished.add_done_callback(lambda _: self.loop.stop())

    def _attach(self, vm_id: str, socket_path: Path, on_violation) -> None:
        self._detach(vm_id)
        port = VmPort(vm_id, socket_path, on_violation)
        port.room.set()
        self.ports[vm_id] = port
        port.serving = self.loop.create_task(self._serve(port))

    def _detach(self, vm_id: str) -> None:
        port = self.ports.pop(vm_id, None)
        if port is None:
            return
        self._close_streams(port)
        if port.serving is not None:
            port.serving.cancel()
        if port.writer is not None:
            port.writer.close()

    def _begin_task(self, vm_id: str, task: TaskEgress) -> None:
        port = self.ports.get(vm_id)
        if port is not None:
            self._close_streams(port)
            port.task = task

    def _end_task(self, vm_id: str) -> None:
        port = self.ports.get(vm_id)
        if port is not None:
            port.task = None
            self._close_streams(port)

    def _close_streams(self, port: VmPort) -> None:
        for stream in list(port.streams.values()):
            self._close(port, stream)

    def _close(self, port: VmPort, stream: Stream) -> None:
        """The stream is over: its session cancelled, the guest told, its bytes released."""
        if stream.closed:
            return
        stream.closed = True
        port.streams.pop(stream.id, None)
        port.buffered -= stream.buffered
        stream.buffered = 0
        port.room.set()
        if stream.session is not None and stream.session is not asyncio.current_task():
            stream.session.cancel()
        port.send(StreamClose(stream=stream.id))

    async def _serve(self, port: VmPort) -> None:
        deadline = time.monotonic() + self.settings.attach_timeout_s
        while True:
            try:
                reader, port.writer = await asyncio.open_unix_connection(str(port.socket_path))
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    log.warning("VM %s: cannot connect to its egress port %s: %s", port.vm_id, port.socket_path, e)
                    return
                await asyncio.sleep(CONNECT_RETRY_S)
        decoder = FrameDecoder(zlib.crc32, max_payload=MAX_CHUNK + 64)
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    return  # the VM is gone; its Supervisor hears of it on the agent's channel
                for payload in decoder.feed(data):
                    await self._guest_said(port, codec.decode(payload, GUEST_SENDS))
        except ProtocolError as e:
            log.warning("VM %s broke the egress port's protocol: %s", port.vm_id, e)
            port.on_violation(getattr(e, "code", "egress_protocol"), f"egress port: {e}")
            self._detach(port.vm_id)

    async def _guest_said(self, port: VmPort, message) -> None:
        if isinstance(message, StreamOpen):
            sid = message.stream
            if port.task is None or sid <= port.last_stream or len(port.streams) >= MAX_STREAMS:
                # Between tasks, a reused id, or too many at once: refused (not a violation:
                # a stream can race a task's end).
                port.send(StreamClose(stream=sid))
                port.last_stream = max(port.last_stream, sid)
                return
            port.last_stream = sid
            stream = port.streams[sid] = Stream(sid)
            stream.session = self.loop.create_task(self._session(port, stream, port.task))
            return
        stream = port.streams.get(message.stream)
        if stream is None:
            return  # closed meanwhile: ids are never reused
        if isinstance(message, StreamData):
            while port.buffered >= MAX_BUFFERED and not stream.closed:
                port.room.clear()
                await port.room.wait()  # backpressure: stop reading the port until sessions take their bytes
            if not stream.closed:
                stream.buffered += len(message.data)
                port.buffered += len(message.data)
                stream.inbox.put_nowait(message.data)
        elif isinstance(message, StreamEof):
            stream.inbox.put_nowait(None)
        elif isinstance(message, StreamClose):
            self._close(port, stream)

    async def _take(self, port: VmPort, stream: Stream) -> bytes | None:
        data = await stream.inbox.get()
        if data is not None:
            stream.buffered -= len(data)
            port.buffered -= len(data)
            port.room.set()
        return data

    # --- one proxied connection ------------------------------------------------------

    async def _session(self, port: VmPort, stream: Stream, task: TaskEgress) -> None:
        upstream, audited = None, False
        try:
            try:
                head, rest = await asyncio.wait_for(self._read_head(port, stream), self.settings.request_timeout_s)
            except asyncio.TimeoutError:
                raise Denied(400, f"no complete request within {self.settings.request_timeout_s:g} s") from None
            request = parse_request(head)
            decision = await self._decide(task.rules, request.host, request.port)
            self._audit(port, task, f"{request.host}:{request.port}", decision)
            audited = True
            if not decision.allowed:
                raise Denied(403, decision.reason)
            upstream = await self._connect(decision, request.port)
            reader, writer = upstream
            if request.connect:
                self._to_guest(port, stream, response(200, ""))
            else:
                writer.write(request.forward_head)
            if rest:
                writer.write(rest)
            await asyncio.gather(self._guest_to_server(port, stream, writer),
                                 self._server_to_guest(port, stream, reader))
        except Denied as e:
            if not audited:  # not even a request: a denied connection too
                self._audit(port, task, "-", Decision(False, e.reason))
            self._to_guest(port, stream, response(e.status, e.reason))
        except OSError as e:
            log.debug("VM %s stream %d: %s", port.vm_id, stream.id, e)
        finally:
            if upstream is not None:
                upstream[1].close()
            self._close(port, stream)

    async def _read_head(self, port: VmPort, stream: Stream) -> tuple[bytes, bytes]:
        buffer = b""
        while True:
            data = await self._take(port, stream)
            if data is None:
                raise Denied(400, "the client closed before its request was complete")
            buffer += data
            end = buffer.find(b"\r\n\r\n")
            if 0 <= end <= MAX_HEAD:
                return buffer[:end], buffer[end + 4:]
            if len(buffer) > MAX_HEAD:
                raise Denied(400, f"request head longer than {MAX_HEAD} bytes")

    async def _decide(self, rules: tuple[Rule, ...], host: str, port: int) -> Decision:
        known = self._host_addresses()
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            return decide_address(rules, literal, port, known, never=self.never)
        name = parse_host(host)
        if name is None:
            return Decision(False, f"{host[:80]!r} is not a host name")
        rule = matching_domain_rule(rules, name, port)
        if rule is None:
            where = "" if port in WEB_PORTS else " (name rules allow ports 80 and 443 only)"
            return Decision(False, f"no rule allows {name}:{port}{where}")
        addresses = await self._resolve(name, port)
        if not addresses:
            return Decision(False, f"{name} does not resolve")
        for address in addresses:
            checked = decide_address(rules, address, port, known, via_domain=rule, never=self.never)
            if not checked.allowed:
                return Decision(False, f"{name} resolves to {address}: {checked.reason}")
        return Decision(True, f"rule {rule}", addresses)

    def _host_addresses(self) -> frozenset:
        read_at, addresses = self._host
        if time.monotonic() - read_at > HOST_ADDRESSES_TTL_S:
            addresses = self.local_addresses()
            self._host = (time.monotonic(), addresses)
        return addresses

    async def _resolve(self, name: str, port: int) -> tuple:
        timeout = self.settings.resolve_timeout_s
        try:
            if self.settings.resolver is None:
                infos = await asyncio.wait_for(self.loop.getaddrinfo(name, port, type=1), timeout)
                return tuple(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
            return await asyncio.wait_for(self._query(name), timeout)
        except (OSError, asyncio.TimeoutError, ValueError):
            return ()

    async def _query(self, name: str) -> tuple:
        qid, packet = dns.query(name)
        loop = asyncio.get_running_loop()
        answered = loop.create_future()

        class Answer(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                found = dns.addresses(data, qid, name)
                if not answered.done() and (found or data[:2] == packet[:2]):
                    answered.set_result(found)

        transport, _ = await loop.create_datagram_endpoint(Answer, remote_addr=self.settings.resolver)
        try:
            transport.sendto(packet)
            return await answered
        finally:
            transport.close()

    async def _connect(self, decision: Decision, port: int):
        last = None
        for address in decision.addresses:
            try:
                return await asyncio.wait_for(asyncio.open_connection(str(address), port),
                                              self.settings.connect_timeout_s)
            except (OSError, asyncio.TimeoutError) as e:
                last = e
        raise Denied(502, f"cannot connect to {', '.join(map(str, decision.addresses))} port {port}: {last}")

    def _to_guest(self, port: VmPort, stream: Stream, data: bytes) -> None:
        if stream.closed:
            return
        for i in range(0, len(data), MAX_CHUNK):
            port.send(StreamData(stream=stream.id, data=data[i:i + MAX_CHUNK]))

    async def _guest_to_server(self, port: VmPort, stream: Stream, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await self._take(port, stream)
            if data is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async def _server_to_guest(self, port: VmPort, stream: Stream, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(MAX_CHUNK)
            if stream.closed:
                return
            if not data:
                port.send(StreamEof(stream=stream.id))
                return
            port.send(StreamData(stream=stream.id, data=data))
            await port.writer.drain()

    def _audit(self, port: VmPort, task: TaskEgress, destination: str, decision: Decision) -> None:
        verdict = "allowed" if decision.allowed else "denied"
        where = ", ".join(map(str, decision.addresses)) or "-"
        log.info("egress %s: task %s identity %s vm %s -> %s [%s] (%s)", verdict, task.task_id,
                 task.identity, port.vm_id, destination, where, decision.reason)
        if self.metrics is not None:
            self.metrics.egress_connections.labels(verdict).inc()
