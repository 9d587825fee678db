"""Hostile callers against a real corrald with a real VM (issue 16): thousands
of connections kept coming at both its sockets, and a routing id taken over
by another caller while its task runs. Callers are still served, the daemon's
fds stay bounded, and an answer never reaches a caller it was not for.
(The same attacks on the ROUTER alone, no VM: tests/unit/test_hostile_clients.py.)
"""

import json
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

import config
from protocol.channel import codec
from protocol.client import admin
from protocol.client.api import Client
from protocol.wire.tasks import DAEMON_TO_CLIENT, PROTOCOL_TAG, StatusReply, StatusRequest
from tests.support.corrald import write_site_config
from tests.support.flood import flood_results, start_flooders
from tests.support.host import NOBODY, TEST_INSTANCE, as_user, free_port, process_fds, process_rss_mib
from tests.support.intake import request
from tests.support.service import service_config, start_service
from tests.support.waiting import wait_until


# --- connection floods against a real corrald (issue 16, section 1) ------------------------------------

FLOOD_NOFILE = 4096  # corrald's open-file limit in these tests: cheap to reach
FLOOD_SECONDS = 12.0


def metric_samples(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {name: float(value) for name, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def limit_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD_NOFILE, FLOOD_NOFILE))


def true_p50_ms(client: Client, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        reply = client.run(["true"], wait_s=60)
        assert reply.error_code == "" and reply.exit_code == 0, reply
        times.append((time.monotonic() - t0) * 1000)
    return statistics.median(times)


def test_a_connection_flood_on_both_endpoints_is_shed_and_callers_are_still_served(tmp_path):
    """corrald under `ulimit -n 4096` with 64 client and 8 control connections
    allowed; three processes keep thousands of connections coming at its two
    sockets (idle ones, finished NULL handshakes, and on the control socket
    both) for 12 s, each one shed replaced at once."""
    instance = (TEST_INSTANCE + "f")[:16]
    metrics_port = free_port()
    site = write_site_config(tmp_path, instance, daemon={"max_connections": 64}, control={"max_connections": 8},
                             pool={"max_uses": 1000},  # no retirement and cold boot in the middle of the figures
                             metrics={"port": metrics_port})
    cfg = config.load(site)
    log = tmp_path / "corrald.log"
    with open(log, "wb") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "actors.daemon", "--config", str(site)],
                                  stdout=subprocess.DEVNULL, stderr=log_file, preexec_fn=limit_nofile,
                                  cwd=Path(__file__).resolve().parents[2])
    try:
        socket_path = Path(cfg.daemon.endpoint[len("ipc://"):])
        wait_until(lambda: socket_path.exists() or daemon.poll() is not None, 120, "corrald's socket")
        with Client(cfg.daemon.endpoint) as caller:
            deadline = time.monotonic() + 180
            while dict(caller.status(wait_s=10).pool).get(b"ready") != b"1":
                assert daemon.poll() is None and time.monotonic() < deadline, "corrald's VM never got ready"
                time.sleep(0.2)
            idle_ms = true_p50_ms(caller, 30)
            fds_before, rss_before = process_fds(daemon.pid), process_rss_mib(daemon.pid)
            flooders = start_flooders([(cfg.daemon.endpoint, "idle", 3000), (cfg.daemon.endpoint, "null", 3000),
                                       (cfg.control.endpoint, "null", 1500)], FLOOD_SECONDS)
            time.sleep(2)  # the flood is under way
            most_fds, most_rss = 0, 0.0
            during = []
            slow = caller.submit(["sh", "-c", "sleep 1; echo survived"], timeout_s=30)
            while any(f.poll() is None for f in flooders):
                assert daemon.poll() is None, "corrald died under the flood: " + log.read_text()[-2000:]
                most_fds = max(most_fds, process_fds(daemon.pid))
                most_rss = max(most_rss, process_rss_mib(daemon.pid))
                during.append(true_p50_ms(caller, 1))
            counts = flood_results(flooders)
            assert slow.result(timeout=60).stdout == b"survived\n"
            assert daemon.poll() is None
            flood_ms = statistics.median(during)
            samples = metric_samples(metrics_port)
            refused = {e: samples.get(f'corral_connections_refused_total{{endpoint="{e}"}}', 0)
                       for e in ("client", "control")}
            # A new caller and an operator are served once the flood is over.
            with Client(cfg.daemon.endpoint) as newcomer:
                assert newcomer.run(["echo", "after"], wait_s=60).stdout == b"after\n"
            assert admin.request(cfg.control.endpoint, "status", []).error_code == ""
            time.sleep(2)
            fds_after, rss_after = process_fds(daemon.pid), process_rss_mib(daemon.pid)
    except BaseException:
        print(log.read_text()[-5000:])
        raise
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        finally:
            if daemon.poll() is None:
                daemon.kill()
    opened = sum(c["opened"] for c in counts)
    print(f"FIGURE connection flood: {opened} connections opened in {FLOOD_SECONDS:g} s "
          f"({[c['opened'] for c in counts]} client idle/NULL, control), refused {refused['client']:.0f} client "
          f"{refused['control']:.0f} control; corrald fds {fds_before} before, at most {most_fds} during "
          f"(limit {FLOOD_NOFILE}), {fds_after} after")
    print(f"FIGURE connection flood: `true` p50 {idle_ms:.0f} ms idle, {flood_ms:.0f} ms during the flood "
          f"({len(during)} runs, slowest {max(during):.0f} ms)")
    print(f"FIGURE connection flood: corrald RSS {rss_before:.0f} MiB before, at most {most_rss:.0f} MiB "
          f"during, {rss_after:.0f} MiB after")
    assert opened > FLOOD_NOFILE, "the flood must open more connections than corrald has fds"
    assert refused["client"] > 0 and refused["control"] > 0
    assert most_fds < FLOOD_NOFILE - 256
    assert flood_ms <= 2 * idle_ms + 50, f"`true` p50 {flood_ms:.0f} ms under the flood vs {idle_ms:.0f} ms idle"
    assert daemon.returncode == 0



