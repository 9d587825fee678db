"""`corral admin sessions` and `session-close` over a real control socket, in
front of a real Sessions actor whose Scheduler and Supervisors are recording
actors (no VM): operators see every session, whoever owns it, and can end any."""

import subprocess
import sys

import pykka
import pytest

from actors.directory import Directory
from actors.edge.control import ControlServer
from actors.edge.metrics import Metrics
from actors.messages import EndSession
from actors.session_table import SessionsView
from protocol.client import admin
from tests.support.waiting import wait_until
from tests.unit.test_session_snapshots import SnapshotWorld
from tests.unit.test_sessions import LIMITS, World, wait_told


class OperatorsView:
    """What the ControlServer reads of the service for these commands."""

    def __init__(self, directory: Directory, metrics: Metrics, view: SessionsView):
        self.directory = directory
        self.metrics = metrics
        self.sessions_view = view


@pytest.fixture
def control(tmp_path):
    world = World(LIMITS)
    server = ControlServer(f"ipc://{tmp_path}/control/control.sock",
                           OperatorsView(world.directory, world.metrics, world.view),
                           faults_enabled=False, scram_pause_timeout_s=1.0, max_connections=4)
    server.start()
    yield world, server.endpoint
    server.stop()
    world.stop()
    pykka.ActorRegistry.stop_all()


def fields(reply) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in reply.fields}


def test_operators_list_every_session_whoever_owns_it(control):
    world, endpoint = control
    assert admin.request(endpoint, "sessions", []).message == "0 sessions"
    alices, _ = world.opened("alice", labels=((b"job", b"build"),))
    bobs, _ = world.opened("bob")
    world.open("carol")  # opening: its VM has not come yet
    world.settled()  # the view the command reads is published after each message is handled
    reply = admin.request(endpoint, "sessions", [])
    assert reply.ok and reply.message == "3 sessions"
    listed = fields(reply)
    assert listed[alices].startswith("owner=alice state=open age=") and listed[alices].endswith("labels=job=build")
    assert "vm=corral-test-" in listed[alices] and "execs=0 running=0" in listed[alices]
    assert listed[bobs].startswith("owner=bob state=open ")
    (carols,) = set(listed) - {alices, bobs}
    assert listed[carols].startswith("owner=carol state=opening") and "vm=- " in listed[carols]


def test_an_operator_closes_anyones_session_and_an_unknown_one_is_refused(control):
    world, endpoint = control
    session_id, supervisor = world.opened("bob")
    reply = admin.request(endpoint, "session-close", [session_id])
    assert reply.ok and session_id in reply.message
    assert wait_told(supervisor, EndSession) == [EndSession("operator")]
    refused = admin.request(endpoint, "session-close", ["s-0000000000000000"])
    assert (refused.ok, refused.error_code) == (False, "invalid_argument")
    assert "no session 's-0000000000000000'" in refused.message
    usage = admin.request(endpoint, "session-close", [])
    assert (usage.error_code, usage.message) == ("invalid_argument", "usage: session-close SESSION_ID")


def test_corral_admin_sessions_prints_one_line_per_session(control):
    world, endpoint = control
    session_id, _ = world.opened("alice")
    world.settled()  # its answer goes out before the view shows it open
    done = subprocess.run([sys.executable, "-m", "protocol.client", "admin", "--control", endpoint, "sessions"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "1 session"
    assert lines[1].split()[:3] == [session_id, "owner=alice", "state=open"]


def test_operators_see_a_paused_session_without_a_vm_and_closing_it_discards_its_snapshot(tmp_path):
    world = SnapshotWorld(tmp_path / "snapshots")
    (tmp_path / "snapshots").mkdir()
    server = ControlServer(f"ipc://{tmp_path}/control/control.sock",
                           OperatorsView(world.directory, world.metrics, world.view),
                           faults_enabled=False, scram_pause_timeout_s=1.0, max_connections=4)
    server.start()
    try:
        session_id, snapshot = world.paused("bob")
        world.settled()
        listed = fields(admin.request(server.endpoint, "sessions", []))
        assert listed[session_id].startswith("owner=bob state=paused ") and " vm=- " in listed[session_id]
        assert admin.request(server.endpoint, "session-close", [session_id]).ok
        wait_until(lambda: not snapshot.directory.exists(), 5, "the paused session closed")
        assert world.metrics.sessions_ended.labels("operator")._value.get() == 1
    finally:
        server.stop()
        world.stop()
