"""Session snapshots end to end: the real `corral` CLI (a process of its own)
against a real corrald on real VMs. A session that wrote a file and started
a background process is forked into 3: each fork sees both, has randomness
of its own and a VM of its own, and goes its own way after; the session
itself goes on. A paused session has no VM, refuses execs as paused, and
comes back with its files and processes on resume; closing a paused session
removes its snapshot."""

import time
from pathlib import Path

import pytest

from tests.support.service import running_service, service_config
from tests.vm.test_sessions_cli import corral, open_session, session_of

# Writes a file and starts a process that outlives the exec; prints nothing.
PREPARE = ('echo kept > "$HOME/kept"; nohup sleep 600 >/dev/null 2>&1 & echo $! > "$HOME/bg.pid"')
# The file, the process, 16 random bytes and the guest's clock (seconds since the epoch).
LOOK = ('cat "$HOME/kept"; kill -0 "$(cat "$HOME/bg.pid")" && echo alive; '
        'head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo; date +%s')


@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory):
    with running_service(service_config(tmp_path_factory.mktemp("session-snapshots"), pool={"size": 1}),
                         hypervisor) as svc:
        yield svc


def look(endpoint: str, session_id: str) -> tuple[str, str, str, int]:
    """(file, process, random bytes, clock) as an exec in the session sees them."""
    done = corral(endpoint, "exec", session_id, "--", "sh", "-c", LOOK)
    assert (done.returncode, done.stderr) == (0, b""), done
    kept, alive, random_hex, clock = done.stdout.decode().splitlines()
    return kept, alive, random_hex, int(clock)


def snapshot_dirs(service) -> list[Path]:
    """This instance's session snapshots (the state directory is shared with other test instances)."""
    root = Path(service.cfg.state_dir) / "sessions" / "snapshots"
    return sorted(root.glob(f"{service.cfg.daemon.instance}-*")) if root.is_dir() else []


def test_three_forks_see_the_state_each_with_randomness_and_a_vm_of_its_own(service, endpoint, hypervisor):
    session_id = open_session(endpoint, "--label", "job=fork")
    forks = []
    try:
        prepared = corral(endpoint, "exec", session_id, "--", "sh", "-c", PREPARE)
        assert (prepared.returncode, prepared.stderr) == (0, b""), prepared

        started = time.monotonic()
        forked = corral(endpoint, "session", "fork", session_id, "-n", "3")
        fork_s = time.monotonic() - started
        assert (forked.returncode, forked.stderr) == (0, b""), forked
        forks = forked.stdout.decode().splitlines()[-3:]
        print(f"\nfork into 3, through the CLI: {fork_s:.2f} s")
        assert len(set(forks)) == 3 and session_id not in forks
        assert all(f.startswith("s-") and len(f) == 18 for f in forks), forks

        seen = {sid: look(endpoint, sid) for sid in [session_id, *forks]}
        now = time.time()
        for sid, (kept, alive, random_hex, clock) in seen.items():
            assert (kept, alive) == ("kept", "alive"), (sid, seen[sid])
            assert len(random_hex) == 32, seen[sid]
            assert abs(clock - now) < 60, (sid, clock, now)  # each clock set anew, not the saved one's
        assert len({random_hex for _, _, random_hex, _ in seen.values()}) == 4, seen

        vms = {sid: session_of(service, sid).vm_id for sid in [session_id, *forks]}
        assert len(set(vms.values())) == 4 and all(hypervisor.domain_exists(vm) for vm in vms.values())
        listed = corral(endpoint, "session", "ls").stdout.decode()
        for sid in [session_id, *forks]:
            (row,) = [line for line in listed.splitlines() if line.startswith(sid)]
            assert row.split()[4:] == ["open", "job=fork"], row  # state, labels: the fork's are its session's

        # From here each goes its own way.
        wrote = corral(endpoint, "exec", forks[0], "--", "sh", "-c", 'echo mine > "$HOME/only-in-fork"')
        assert wrote.returncode == 0, wrote
        for sid in (session_id, forks[1]):
            other = corral(endpoint, "exec", sid, "--", "sh", "-c", 'test -e "$HOME/only-in-fork"')
            assert other.returncode == 1, (sid, other)
    finally:
        for sid in [*forks, session_id]:
            corral(endpoint, "session", "close", sid)
    assert snapshot_dirs(service) == []  # nothing restores from it any more


def test_a_paused_session_has_no_vm_and_comes_back_as_it_was(service, endpoint, hypervisor):
    session_id = open_session(endpoint)
    try:
        prepared = corral(endpoint, "exec", session_id, "--", "sh", "-c", PREPARE)
        assert prepared.returncode == 0, prepared
        vm = session_of(service, session_id).vm_id

        paused = corral(endpoint, "session", "pause", session_id)
        assert (paused.returncode, paused.stderr) == (0, b""), paused
        assert not hypervisor.domain_exists(vm)
        assert len(snapshot_dirs(service)) == 1
        (row,) = [line for line in corral(endpoint, "session", "ls").stdout.decode().splitlines()
                  if line.startswith(session_id)]
        assert row.split()[4] == "paused", row

        refused = corral(endpoint, "exec", session_id, "--", "true")
        assert refused.returncode == 125 and refused.stdout == b""
        assert refused.stderr.decode().startswith("corral: error session_paused: "), refused

        resumed = corral(endpoint, "session", "resume", session_id)
        assert (resumed.returncode, resumed.stderr) == (0, b""), resumed
        kept, alive, _, clock = look(endpoint, session_id)
        assert (kept, alive) == ("kept", "alive")
        assert abs(clock - time.time()) < 60
        assert session_of(service, session_id).vm_id != vm
        assert snapshot_dirs(service) == []  # the resumed session needs it no more
    finally:
        corral(endpoint, "session", "close", session_id)


def test_closing_a_paused_session_removes_its_snapshot(service, endpoint):
    session_id = open_session(endpoint)
    paused = corral(endpoint, "session", "pause", session_id)
    assert paused.returncode == 0, paused
    assert len(snapshot_dirs(service)) == 1
    closed = corral(endpoint, "session", "close", session_id)
    assert (closed.returncode, closed.stderr) == (0, b""), closed
    assert snapshot_dirs(service) == []
    gone = corral(endpoint, "session", "resume", session_id)
    assert gone.returncode == 125 and gone.stderr.decode().startswith("corral: error session_not_found: "), gone