# --- answers follow the connection, not the routing id (issue 16, section 4) ------------------------------

def listen(endpoint: str, routing_id: bytes, first: bytes, listen_s: float) -> str:
    """Connect with `routing_id`, send `first`; every message received within
    `listen_s`, as JSON (run in a child as another user by as_user)."""
    sock = zmq.Context().socket(zmq.DEALER)  # a new context: this is a forked child
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(endpoint)
    sock.send_multipart([b"", PROTOCOL_TAG, first])
    got = []
    deadline = time.monotonic() + listen_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            got.append([frame.hex() for frame in sock.recv_multipart()])
    sock.close()
    return json.dumps(got)


@pytest.mark.parametrize("attacker_uid, identity", [(NOBODY, "other"), (0, "same")])
def test_a_routing_id_taken_over_after_its_caller_left_gets_none_of_its_answers(hypervisor, attacker_uid,
                                                                                 identity):
    """A victim submits `sleep 3; echo secret` with a known routing id and
    disconnects; then a caller (another local user, or the same one) connects
    with that routing id while the task runs. It gets its own status reply and
    nothing else; the victim's answer is dropped, once, and counted."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"corral-{TEST_INSTANCE}-"))
    run_dir.chmod(0o755)  # another local user may reach the socket: the case under test
    cfg = service_config(run_dir, pool={"size": 1})
    svc = start_service(cfg, hypervisor)
    try:
        (run_dir / "corrald.sock").chmod(0o777)
        with Client(cfg.daemon.endpoint) as c:
            deadline = time.monotonic() + 180
            while dict(c.status(wait_s=10).pool).get(b"ready") != b"1":
                assert time.monotonic() < deadline, "the VM never got ready"
                time.sleep(0.2)
        routing_id = b"victim-" + identity.encode()
        victim = zmq.Context.instance().socket(zmq.DEALER)
        victim.setsockopt(zmq.LINGER, 0)
        victim.setsockopt(zmq.ROUTING_ID, routing_id)
        victim.connect(cfg.daemon.endpoint)
        secret = request("victim", argv=(b"sh", b"-c", b"sleep 3; echo secret"), timeout_ms=30_000)
        victim.send_multipart([b"", PROTOCOL_TAG, codec.encode(secret)])
        wait_until(lambda: svc.server.unanswered() == 1, 10, "the victim's task accepted")
        victim.close()
        time.sleep(0.3)
        text = as_user(attacker_uid, listen, cfg.daemon.endpoint, routing_id,
                       codec.encode(StatusRequest("attacker")), 8.0)
        got = [[bytes.fromhex(frame) for frame in message] for message in json.loads(text)]
        wait_until(lambda: svc.server.unanswered() == 0, 30, "the victim's task answered")
        metrics = svc.metrics
        undeliverable = metrics.counter_total(metrics.answers_undeliverable)
        reuse = {s.labels["identity"]: s.value for m in metrics.routing_id_reuse.collect() for s in m.samples
                 if s.name.endswith("_total")}
        completed = metrics.counter_total(metrics.tasks)
    finally:
        svc.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    replies_got = [codec.decode(m[2], DAEMON_TO_CLIENT) for m in got if len(m) == 3]
    assert len(got) == 1 and len(replies_got) == 1, f"the attacker received {got}"
    assert isinstance(replies_got[0], StatusReply) and replies_got[0].request_id == "attacker"
    assert undeliverable == 1 and completed >= 1
    assert reuse.get(identity) == 1, reuse
    print(f"FIGURE routing id takeover ({identity} identity): the attacker got 1 message (its own status), "
          f"0 of the victim's; answers undeliverable {undeliverable:.0f}, reuse attempts counted {reuse}")
