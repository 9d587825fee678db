"""Identities end to end: the real corrald (supervision tree, one warm VM under
libvirt), CurveZMQ with the ZAP allow-list on its real ROUTER, the real client.
A granted task runs in the VM; every refusal is answered by Intake without a
VM being acquired. One identity's session does not exist for another."""

import subprocess
import sys

import pytest

from protocol.client.api import Client, HandshakeError, SessionError, keygen
from tests.support.service import running_service, scrape, service_config


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    keygen("corrald", root)
    (root / "clients").mkdir()
    for name in ("alice", "bob", "carol", "dave"):
        keygen(name, root / name)
    for name in ("alice", "carol", "dave"):  # bob is nobody's
        (root / "clients" / f"{name}.key").write_bytes((root / name / f"{name}.key").read_bytes())
    return root


@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory, keys):
    cfg = service_config(tmp_path_factory.mktemp("corrald"), pool={"size": 1},
                         identity={"server_secret_key": str(keys / "corrald.key_secret"),
                                   "client_keys_dir": str(keys / "clients"),
                                   "grants": {"alice": ["base:execute", "dev:python"],
                                              "carol": ["base:execute"], "dave": ["base:execute"]}},
                         budget={"overrides": {"alice": {"capacity": 4.0, "refill_per_s": 0.001}}})
    with running_service(cfg, hypervisor) as svc:
        yield svc


def connect(service, keys, name: str | None = "alice") -> Client:
    if name is None:
        return Client(service.cfg.daemon.endpoint)
    return Client(service.cfg.daemon.endpoint, server_key=str(keys / "corrald.key"),
                  client_key=str(keys / name / f"{name}.key_secret"))


VM_USE = ("corral_vm_acquire_seconds_count", "corral_tasks_accepted_total")


def vm_use(service) -> tuple:
    samples = scrape(service)
    return tuple(samples[name] for name in VM_USE)


def test_a_granted_task_runs_and_a_denied_one_uses_no_vm(service, keys):
    with connect(service, keys) as alice:
        reply = alice.run(["python3", "-c", "print(6 * 7)"], capabilities=["dev:python"], wait_s=120)
        assert (reply.error_code, reply.exit_code, reply.stdout) == ("", 0, b"42\n"), reply
        assert reply.acquire_ms > 0 or reply.run_ms > 0
        before = vm_use(service)
        denied = alice.run(["true"], capabilities=["base:execute", "net:egress"], wait_s=10)
        assert denied.error_code == "capability_denied" and "'net:egress'" in denied.error_message
        assert (denied.queued_ms, denied.acquire_ms, denied.run_ms) == (0, 0, 0)
        assert vm_use(service) == before
    spent = scrape(service)['corral_budget_spent_total{identity="alice"}']
    assert spent == 1.0  # the granted task only


def test_unknown_and_missing_keys_are_refused_before_any_request(service, keys):
    before = vm_use(service)
    for name, code in (("bob", "key_refused"), (None, "key_missing")):
        with connect(service, keys, name) as c, pytest.raises(HandshakeError) as error:
            c.run(["true"], capabilities=["base:execute"], wait_s=10)
        assert error.value.code == code
    assert vm_use(service) == before
    assert scrape(service)["corral_handshakes_denied_total"] >= 1


def test_cli_with_keys_runs_a_granted_task(service, keys):
    done = subprocess.run([sys.executable, "-m", "protocol.client", "run",
                           "--endpoint", service.cfg.daemon.endpoint,
                           "--server-key", str(keys / "corrald.key"),
                           "--key", str(keys / "alice" / "alice.key_secret"),
                           "--cap", "dev:python", "--", "python3", "-c", "print('curve')"],
                          capture_output=True, timeout=120)
    assert (done.stdout, done.returncode) == (b"curve\n", 0), done.stderr


def test_over_budget_is_refused_with_the_wait_and_uses_no_vm(service, keys):
    """alice: capacity 4, refilling 0.001 a second; a NORMAL task costs 1."""
    left = int(scrape(service)['corral_budget_remaining{identity="alice"}'])
    assert left >= 1
    with connect(service, keys) as alice:
        for _ in range(left):
            assert alice.run(["true"], capabilities=["base:execute"], wait_s=120).exit_code == 0
        before = vm_use(service)
        over = alice.run(["true"], capabilities=["base:execute"], wait_s=10)
        assert over.error_code == "budget_exhausted" and over.retry_after_ms > 100_000
        assert vm_use(service) == before
    assert scrape(service)['corral_budget_remaining{identity="alice"}'] < 1



def test_a_session_does_not_exist_for_another_identity(service, keys):
    """dave's exec, list, close, pause, resume and fork of carol's session get
    what an unknown id gets, word for word; carol's session goes on."""
    unknown = "s-" + "0" * 16
    with connect(service, keys, "carol") as carol, connect(service, keys, "dave") as dave:
        with carol.session(labels={"owner": "carol"}) as session:
            sid = session.session_id
            for target in (sid, unknown):
                reply = dave.run(["true"], session_id=target, wait_s=30)
                assert (reply.error_code, reply.error_message) == ("session_not_found", f"no session {target}")
            assert dave.sessions() == []
            refusals = {}
            for target in (sid, unknown):
                for call in (dave.close_session, dave.pause_session, dave.resume_session, dave.fork_session):
                    with pytest.raises(SessionError) as error:
                        call(target)
                    refusals.setdefault(call.__name__, set()).add(
                        (error.value.code, str(error.value).replace(target, "ID")))
            assert all(len(seen) == 1 and next(iter(seen))[0] == "session_not_found"
                       for seen in refusals.values()), refusals
            assert [s.session_id for s in carol.sessions()] == [sid]
            reply = session.exec(["sh", "-c", "echo still hers"], wait_s=60)
            assert (reply.error_code, reply.exit_code, reply.stdout) == ("", 0, b"still hers\n")
