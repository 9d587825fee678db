"""Session snapshots through real VMs at the Hypervisor and GuestLink level:
a VM that did work (a file written, a background process started) is saved
whole between execs (Hypervisor.save_session), several clones are restored
from the one snapshot (Hypervisor.restore, as a refill's clones), each takes
a Resume after that work, and each has the file, the process and its own
randomness. Then the same through Supervisors in a running service (the
Sessions actor's part played by the test, as in test_session_vm.py): a
session saved by SaveSession and restored as three sessions by the pool
(RestoreSession), each a session's VM with the saved state."""

from __future__ import annotations

import os
import time

import pytest

from actors.messages import EndSession, RestoreSession, SaveSession, SessionSaved, SessionStarted
from actors.vm.errors import SessionSaveFailed
from actors.vm.guest_link import GuestLink
from actors.vm.host import TEMPLATE_CLOSE_S
from actors.vm.snapshots import IMAGE_FILE, discard_snapshot
from tests.support.service import pool_vms, running_service, service_config, wait_ready
from tests.support.sessions import Session, standing_in
from tests.support.vm import BootedVm
from tests.support.waiting import wait_until

CLONES = 3
SESSION_ID = "s-0123456789abcdef"
CHECK = (b"sh", b"-c", b"cat /tmp/f; kill -0 $(cat /tmp/pid) && echo alive; cat /proc/sys/kernel/random/uuid; "
                       b"head -c 16 /dev/urandom | od -An -tx1")


def save(hypervisor, vm: BootedVm):
    """What a Supervisor does: the channel closed, the agent given time to see
    the host leave, then the save with the channel's next sequences."""
    guest_next, host_next = vm.link.decoder.expected_seq, vm.link.encoder.next_seq
    vm.link.close()
    time.sleep(TEMPLATE_CLOSE_S)
    started = time.monotonic()
    snapshot = hypervisor.save_session(vm.handle, SESSION_ID, guest_next, host_next)
    return snapshot, time.monotonic() - started


def leftovers(hypervisor, names) -> list[str]:
    """Domains and files of these VMs still there."""
    found = [name for name in names if hypervisor.domain_exists(name)]
    for directory in (hypervisor.overlay_dir, hypervisor.run_dir):
        found += [path.name for path in directory.iterdir() if path.name.split(".", 1)[0] in names]
    return found


def test_clones_of_a_saved_session_have_its_file_and_process_and_their_own_randomness(hypervisor, cfg):
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
    snapshot, names = None, [vm.handle.name]
    clones: list[tuple] = []
    try:
        work = vm.run("sh", "-c", "echo hi > /tmp/f; sleep 300 >/dev/null 2>&1 & echo $! > /tmp/pid")
        assert work.exit.exit_code == 0, work
        snapshot, save_s = save(hypervisor, vm)
        assert not hypervisor.domain_exists(vm.handle.name)  # saved running: the domain is gone
        image = os.stat(snapshot.image)
        assert (image.st_mode & 0o777, image.st_uid) == (0o600, 0)
        assert os.stat(snapshot.directory).st_mode & 0o777 == 0o700
        assert [p.name for p in snapshot.directory.iterdir()] == [IMAGE_FILE]  # all a restore reads
        assert snapshot.directory.parent == hypervisor.session_snapshots.root
        assert snapshot.directory.name.startswith(f"{hypervisor.session_snapshots.instance}-{SESSION_ID}-")
        assert snapshot.key == hypervisor.template_key()
        restore_s = []
        for _ in range(CLONES):
            name = hypervisor.new_name()
            names.append(name)
            started = time.monotonic()
            handle = hypervisor.restore(snapshot, name=name)
            link = GuestLink(handle.socket, guest_first_seq=handle.guest_first_seq,
                             host_first_seq=handle.host_first_seq)
            clones.append((handle, link))
            restore_s.append(time.monotonic() - started)
            deadline = time.monotonic() + cfg.vm.boot_timeout_s
            link.connect(deadline)
            link.resume(deadline)  # taken after the work the saved VM did
        assert len({handle.name for handle, _ in clones}) == CLONES
        seen = []
        for handle, link in clones:
            result = link.run(list(CHECK), time.monotonic() + 30)
            assert result.exit.exit_code == 0, result
            file, alive, boot_uuid, random_bytes = result.stdout.decode().splitlines()
            assert (file, alive) == ("hi", "alive")
            seen.append((boot_uuid, random_bytes))
        assert len({u for u, _ in seen}) == CLONES and len({r for _, r in seen}) == CLONES, seen
        print(f"\nFIGURE session snapshot: save {save_s:.2f} s ({os.stat(snapshot.image).st_size >> 20} MiB), "
              f"restores {', '.join(f'{s:.2f}' for s in restore_s)} s")
    finally:
        for handle, link in clones:
            link.close()
            hypervisor.destroy(handle)
        vm.destroy()
        if snapshot is not None:
            discard_snapshot(snapshot)
    assert not snapshot.directory.exists()
    assert leftovers(hypervisor, set(names)) == []


