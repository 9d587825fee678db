"""A connection flooder for the hostile-client tests (test_hostile_clients.py in
tests/unit/ and tests/vm/), run as a child process (start_flooders):

    python -m tests.support.flood ENDPOINT MODE HOLD SECONDS

It keeps up to HOLD connections open to a ZeroMQ endpoint (ipc:// or tcp://)
for SECONDS, opening a new one for each that corrald shuts down, and prints
one JSON line of counts at the end. MODE is what each connection does:
`idle` sends nothing (a connection that never starts its handshake), `null`
completes a ZMTP 3.0 NULL handshake as a DEALER (an idle caller), `curve`
offers the CURVE mechanism and then stalls (a handshake that never ends).
Plain sockets, not zmq ones, so one process can hold thousands cheaply.
"""

from __future__ import annotations

import json
import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SIGNATURE = b"\xff" + b"\0" * 8 + b"\x7f"


def greeting(mechanism: bytes) -> bytes:
    return SIGNATURE + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" + b"\0" * 31


def ready_command() -> bytes:
    body = b"\x05READY" + b"\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
    return b"\x04" + bytes([len(body)]) + body


OPENING = {"idle": b"", "null": greeting(b"NULL") + ready_command(), "curve": greeting(b"CURVE")}


def connect(endpoint: str) -> socket.socket:
    if endpoint.startswith("ipc://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = endpoint[len("ipc://"):]
    else:
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        address = (host, int(port))
    sock.settimeout(1.0)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def flood(endpoint: str, mode: str, hold: int, seconds: float) -> dict:
    opening = OPENING[mode]
    held: dict[int, socket.socket] = {}
    poller = select.epoll()
    counts = {"opened": 0, "cut": 0, "failed": 0, "most_held": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        while len(held) < hold and time.monotonic() < deadline:
            try:
                sock = connect(endpoint)
                if opening:
                    sock.send(opening)
            except OSError:  # backlog full or refused: try again after reaping
                counts["failed"] += 1
                break
            held[sock.fileno()] = sock
            poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            counts["opened"] += 1
        counts["most_held"] = max(counts["most_held"], len(held))
        for fd, _ in poller.poll(0.01):
            sock = held.pop(fd)
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data:  # the server's greeting: still connected
                held[fd] = sock
                continue
            poller.unregister(fd)
            sock.close()
            counts["cut"] += 1
    counts["held_at_end"] = len(held)
    for sock in held.values():
        sock.close()
    return counts


def start_flooders(targets: list[tuple[str, str, int]], seconds: float) -> list[subprocess.Popen]:
    """One flooder process per (endpoint, mode, hold), for `seconds`."""
    # Niced: on two cores, three busy flooders would otherwise starve the VM's
    # TCG thread, and the figure would measure the machine, not corrald.
    return [subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "tests.support.flood", endpoint, mode,
                              str(hold), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=REPO)
            for endpoint, mode, hold in targets]


def flood_results(flooders: list[subprocess.Popen]) -> list[dict]:
    """Each flooder's counts, once it is done."""
    return [json.loads(f.communicate(timeout=120)[0]) for f in flooders]


def main() -> None:
    endpoint, mode, hold, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(flood(endpoint, mode, hold, seconds)), flush=True)


if __name__ == "__main__":
    main()
