"""A corrald that is not there, or not ours to use, is told at once (issue 16 §5).

`corral run`, `corral status` and `corral admin` against no daemon, a stale
socket, a refused tcp port or a socket without permission answer in well
under a second with `corral: error <code>: ...` and exit 125, instead of
waiting out their whole timeout. The Python Client's Future fails as fast,
with reach.Unreachable, and a request failed so is never sent later.
Real ZeroMQ sockets throughout; the permission cases run the CLI in a child
process as `nobody`.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import zmq
import zmq.utils.monitor  # noqa: F401  what the child needs, imported while it can still read it

import config

from protocol.client import admin
from protocol.client.api import Client, HandshakeError
from protocol.client.cli import main
from protocol.client.reach import NOT_RUNNING, PERMISSION_DENIED, Unreachable
from protocol.wire import envelope
from protocol.wire.tasks import PROTOCOL_TAG

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
FAST_S = 1.0  # "at once": generous for a loaded 2-core host, far below any timeout (30-120 s)


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The real `corral` in a subprocess; (result, seconds it took)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "protocol.client", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - start


def as_user(uid: int, work) -> str:
    """`work()` in a forked child running as `uid` (the interpreter lives where
    `nobody` may not exec it, so no subprocess; every module it needs is
    imported here first); the text it returned."""
    config.load()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.write(write_end, str(work()).encode())
        except BaseException as e:
            os.write(write_end, f"raised {e!r}".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


def cli_as(uid: int, *args: str) -> tuple[int, str, float]:
    """The `corral` command line (protocol.client.cli.main) as `uid`; (exit code, stderr, seconds)."""
    def work() -> str:
        sys.stderr = io.StringIO()
        code = main(list(args))
        return f"{code}\n{sys.stderr.getvalue()}"

    start = time.monotonic()
    code, err = as_user(uid, work).split("\n", 1)
    return int(code), err, time.monotonic() - start


class Listener:
    """A bare ROUTER bound to `endpoint` that never answers (corrald hung, or
    not ours): only the connect itself can tell the client anything."""

    def __init__(self, endpoint: str, **options):
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        for option, value in options.items():
            self.router.setsockopt(getattr(zmq, option), value)
        self.router.bind(endpoint)
        self.endpoint = endpoint

    def close(self) -> None:
        self.router.close()
        self.context.term()


@pytest.fixture
def shared_dir():
    """A directory `nobody` may enter (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="corral-reach-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def root_only_socket(shared_dir):
    """A live socket, mode 0600 and owned by root, as corrald's control socket is."""
    listener = Listener(f"ipc://{shared_dir}/corrald.sock")
    os.chmod(shared_dir / "corrald.sock", 0o600)
    yield listener
    listener.close()


def figure(what: str, seconds: float) -> None:
    print(f"FIGURE reach {what}: answered in {seconds * 1000:.0f} ms")


def test_run_without_a_daemon_says_not_running_at_once(tmp_path):
    path = tmp_path / "corrald.sock"
    done, took = cli("run", "--endpoint", f"ipc://{path}", "--", "true")
    figure("corral run, no socket", took)
    assert done.returncode == 125
    assert done.stderr == (f"corral: error not_running: corrald is not running (no socket at {path}): "
                           "start it with scripts/run\n")
    assert took < FAST_S + 1  # a cold interpreter start included


def test_status_at_a_stale_socket_says_nothing_listens(tmp_path):
    path = tmp_path / "corrald.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # what a killed corrald leaves: the file, nobody listening
    stale.close()
    done, took = cli("status", "--endpoint", f"ipc://{path}")
    figure("corral status, stale socket", took)
    assert done.returncode == 125
    assert f"corral: error not_running: corrald is not running (nothing listens on {path})" in done.stderr
    assert took < FAST_S + 1


def test_run_at_a_refused_tcp_port_says_not_running_at_once():
    with socket.socket() as reserved:  # a port nobody listens on while the test runs
        reserved.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{reserved.getsockname()[1]}"
        done, took = cli("run", "--endpoint", endpoint, "--", "true")
    figure("corral run, tcp refused", took)
    assert done.returncode == 125
    assert done.stderr.startswith(f"corral: error not_running: corrald is not running at {endpoint} "
                                  "(connection refused)")
    assert took < FAST_S + 1


def test_run_without_permission_on_the_socket_says_so_at_once(root_only_socket):
    path = root_only_socket.endpoint[len("ipc://"):]
    code, err, took = cli_as(NOBODY, "run", "--endpoint", root_only_socket.endpoint, "--", "true")
    figure("corral run as nobody, socket 0600", took)
    assert (code, err) == (125, f"corral: error permission_denied: permission denied on {path}\n")
    assert took < FAST_S


def test_admin_without_permission_says_so_at_once(root_only_socket):
    path = root_only_socket.endpoint[len("ipc://"):]
    code, err, took = cli_as(NOBODY, "admin", "--control", root_only_socket.endpoint, "status")
    figure("corral admin as nobody, socket 0600", took)
    assert code == 125
    assert err == (f"corral: error permission_denied: permission denied on {path}: only corrald's operators "
                   "(its own user) may use the control socket\n")
    assert took < FAST_S


def test_admin_without_a_daemon_says_not_running(tmp_path):
    path = tmp_path / "control.sock"
    done, took = cli("admin", "--control", f"ipc://{path}", "status")
    assert (done.returncode, done.stderr) == (
        125, f"corral: error not_running: corrald is not running (no socket at {path})\n")
    with pytest.raises(admin.AdminError) as error:
        admin.request(f"ipc://{path}", "status", [])
    assert error.value.code == NOT_RUNNING


def test_submit_to_no_daemon_fails_fast_and_is_never_sent_later(tmp_path):
    """Many requests, more than the socket's high-water mark: each fails with
    not_running, and none reaches a corrald that starts afterwards."""
    endpoint = f"ipc://{tmp_path}/later.sock"
    with Client(endpoint) as client:
        start = time.monotonic()
        futures = [client.submit(["true"]) for _ in range(1500)]
        errors = [f.exception(timeout=FAST_S * 5) for f in futures]
        took = time.monotonic() - start
        figure("Client.submit x1500, no socket", took)
        assert {type(e) for e in errors} == {Unreachable} and {e.code for e in errors} == {NOT_RUNNING}
        assert took < FAST_S * 2
        late = Listener(endpoint)
        try:
            time.sleep(0.5)  # libzmq reconnects every 100-200 ms: it found the listener
            assert late.router.poll(200) == 0, "a request failed as not_running was sent later"
            # The same client serves once corrald is there.
            client.submit(["true"], task_id="after")
            assert late.router.poll(5000), "a request after corrald started never arrived"
            envelope.parse(PROTOCOL_TAG, late.router.recv_multipart()[1:])  # a well-framed request
        finally:
            late.close()


def test_submit_without_permission_fails_with_permission_denied(root_only_socket):
    def submit() -> str:
        with Client(root_only_socket.endpoint) as client:
            error = client.submit(["true"]).exception(timeout=5)
        return f"{type(error).__name__} {getattr(error, 'code', '')}"

    assert as_user(NOBODY, submit) == f"Unreachable {PERMISSION_DENIED}"


def test_a_client_made_before_corrald_starts_works_once_it_runs(tmp_path):
    endpoint = f"ipc://{tmp_path}/soon.sock"
    with Client(endpoint) as client:
        time.sleep(0.3)  # refused attempts meanwhile
        listener = Listener(endpoint)
        try:
            deadline = time.monotonic() + 5
            while True:  # until libzmq's next attempt found it
                future = client.submit(["true"])
                if future.done() and isinstance(future.exception(), Unreachable):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                    continue
                break
            assert listener.router.poll(5000), "the request never arrived"
        finally:
            listener.close()


def test_a_wrong_curve_server_key_fails_fast(tmp_path):
    """The handshake path: corrald there, but not with the key we were given."""
    server_public, server_secret = zmq.curve_keypair()
    other_public, _ = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    listener = Listener(f"ipc://{tmp_path}/curve.sock", CURVE_SERVER=1, CURVE_SECRETKEY=server_secret)
    try:
        with Client(listener.endpoint, server_key=other_public, client_key=(client_public, client_secret)) as c:
            start = time.monotonic()
            with pytest.raises(HandshakeError) as error:
                c.run(["true"], wait_s=30)
            took = time.monotonic() - start
    finally:
        listener.close()
    figure("Client.run, wrong CurveZMQ server key", took)
    assert error.value.code == "server_key_mismatch"
    assert took < FAST_S * 3  # it waits for a few silent refusals before naming the likely cause
