"""Connection floods against the real ROUTER, no VMs: thousands of CurveZMQ
handshakes that stall over tcp, and bursts of thousands of idle callers. Each
runs for seconds by design (the floods are the measurement), so they sit apart
from the unit tests; everything here is marked `load` by tests/conftest.py.

(Floods against a real corrald with a VM: tests/vm/test_hostile_clients.py.)
"""

import os
import time

import pytest

from actors.directory import Directory
from actors.edge.identity import Admission
from actors.edge.intake_server import KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, IntakeServer
from actors.edge.metrics import Metrics
from protocol.client.api import Client, keygen
from tests.support.flood import flood_results, start_flooders
from tests.support.host import free_port, process_fds, process_rss_mib
from tests.support.intake import LIMITS, curve_config, intake_world


@pytest.fixture
def world(tmp_path):
    with intake_world(tmp_path) as world:
        yield world


@pytest.mark.parametrize("mode", ["curve", "idle"])
def test_a_tcp_flood_of_stalled_curve_handshakes_is_shed_and_a_key_holder_is_served(tmp_path, mode):
    """CurveZMQ over tcp: connections that offer CURVE and stall (or say
    nothing) count against daemon.max_connections from their accept on, are
    shed past it, and an allowed key holder is still answered."""
    keys_dir = tmp_path / "keys"
    keygen("corrald", keys_dir / "server")
    keygen("alice", keys_dir / "alice")
    (keys_dir / "clients").mkdir()
    (keys_dir / "clients" / "alice.key").write_bytes((keys_dir / "alice" / "alice.key").read_bytes())
    cfg = curve_config({"server_secret": str(keys_dir / "server" / "corrald.key_secret"),
                        "clients": str(keys_dir / "clients")})
    metrics = Metrics()
    directory = Directory()
    admission = Admission.from_config(cfg, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES, metrics)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = IntakeServer(endpoint, LIMITS, metrics, directory, admission, max_connections=32)
    server.start()
    alice = Client(endpoint, server_key=str(keys_dir / "server" / "corrald.key"),
                   client_key=str(keys_dir / "alice" / "alice.key_secret"))
    try:
        assert alice.status(wait_s=10).request_id
        fds_before = process_fds(os.getpid())
        (flooder,) = start_flooders([(endpoint, mode, 2000)], 6.0)
        most_fds, answered = 0, 0
        while flooder.poll() is None:
            most_fds = max(most_fds, process_fds(os.getpid()))
            assert alice.status(wait_s=10).request_id
            answered += 1
        (counts,) = flood_results([flooder])
        assert alice.status(wait_s=10).request_id  # and after it
        refused = metrics.counter_total(metrics.connections_refused)
    finally:
        alice.close()
        server.stop()
    print(f"FIGURE tcp {mode} flood: {counts['opened']} connections in 6 s, {refused} shed, "
          f"this process's fds {fds_before} -> at most {most_fds}; {answered} status round trips answered meanwhile")
    assert counts["opened"] > 4 * 32 and refused > 0 and answered > 0
    assert most_fds < fds_before + 32 + 1200  # the limit, plus what the monitor may hold unread


def test_memory_of_connection_bursts_is_given_back(world):
    """Three bursts of 4000 idle callers (finished NULL handshakes) against the
    real ROUTER with no limit in the way: RSS grows by the connections held
    and returns near where it was once they leave (glibc alone would keep it)."""
    directory, server, metrics = world
    server.guard.limit = 100_000
    rss = [process_rss_mib(os.getpid())]
    held = []
    for _ in range(3):
        (flooder,) = start_flooders([(server.endpoint, "null", 4000)], 4.0)
        peak = 0.0
        while flooder.poll() is None:
            peak = max(peak, process_rss_mib(os.getpid()))
            time.sleep(0.1)
        (counts,) = flood_results([flooder])
        assert counts["most_held"] == 4000 and counts["cut"] == 0, counts
        time.sleep(2.5)  # the disconnects read, and the trim they owe done
        held.append(peak)
        rss.append(process_rss_mib(os.getpid()))
    print(f"FIGURE connection bursts: 3 x 4000 connections; RSS {rss[0]:.0f} MiB before, peaks "
          f"{', '.join(f'{p:.0f}' for p in held)} MiB, after each {', '.join(f'{r:.0f}' for r in rss[1:])} MiB")
    assert held[0] - rss[0] > 50, "the premise: 4000 connections cost memory"
    assert rss[-1] < rss[0] + 40, f"RSS did not come back: {rss}"
