"""A session's VM (issue 15) through real VMs, the real agent, IOGuard,
Scheduler and Supervisors, without the Sessions actor or the caller's edge:
a recording actor stands in as "sessions" and "intake" (tests/support/
sessions.py), the claim goes to the real Scheduler, and the test plays
Sessions' part on the Supervisor. Sessions and the edge are tested on their
own, and end to end by the CLI's tests."""

from __future__ import annotations

import time

import pytest

from actors.messages import Answer, InjectFault, SessionEnded
from tests.support.service import counter, operator, pool_vms, running_service, service_config, wait_ready
from tests.support.sessions import Session, standing_in
from tests.support.waiting import wait_until

DEADMAN_GRACE_S = 3.0


@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory):
    cfg = service_config(tmp_path_factory.mktemp("sessions"), tasks={"deadman_grace_s": DEADMAN_GRACE_S})
    with running_service(cfg, hypervisor) as svc:
        yield svc


@pytest.fixture
def board(service):
    wait_ready(service)  # each test starts from a healed pool
    with standing_in(service) as board:
        yield board


@pytest.fixture
def session(service, board):
    opened = Session(service, board)
    yield opened
    opened.end()
    gone(service, opened)


def gone(service, session: Session) -> None:
    """The session's VM destroyed and out of the pool."""
    session.ended()
    wait_until(lambda: session.vm_id not in pool_vms(service), 15, "the session's VM out of the pool")
    assert not service.hypervisor.domain_exists(session.vm_id)


def test_the_claim_makes_the_vm_the_sessions_and_the_pool_replaces_it(service, session):
    assert pool_vms(service)[session.vm_id] == "session"
    wait_ready(service)  # its replacement booted: the pool still serves one-shot tasks
    assert session.execs_done() == 0 and session.board.all(SessionEnded) == []


def test_a_file_written_and_a_process_started_in_one_exec_are_there_in_the_next(session):
    first = session.run([b"sh", b"-c", b"echo kept > $HOME/f; sleep 300 >/dev/null 2>&1 & echo $! > $HOME/pid"])
    assert (first.error_code, first.exit_code) == ("", 0), first
    second = session.run([b"sh", b"-c", b"cat $HOME/f; kill -0 $(cat $HOME/pid) && echo alive"])
    assert (second.exit_code, second.stdout) == (0, b"kept\nalive\n"), second
    assert session.execs_done() == 2


def test_files_put_by_one_exec_are_collected_by_a_later_one(session):
    put = session.run([b"true"], files_in=((b"/home/task/note", 0o644, b"from the caller\n"),))
    assert (put.error_code, put.exit_code) == ("", 0), put
    session.run([b"sh", b"-c", b"cat $HOME/note > $HOME/copy"])
    got = session.run([b"true"], collect=(b"/home/task/copy",))
    ((path, error, data, _),) = got.files_out
    assert (path, error, data) == (b"/home/task/copy", "", b"from the caller\n")


def test_two_execs_at_once_are_each_answered_once(session):
    started = time.monotonic()
    slow = session.exec([b"sh", b"-c", b"sleep 3; echo slow"])
    quick = session.exec([b"sh", b"-c", b"echo quick"])
    quick_reply = session.answer(quick)
    quick_at = time.monotonic() - started
    slow_reply = session.answer(slow)
    assert (quick_reply.exit_code, quick_reply.stdout) == (0, b"quick\n")
    assert (slow_reply.exit_code, slow_reply.stdout) == (0, b"slow\n")
    assert quick_at < 3, f"the quick exec waited for the slow one ({quick_at:.2f} s)"
    wait_until(lambda: session.execs_done() == 2, 10, "two SessionExecDone")
    print(f"FIGURE two execs at once in a session: `echo` answered {quick_at:.2f} s after submit, "
          f"beside a `sleep 3`")


def test_an_exec_past_its_timeout_is_killed_and_the_session_lives_on(session):
    started = time.monotonic()
    reply = session.run([b"sleep", b"30"], timeout_ms=1000)
    assert reply.error_code == "timeout" and reply.timed_out, reply
    assert time.monotonic() - started < 1 + DEADMAN_GRACE_S
    after = session.run([b"echo", b"next"])
    assert (after.exit_code, after.stdout) == (0, b"next\n")
    assert session.board.all(SessionEnded) == []


def test_a_hung_agent_ends_the_session_as_deadman_and_its_vm_is_destroyed(service, board):
    session = Session(service, board)
    kills = counter(service.metrics.deadman_kills)
    started = time.monotonic()
    ticket = session.exec([b"sleep", b"30"], timeout_ms=2000)
    session.supervisor.tell(InjectFault("hang_guest"))  # the guest stops answering
    reply = session.answer(ticket, timeout_s=30)
    assert reply.error_code == "session_lost" and "timeout" in reply.error_message, reply
    assert session.ended() == SessionEnded(session.session_id, "deadman")
    assert time.monotonic() - started < 2 + DEADMAN_GRACE_S + 5
    gone(service, session)
    assert counter(service.metrics.deadman_kills) == kills + 1


def test_end_session_answers_a_running_exec_session_lost_and_destroys_the_vm(service, board):
    session = Session(service, board)
    ticket = session.exec([b"sleep", b"30"])
    time.sleep(1)
    session.end("closed")
    assert session.answer(ticket).error_code == "session_lost"
    assert session.ended() == SessionEnded(session.session_id, "closed")
    gone(service, session)
    assert session.execs_done() == 0


def test_a_scram_pauses_a_session_with_an_exec_running_and_the_resume_lets_it_finish(service, session):
    ticket = session.exec([b"sh", b"-c", b"sleep 2; echo done"], timeout_ms=20_000)
    time.sleep(0.5)
    assert operator(service, "scram", "session drill").ok
    try:
        time.sleep(4)  # longer than the command: paused, it cannot finish
        assert not [a for a in session.board.all(Answer) if a.ticket == ticket]
    finally:
        assert operator(service, "resume").ok
    reply = session.answer(ticket, timeout_s=30)
    assert (reply.error_code, reply.exit_code, reply.stdout) == ("", 0, b"done\n"), reply
    assert session.run([b"echo", b"after"]).stdout == b"after\n"
    assert session.board.all(SessionEnded) == []
