"""corrald's memory after a burst of large queued tasks (issue 16 §5).

A real corrald (pool of 1, real VMs) in a subprocess takes bursts of 12 MiB
tasks (8 MiB stdin + a 4 MiB file). tasks.max_queued_bytes counts what a
queued task holds once decoded (actors/scheduler.py task_bytes), so past it
tasks are refused with busy; every task is answered once; and once the queue
drained RSS is back near where it was before the burst, round after round (it
used to stay 24 MiB up: the last request was kept twice by Intake).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from protocol.client.api import Client
from tests.support.corrald import status_once_up
from tests.support.host import TEST_INSTANCE
from tests.support.waiting import wait_until

MiB = 1 << 20
STDIN_BYTES, PUT_BYTES = 8 * MiB, 4 * MiB  # 12 MiB a task, as in the report
# Room for 5 such tasks queued. The report's burst (21 tasks under the default
# 256 MiB, 3 rounds): CORRAL_MEMORY_TASKS=21 CORRAL_MEMORY_LIMIT_MIB=256 CORRAL_MEMORY_ROUNDS=3
QUEUED_LIMIT = int(os.environ.get("CORRAL_MEMORY_LIMIT_MIB", "64")) * MiB
TASKS = int(os.environ.get("CORRAL_MEMORY_TASKS", "12"))
ROUNDS = int(os.environ.get("CORRAL_MEMORY_ROUNDS", "2"))
FIT = QUEUED_LIMIT // (STDIN_BYTES + PUT_BYTES + 64 * 1024)  # queued at once, headers and all
RSS_SLACK = 32 * MiB  # generous: before the fix it stayed up by 2 x 12 MiB after every burst


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


@pytest.fixture
def corrald(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text(textwrap.dedent(f"""\
        [daemon]
        endpoint = "ipc://{tmp_path}/corrald.sock"
        instance = "{(TEST_INSTANCE + 'm')[:16]}"
        log_level = "warning"
        [control]
        endpoint = "ipc://{tmp_path}/control/control.sock"
        [pool]
        size = 1
        [metrics]
        port = 0
        [tasks]
        max_queued_bytes = {QUEUED_LIMIT}
        """))
    log = open(tmp_path / "corrald.log", "wb")
    daemon = subprocess.Popen([sys.executable, "-m", "actors.daemon", "--config", str(site)],
                              cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=subprocess.STDOUT)
    try:
        with Client(f"ipc://{tmp_path}/corrald.sock") as client:
            wait_until(lambda: dict(getattr(status_once_up(client), "pool", ())).get(b"ready") == b"1", 180,
                       "corrald's VM ready")
            yield daemon, client
    finally:
        daemon.terminate()
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()


def test_large_queued_tasks_are_bounded_by_what_they_hold_and_rss_comes_back(corrald):
    daemon, client = corrald
    assert client.run(["true"], wait_s=60).exit_code == 0  # the first task's one-time costs
    time.sleep(2)
    baseline = rss(daemon.pid)
    stdin, put = os.urandom(STDIN_BYTES), os.urandom(PUT_BYTES)
    for round_ in range(ROUNDS):
        futures = [client.submit(["sh", "-c", "wc -c; wc -c < /tmp/in"], stdin=stdin,
                                 files_in=[("/tmp/in", put, 0o644)], timeout_s=120) for _ in range(TASKS)]
        peak = baseline
        deadline = time.monotonic() + 600
        while not all(f.done() for f in futures):
            assert time.monotonic() < deadline, "the burst was not answered"
            peak = max(peak, rss(daemon.pid))
            time.sleep(0.1)
        replies = [f.result() for f in futures]
        codes = Counter(r.error_code or "completed" for r in replies)
        time.sleep(3)  # the last VM reset and the Watchdog's tick
        after = rss(daemon.pid)
        print(f"FIGURE memory round {round_}: {TASKS} tasks of {(STDIN_BYTES + PUT_BYTES) // MiB} MiB, "
              f"max_queued_bytes {QUEUED_LIMIT // MiB} MiB: RSS {baseline / MiB:.0f} MiB before, "
              f"{peak / MiB:.0f} MiB peak, {after / MiB:.0f} MiB after; answers {dict(codes)}")
        assert set(codes) <= {"completed", "busy"}, codes
        # FIT fit under the limit, plus the one running and one or two a VM
        # took while the burst was still arriving.
        assert min(TASKS, FIT) <= codes["completed"] <= min(TASKS, FIT + 3)
        for reply in replies:
            if reply.error_code == "busy":
                assert "bytes of memory" in reply.error_message and reply.retry_after_ms > 0
            else:
                assert reply.stdout == f"{STDIN_BYTES}\n{PUT_BYTES}\n".encode()
        assert peak < baseline + QUEUED_LIMIT + 160 * MiB  # queue + one request decoding + one running
        assert after < baseline + RSS_SLACK, f"RSS stayed {(after - baseline) / MiB:.0f} MiB up"
