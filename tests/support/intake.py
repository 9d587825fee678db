"""Intake under test: the task limits its tests run with, a valid request to
change a field of, CurveZMQ key files and an identity config using them, and a
real Intake in front of a real Scheduler that no VM serves."""

from contextlib import contextmanager
from pathlib import Path

import pykka

import config
from actors.directory import Directory
from actors.edge.intake_server import IntakeServer, TaskLimits
from actors.edge.metrics import Metrics
from actors.intake import Intake
from actors.scheduler import QueueLimits, Scheduler
from actors.timers import Timers
from protocol.client.api import keygen
from protocol.wire.tasks import TaskRequest
from tests.support.probe import Recorder

LIMITS = TaskLimits(default_timeout_ms=60_000, max_timeout_ms=3_600_000, default_output_cap=1 << 20,
                    max_output_cap=16 << 20, max_request_bytes=1 << 20)


def request(task_id: str = "t", **fields) -> TaskRequest:
    """A valid request (`true`), with `fields` changed."""
    base = dict(task_id=task_id, priority=2, argv=(b"true",), env=(), cwd=b"", stdin=b"",
                timeout_ms=0, output_cap=0, capabilities=())
    return TaskRequest(**{**base, **fields})


def curve_keys(root: Path, allowed: tuple[str, ...], unknown: tuple[str, ...] = ()) -> dict[str, str]:
    """Key files under `root`: corrald's pair and one pair for each name, the
    `allowed` names' public keys in the allowed-keys directory, the `unknown`
    ones in none. Their paths: server_secret, server_public, clients (that
    directory), NAME (a secret key), NAME_public."""
    clients = root / "clients"
    clients.mkdir()
    server_public, server_secret = keygen("corrald", root / "server")
    paths = {"server_secret": server_secret, "server_public": server_public, "clients": str(clients)}
    for name in allowed + unknown:
        public, secret = keygen(name, root / name)
        paths[name], paths[f"{name}_public"] = secret, public
        if name in allowed:
            (clients / f"{name}.key").write_bytes(Path(public).read_bytes())
    return paths


def curve_config(keys, **budget) -> config.Config:
    """CurveZMQ on, alice allowed (base:execute, dev:python) with a budget of 3;
    `keys` as the key files' paths: server_secret, clients (the allowed keys' directory)."""
    return config.load(overrides={
        "identity": {"server_secret_key": keys["server_secret"], "client_keys_dir": keys["clients"],
                     "grants": {"alice": ["base:execute", "dev:python"]}},
        "budget": {"overrides": {"alice": {"capacity": 3.0, "refill_per_s": 0.5}}, **budget}})


@contextmanager
def intake_world(socket_dir, queue_depth: int = 1000):
    """Intake (real ROUTER) in front of a real Scheduler that no VM ever serves:
    (directory, server, metrics)."""
    directory = Directory()
    metrics = Metrics()
    timers = Timers()
    server = IntakeServer(f"ipc://{socket_dir}/intake.sock", LIMITS, metrics, directory)
    directory.answer_fallback = server.post
    server.start()
    directory["pool"] = Recorder.start()
    directory["scheduler"] = Scheduler.start(
        directory=directory, metrics=metrics, timers=timers,
        limits=QueueLimits(max_depth=queue_depth, max_queued_bytes=1 << 30, max_wait_s=3600.0))
    directory["intake"] = Intake.start(server, directory)
    try:
        yield directory, server, metrics
    finally:
        pykka.ActorRegistry.stop_all()
        server.stop()
        timers.stop()
