"""Intake under test: the task limits its tests run with, a valid request to
change a field of, and a CurveZMQ identity config."""

import config
from actors.edge.intake_server import TaskLimits
from protocol.wire.tasks import TaskRequest

LIMITS = TaskLimits(default_timeout_ms=60_000, max_timeout_ms=3_600_000, default_output_cap=1 << 20,
                    max_output_cap=16 << 20, max_request_bytes=1 << 20)


def request(task_id: str = "t", **fields) -> TaskRequest:
    """A valid request (`true`), with `fields` changed."""
    base = dict(task_id=task_id, priority=2, argv=(b"true",), env=(), cwd=b"", stdin=b"",
                timeout_ms=0, output_cap=0, capabilities=())
    return TaskRequest(**{**base, **fields})


def curve_config(keys, **budget) -> config.Config:
    """CurveZMQ on, alice allowed (base:execute, dev:python) with a budget of 3;
    `keys` as the key files' paths: server_secret, clients (the allowed keys' directory)."""
    return config.load(overrides={
        "identity": {"server_secret_key": keys["server_secret"], "client_keys_dir": keys["clients"],
                     "grants": {"alice": ["base:execute", "dev:python"]}},
        "budget": {"overrides": {"alice": {"capacity": 3.0, "refill_per_s": 0.5}}, **budget}})
