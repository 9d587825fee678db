"""EgressProxy alone (actors/egress/proxy.py): a fake guest relay speaks the
egress port's frames to it over a unix socket, as QEMU's end would carry them,
and local servers on loopback stand for the outside (so these tests leave
loopback and this host's addresses out of the always-denied set; corrald never
does, and tests/vm/test_egress.py checks the real set against real VMs)."""

import asyncio
import ipaddress
import socket
import threading
import time
import zlib

import pytest

from actors.egress import dns
from actors.egress.proxy import EgressProxy, EgressSettings, TaskEgress, parse_request, parse_resolver, task_env
from actors.egress.rules import NEVER, parse_rules
from protocol.channel import codec
from protocol.channel.egress import HOST_SENDS, StreamClose, StreamData, StreamEof, StreamOpen
from protocol.channel.frame import FrameDecoder, FrameEncoder

NOT_LOOPBACK = tuple(n for n in NEVER if n != ipaddress.ip_network("127.0.0.0/8"))


class FakeRelay:
    """The guest's end of the port: QEMU listens on the socket, the proxy connects."""

    def __init__(self, path):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.sock = None
        self.encoder = FrameEncoder(zlib.crc32)
        self.decoder = FrameDecoder(zlib.crc32)
        self.pending = []

    def accept(self):
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(10)

    def send(self, message):
        self.sock.sendall(self.encoder.encode(codec.encode(message)))

    def receive(self):
        while not self.pending:
            data = self.sock.recv(65536)
            assert data, "the proxy closed the port"
            self.pending += [codec.decode(p, HOST_SENDS) for p in self.decoder.feed(data)]
        return self.pending.pop(0)

    def exchange(self, stream, request: bytes) -> tuple[bytes, bool]:
        """Open `stream`, send `request`, collect what comes back until the proxy closes it."""
        self.send(StreamOpen(stream=stream))
        self.send(StreamData(stream=stream, data=request))
        got, eof = b"", False
        while True:
            message = self.receive()
            assert message.stream == stream
            if isinstance(message, StreamData):
                got += message.data
            elif isinstance(message, StreamEof):
                eof = True
                self.send(StreamEof(stream=stream))
            elif isinstance(message, StreamClose):
                return got, eof


def http_server(reply: bytes):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    seen = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                seen.append(conn.recv(65536))
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return server, seen


@pytest.fixture
def proxy_and_relay(tmp_path):
    violations = []
    proxy = EgressProxy(EgressSettings(resolver=None), never=NOT_LOOPBACK, local_addresses=frozenset)
    proxy.start()
    relay = FakeRelay(tmp_path / "vm.egress")
    proxy.attach("vm1", tmp_path / "vm.egress", lambda code, detail: violations.append((code, detail)))
    relay.accept()
    yield proxy, relay, violations
    proxy.stop()


def test_connect_allowed_by_an_address_rule_relays_both_ways(proxy_and_relay):
    proxy, relay, _ = proxy_and_relay
    server, seen = http_server(b"pong")
    port = server.getsockname()[1]
    proxy.begin_task("vm1", TaskEgress("t1", "local", parse_rules([f"127.0.0.1:{port}"])))
    got, eof = relay.exchange(1, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\nping".encode())
    assert got == b"HTTP/1.1 200 Connection established\r\n\r\npong" and eof
    assert seen == [b"ping"]


def test_absolute_http_request_is_forwarded_in_origin_form_with_connection_close(proxy_and_relay):
    proxy, relay, _ = proxy_and_relay
    server, seen = http_server(b"HTTP/1.0 200 OK\r\n\r\nhi")
    port = server.getsockname()[1]
    proxy.begin_task("vm1", TaskEgress("t1", "local", parse_rules([f"127.0.0.1:{port}"])))
    got, _ = relay.exchange(1, f"GET http://127.0.0.1:{port}/a?b=1 HTTP/1.1\r\nHost: h\r\n"
                               f"Proxy-Connection: keep-alive\r\n\r\n".encode())
    assert got == b"HTTP/1.0 200 OK\r\n\r\nhi"
    assert seen[0].startswith(b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\n") and b"Proxy-" not in seen[0]
    assert seen[0].endswith(b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("target, why", [
    ("127.0.0.1:1", "no rule allows 127.0.0.1:1"),
    ("denied.test:443", "no rule allows denied.test:443"),
    ("allowed.test:22", "name rules allow ports 80 and 443 only"),
])
def test_targets_outside_the_rules_get_403_naming_why(proxy_and_relay, target, why):
    proxy, relay, _ = proxy_and_relay
    proxy.begin_task("vm1", TaskEgress("t1", "local", parse_rules(["allowed.test"])))
    got, _ = relay.exchange(1, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 403 Forbidden") and why.encode() in got


def test_between_tasks_streams_are_refused_and_end_task_closes_open_ones(proxy_and_relay):
    proxy, relay, _ = proxy_and_relay
    relay.send(StreamOpen(stream=1))
    assert relay.receive() == StreamClose(stream=1)  # no task: refused
    proxy.begin_task("vm1", TaskEgress("t1", "local", ()))
    time.sleep(0.1)
    relay.send(StreamOpen(stream=2))  # no request yet: held open
    relay.send(StreamData(stream=2, data=b"CONNECT"))
    proxy.end_task("vm1")
    assert relay.receive() == StreamClose(stream=2)


def test_a_garbled_frame_is_a_violation(proxy_and_relay):
    _, relay, violations = proxy_and_relay
    relay.sock.sendall(b"\x00" * 16)
    deadline = time.monotonic() + 5
    while not violations and time.monotonic() < deadline:
        time.sleep(0.02)
    assert violations and "egress port" in violations[0][1]


def test_names_resolve_through_the_configured_server_and_every_address_is_checked(tmp_path):
    dns_server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns_server.bind(("127.0.0.1", 0))
    records = {"good.test": ["203.0.113.10"], "rebind.test": ["203.0.113.10", "10.0.0.1"]}

    def serve():
        while True:
            data, addr = dns_server.recvfrom(512)
            reply = dns.answer(data, records)
            if reply:
                dns_server.sendto(reply, addr)

    threading.Thread(target=serve, daemon=True).start()
    proxy = EgressProxy(EgressSettings(resolver=dns_server.getsockname()))
    proxy.start()
    rules = parse_rules(["good.test", "rebind.test", "missing.test"])
    decide = lambda host: asyncio.run_coroutine_threadsafe(  # noqa: E731
        proxy._decide(rules, host, 443), proxy.loop).result(10)
    assert decide("good.test").allowed and decide("good.test").addresses == (ipaddress.ip_address("203.0.113.10"),)
    assert "private range" in decide("rebind.test").reason
    assert decide("missing.test").reason == "missing.test does not resolve"
    proxy.stop()


def test_helpers():
    assert parse_resolver("") is None and parse_resolver("198.51.100.53") == ("198.51.100.53", 53)
    assert parse_resolver("[::1]:5353") == ("::1", 5353) and parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    with pytest.raises(ValueError):
        parse_resolver("resolver.example")
    env = task_env(((b"http_proxy", b"mine"),))
    assert (b"http_proxy", b"mine") in env and (b"https_proxy", b"http://127.0.0.1:3128") in env
    assert parse_request(b"CONNECT [2001:db8::1]:443 HTTP/1.1").host == "2001:db8::1"
