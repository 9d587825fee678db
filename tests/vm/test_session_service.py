"""The Sessions actor in the real service (real libvirtd, no VM booted: a
pool of 0): it is a core actor under the Root, restarted with its table
after a crash, and the control plane's SCRAM, resume and drain reach it."""

import pytest

from actors.messages import OpenSession
from protocol.wire.tasks import SessionOpen
from tests.support.service import counter, operator, service_config, start_service
from tests.support.waiting import wait_until


@pytest.fixture
def service(tmp_path):
    svc = start_service(service_config(tmp_path, pool={"size": 0}))
    yield svc
    svc.stop()


def open_one(svc, ticket: int, owner: str = "alice") -> None:
    """An open as the IntakeServer hands it over (no VM comes: pool of 0, so it stays opening)."""
    request = SessionOpen(request_id=f"open-{ticket}", capabilities=(), idle_s=0, max_life_s=0, labels=())
    svc.directory.tell("sessions", OpenSession(ticket, request, owner))


def sessions_state(svc):
    return svc.directory.get("sessions").proxy().state.get(timeout=5)


def test_sessions_is_a_core_actor_restarted_with_its_table(service):
    open_one(service, 1)
    wait_until(lambda: len(service.sessions_view.sessions) == 1, 5, "the session opening")
    first = service.directory.get("sessions")
    reply = operator(service, "fault", "crash", "sessions")
    assert reply.ok, reply.message
    wait_until(lambda: service.directory.get("sessions") not in (None, first), 10, "the Root's restart of sessions")
    assert service.directory.get("sessions").is_alive()
    assert counter(service.metrics.actor_restarts, actor="sessions") == 1
    assert [s.owner for s in sessions_state(service).table.sessions.values()] == ["alice"]
    listed = operator(service, "sessions")
    assert listed.ok and listed.message == "1 session"


def test_scram_resume_and_drain_reach_sessions(service):
    assert operator(service, "scram", "drill").ok
    wait_until(lambda: sessions_state(service).safe_mode, 5, "sessions in safe mode")
    assert operator(service, "resume").ok
    wait_until(lambda: not sessions_state(service).safe_mode, 5, "sessions serving again")
    open_one(service, 2)
    wait_until(lambda: len(service.sessions_view.sessions) == 1, 5, "the session opening")
    assert operator(service, "drain").ok
    wait_until(lambda: sessions_state(service).draining, 5, "sessions draining")
    # The opening session is marked to end as soon as its VM comes.
    assert [s.end_reason for s in sessions_state(service).table.sessions.values()] == ["draining"]
