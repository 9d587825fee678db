"""Sessions end to end: the real `corral` CLI (a process of its own) against
a real corrald (pool of 1) on real VMs. A file written and a background
process started in one exec are both there in the next; `corral session ls`
lists the session; `corral session close` ends it and its VM; an exec after
that exits 125 naming the session; `corral cp` copies both ways."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.service import running_service, service_config

REPO = Path(__file__).resolve().parents[2]
CLI_WAIT_S = 180  # an open queues for a VM like a task; under TCG and load, seconds to a minute


@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory):
    with running_service(service_config(tmp_path_factory.mktemp("sessions-cli"), pool={"size": 1}),
                         hypervisor) as svc:
        yield svc


def corral(endpoint: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protocol.client", "--endpoint", endpoint, *args], cwd=REPO,
                          input=stdin, stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True,
                          timeout=CLI_WAIT_S)


def open_session(endpoint: str, *options: str) -> str:
    done = corral(endpoint, "session", "open", *options)
    assert (done.returncode, done.stderr) == (0, b""), done
    session_id = done.stdout.decode().splitlines()[-1]
    assert session_id.startswith("s-") and len(session_id) == 18
    return session_id


def session_of(service, session_id: str):
    return next((s for s in service.sessions_view.sessions if s.session_id == session_id), None)


def test_files_and_processes_live_across_execs_until_close(service, endpoint, hypervisor):
    session_id = open_session(endpoint, "--label", "job=e2e", "--idle", "300")
    vm = session_of(service, session_id).vm_id
    assert hypervisor.domain_exists(vm)

    first = corral(endpoint, "exec", session_id, "--", "sh", "-c",
                   'echo kept > "$HOME/kept"; nohup sleep 600 >/dev/null 2>&1 & echo $! > "$HOME/bg.pid"; '
                   "echo started")
    assert (first.returncode, first.stdout, first.stderr) == (0, b"started\n", b""), first
    second = corral(endpoint, "exec", session_id, "--", "sh", "-c",
                    'cat "$HOME/kept"; kill -0 "$(cat "$HOME/bg.pid")" && echo alive; exit 3')
    assert (second.returncode, second.stdout, second.stderr) == (3, b"kept\nalive\n", b""), second
    fed = corral(endpoint, "exec", "-i", session_id, "--", "cat", stdin=b"through -i\n")
    assert (fed.returncode, fed.stdout, fed.stderr) == (0, b"through -i\n", b""), fed

    listed = corral(endpoint, "session", "ls")
    assert listed.returncode == 0, listed
    (row,) = [line for line in listed.stdout.decode().splitlines() if line.startswith(session_id)]
    assert row.split()[3:] == ["3", "open", "job=e2e"], row  # execs, state, labels

    closed = corral(endpoint, "session", "close", session_id)
    assert (closed.returncode, closed.stderr) == (0, b""), closed
    assert not hypervisor.domain_exists(vm)  # the close is answered once the VM is gone
    assert session_of(service, session_id) is None
    assert session_id not in corral(endpoint, "session", "ls").stdout.decode()

    after = corral(endpoint, "exec", session_id, "--", "true")
    assert after.returncode == 125 and after.stdout == b""
    assert after.stderr.decode().startswith("corral: error session_not_found: ") and \
        session_id in after.stderr.decode(), after


def test_cp_copies_into_and_out_of_a_session(service, endpoint, tmp_path):
    session_id = open_session(endpoint)
    try:
        local = tmp_path / "in.bin"
        local.write_bytes(bytes(range(256)) * 64)
        local.chmod(0o640)
        into = corral(endpoint, "cp", str(local), f"{session_id}:/tmp/in.bin")
        assert (into.returncode, into.stderr) == (0, b""), into
        seen = corral(endpoint, "exec", session_id, "--", "sh", "-c",
                      'stat -c %a /tmp/in.bin; sha256sum < /tmp/in.bin | cut -d" " -f1; '
                      'cp /tmp/in.bin "$HOME/out.bin"; echo tail >> "$HOME/out.bin"; printf %s "$HOME"')
        assert seen.returncode == 0, seen
        mode, digest, home = seen.stdout.decode().splitlines()
        assert (mode, digest) == ("640", hashlib.sha256(local.read_bytes()).hexdigest())

        back = tmp_path / "back"
        back.mkdir()
        out = corral(endpoint, "cp", f"{session_id}:{home}/out.bin", str(back))
        assert (out.returncode, out.stderr) == (0, b""), out
        assert (back / "out.bin").read_bytes() == local.read_bytes() + b"tail\n"

        missing = corral(endpoint, "cp", f"{session_id}:/tmp/nothing-here", str(back))
        assert missing.returncode == 1 and missing.stderr.decode().startswith(
            f"corral: cannot get /tmp/nothing-here from session {session_id}: "), missing
    finally:
        corral(endpoint, "session", "close", session_id)
    gone = corral(endpoint, "cp", str(local), f"{session_id}:/tmp/late")
    assert gone.returncode == 125 and gone.stderr.decode().startswith("corral: error session_not_found: ")