def test_a_save_that_fails_leaves_no_snapshot(hypervisor, cfg):
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
    try:
        hypervisor.destroy_domain(vm.handle.name)  # nothing to save
        before = set(hypervisor.session_snapshots.root.iterdir()) if hypervisor.session_snapshots.root.is_dir() \
            else set()
        with pytest.raises(SessionSaveFailed, match=SESSION_ID):
            hypervisor.save_session(vm.handle, SESSION_ID, 1, 1)
        assert set(hypervisor.session_snapshots.root.iterdir()) == before
    finally:
        vm.destroy()


# --- through Supervisors: SaveSession, then RestoreSession to the pool ----------------------

@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory):
    with running_service(service_config(tmp_path_factory.mktemp("snapshots"), pool={"size": 1}), hypervisor) as svc:
        yield svc


def restored_session(board, started: SessionStarted) -> Session:
    """A Session (tests/support/sessions.py) for a session the pool restored."""
    session = Session.__new__(Session)
    session.board, session.session_id = board, started.session_id
    session.vm_id, session.supervisor = started.vm_id, started.supervisor
    return session


def test_a_session_saved_by_its_supervisor_restores_as_three_sessions_with_its_state(service):
    wait_ready(service)
    with standing_in(service) as board:
        session = Session(service, board)
        work = session.run([b"sh", b"-c", b"echo hi > $HOME/f; sleep 300 >/dev/null 2>&1 & echo $! > $HOME/pid"])
        assert (work.error_code, work.exit_code) == ("", 0), work
        started = time.monotonic()
        session.supervisor.tell(SaveSession())
        (saved,) = wait_until(lambda: board.all(SessionSaved), 60, "SessionSaved")
        save_s = time.monotonic() - started
        assert saved.session_id == session.session_id
        wait_until(lambda: session.vm_id not in pool_vms(service), 15, "the saved VM out of the pool")
        assert not service.hypervisor.domain_exists(session.vm_id)
        ids = [session.session_id, "s-" + "1" * 16, "s-" + "2" * 16]  # the session itself and two forks
        started = time.monotonic()
        for session_id in ids:
            service.directory.tell("pool", RestoreSession(session_id, "tester", saved.snapshot, ()))
        news = wait_until(lambda: len(board.all(SessionStarted)) == 4 and board.all(SessionStarted)[1:], 120,
                          "three restored sessions")
        restore_s = time.monotonic() - started
        clones = [restored_session(board, m) for m in news]
        try:
            assert sorted(c.session_id for c in clones) == sorted(ids)
            assert len({c.vm_id for c in clones} | {session.vm_id}) == 4
            assert all(pool_vms(service).get(c.vm_id) == "session" for c in clones)
            seen = set()
            for clone in clones:
                check = clone.run([b"sh", b"-c", b"cat $HOME/f; kill -0 $(cat $HOME/pid) && echo alive; "
                                                 b"head -c 16 /dev/urandom | od -An -tx1"])
                assert check.exit_code == 0, check
                file, alive, random_bytes = check.stdout.decode().splitlines()
                assert (file, alive) == ("hi", "alive")
                seen.add(random_bytes)
            assert len(seen) == len(clones)
            print(f"\nFIGURE session save through its Supervisor {save_s:.2f} s; "
                  f"3 sessions restored from it (pool to SessionStarted) in {restore_s:.2f} s")
        finally:
            for clone in clones:
                clone.supervisor.tell(EndSession("closed"))
            discard_snapshot(saved.snapshot)
        wait_until(lambda: not {c.vm_id for c in clones} & set(pool_vms(service)), 30, "the restored VMs gone")
        assert not any(service.hypervisor.domain_exists(c.vm_id) for c in clones)
        assert not saved.snapshot.directory.exists()
