"""A small "internet" on this machine for the egress tests (docs/egress.md): a
network namespace joined to the host by a veth pair, holding addresses of the
documentation ranges (TEST-NET-2 and -3: not private, routed nowhere) and the
servers a test needs, started by the test and removed after it:

    allowed.test  203.0.113.10   HTTPS :443 (test CA), HTTP :80
    denied.test   198.51.100.10  HTTPS :443 (same CA: only the proxy stops it)
    echo          198.51.100.7   TCP echo :7
    DNS           203.0.113.53   UDP :53: allowed.test, denied.test, and names that
                                 resolve into the always-denied set
    the host's end of the veth: 198.18.0.1 (a host address: always denied)

No packet leaves this machine: the host routes only 203.0.113.0/24 and
198.51.100.0/24 into the namespace. The servers run in one child process in
the namespace (`python -m tests.support.internet serve`) and report every
connection and every DNS question on stdout, so a test can assert that a
server was never reached at all.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ALLOWED_IP = "203.0.113.10"
DENIED_IP = "198.51.100.10"
ECHO_IP = "198.51.100.7"
DNS_IP = "203.0.113.53"
HOST_END = "198.18.0.1"
NS_END = "198.18.0.2"
ROUTES = ("203.0.113.0/24", "198.51.100.0/24")
RECORDS = {
    "allowed.test": [ALLOWED_IP],
    "denied.test": [DENIED_IP],
    "rebind.test": ["127.0.0.1"],
    "private.test": ["10.1.2.3"],
    "metadata.test": ["169.254.169.254"],
    "host.test": [HOST_END],
}


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for allowed.test and denied.test:
    (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corral egress test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "allowed.test")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("allowed.test"), x509.DNSName("denied.test")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@dataclass
class Internet:
    """The running namespace: its CA, and what its servers saw."""

    name: str
    ca: Path
    events: list[dict] = field(default_factory=list)
    process: subprocess.Popen | None = None

    def seen(self, kind: str, since: int = 0, **where) -> list[dict]:
        """What the servers reported of `kind` matching `where`, after the first `since` events."""
        return [e for e in list(self.events)[since:]
                if e["kind"] == kind and all(e.get(k) == v for k, v in where.items())]

    def mark(self) -> int:
        return len(self.events)

    @property
    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()


def _cleanup(ns: str, veth: str) -> None:
    for route in ROUTES:
        _run("ip", "route", "del", route, check=False)
    _run("ip", "link", "del", veth, check=False)
    _run("ip", "netns", "del", ns, check=False)


def start(instance: str, directory: Path) -> Internet:
    ns, veth = f"corral-{instance}-net", f"c{instance[:8]}h"
    _cleanup(ns, veth)  # a crashed run's leftovers
    for route in ROUTES:
        if _run("ip", "route", "show", route).stdout.strip():
            raise RuntimeError(f"{route} is routed on this host already: the test internet would shadow it")
    _run("ip", "netns", "add", ns)
    try:
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "addr", "add", f"{HOST_END}/30", "dev", veth)
        _run("ip", "link", "set", veth, "up")
        inside = ("ip", "-n", ns)
        _run(*inside, "addr", "add", f"{NS_END}/30", "dev", "eth0")
        _run(*inside, "link", "set", "eth0", "up")
        _run(*inside, "link", "set", "lo", "up")
        for address in (ALLOWED_IP, DENIED_IP, ECHO_IP, DNS_IP):
            _run(*inside, "addr", "add", f"{address}/32", "dev", "lo")
        _run(*inside, "route", "add", "default", "via", HOST_END)
        for route in ROUTES:
            _run("ip", "route", "add", route, "via", NS_END, "dev", veth)
        ca, cert, key = make_ca(directory)
        net = Internet(ns, ca)
        repo = Path(__file__).resolve().parents[2]
        net.process = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.support.internet", "serve", str(cert), str(key)],
            cwd=repo, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
        ready = threading.Event()

        def read_events():
            for line in net.process.stdout:
                event = json.loads(line)
                if event["kind"] == "ready":
                    ready.set()
                else:
                    net.events.append(event)

        threading.Thread(target=read_events, daemon=True).start()
        if not ready.wait(30):
            raise RuntimeError("the test internet's servers did not start")
        return net
    except BaseException:
        stop_ns(ns, veth, None)
        raise


def stop(instance: str, net: Internet) -> None:
    stop_ns(net.name, f"c{instance[:8]}h", net.process)


def stop_ns(ns: str, veth: str, process: subprocess.Popen | None) -> None:
    if process is not None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
    _cleanup(ns, veth)


# --- in the namespace -------------------------------------------------------------

def _report(**event) -> None:
    print(json.dumps(event), flush=True)


def _serve_tcp(address: str, port: int, handle, tls: ssl.SSLContext | None = None) -> None:
    server = socket.create_server((address, port))

    def loop():
        while True:
            conn, peer = server.accept()
            _report(kind="tcp", address=address, port=port, peer=peer[0])
            threading.Thread(target=_handle, args=(conn, handle, tls), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def _handle(conn: socket.socket, handle, tls: ssl.SSLContext | None) -> None:
    try:
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        conn.settimeout(10)
        handle(conn)
    except (OSError, ssl.SSLError):
        pass
    finally:
        conn.close()


def _http(body: bytes):
    def handle(conn):
        request = b""
        while b"\r\n\r\n" not in request:
            data = conn.recv(4096)
            if not data:
                return
            request += data
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    return handle


def _echo(conn):
    while data := conn.recv(4096):
        conn.sendall(data)


def serve(cert: str, key: str) -> None:
    from actors.egress import dns

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    _serve_tcp(ALLOWED_IP, 443, _http(b"allowed over https\n"), tls)
    _serve_tcp(ALLOWED_IP, 80, _http(b"allowed over http\n"))
    _serve_tcp(DENIED_IP, 443, _http(b"denied server reached\n"), tls)
    _serve_tcp(DENIED_IP, 80, _http(b"denied server reached\n"))
    _serve_tcp(ECHO_IP, 7, _echo)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((DNS_IP, 53))
    _report(kind="ready")
    while True:
        packet, peer = udp.recvfrom(512)
        try:
            name = dns.read_name(packet, dns.HEADER.size)
        except (dns.BadAnswer, IndexError):
            continue
        _report(kind="dns", name=name, peer=peer[0])
        reply = dns.answer(packet, RECORDS)
        if reply:
            udp.sendto(reply, peer)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(*sys.argv[2:4])
