"""Identities, grants and budgets at Intake: the real IntakeServer with a real
ROUTER, CurveZMQ and ZAP handler, the real client, a recording actor as the
Scheduler (no VM). Every refusal here is answered without reaching it."""

import os
import stat
import time

import pytest
from prometheus_client import generate_latest

import config
from actors.egress.rules import EgressGrant
from actors.errors import CorralError
from actors.edge.identity import Admission, Identity, resolve_grants
from actors.edge.intake_server import KNOWN_CAPABILITIES, OFFERED_CAPABILITIES
from protocol.client import cli
from protocol.client.api import HandshakeError, keygen
from protocol.wire.tasks import TaskRequest, error_reply
from tests.support.intake import curve_config, curve_keys
from tests.support.probe import wait_for
from tests.support.streams import stream_world


# --- keys -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """corrald's key pair, alice's (allowed), bob's (known to nobody)."""
    return curve_keys(tmp_path_factory.mktemp("keys"), allowed=("alice",), unknown=("bob",))


def test_keygen_writes_a_0600_secret_and_never_overwrites(tmp_path):
    public, secret = keygen("carol", tmp_path)
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public).st_mode) == 0o644
    assert "secret-key" in open(secret).read() and "secret-key" not in open(public).read()
    with pytest.raises(FileExistsError):
        keygen("carol", tmp_path)


def test_keygen_cli(tmp_path, capsys):
    assert cli.main(["keygen", "dave", "--dir", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "dave.key_secret").st_mode) == 0o600
    assert cli.main(["keygen", "dave", "--dir", str(tmp_path / "k")]) == 125
    assert "already exists" in capsys.readouterr().err


# --- grants and configuration, no socket ---------------------------------------------

def request(*capabilities: str, priority: int = 2) -> TaskRequest:
    return TaskRequest(task_id="t", priority=priority, argv=(b"true",), env=(), cwd=b"", stdin=b"",
                       timeout_ms=0, output_cap=0, capabilities=tuple(c.encode() for c in capabilities))


def test_grants_star_is_every_offered_capability_and_names_are_checked():
    assert resolve_grants("k", ("*",), KNOWN_CAPABILITIES, OFFERED_CAPABILITIES) == OFFERED_CAPABILITIES
    assert "dev:gpu" not in OFFERED_CAPABILITIES
    with pytest.raises(CorralError, match="config: k: unknown capability 'dev:pyhton'"):
        resolve_grants("k", ("dev:pyhton",), KNOWN_CAPABILITIES, OFFERED_CAPABILITIES)


def test_an_identity_refuses_a_capability_it_was_not_granted_naming_it():
    identity = Identity("alice", frozenset({"dev:python"}))
    identity.check(request("dev:python"))
    with pytest.raises(Exception) as error:
        identity.check(request("dev:python", "net:egress"))
    assert error.value.code == "capability_denied"
    assert "'net:egress'" in str(error.value) and "'alice'" in str(error.value)


def test_the_local_identity_has_the_configured_grants():
    cfg = config.load(overrides={"identity": {"local_name": "me", "local_grants": ["base:execute"]}})
    admission = Admission.from_config(cfg, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES)
    assert not admission.curve
    assert admission.identity_of(None) == Identity("me", frozenset({"base:execute"}), EgressGrant(everything=True))
    default = Admission.from_config(config.load(), KNOWN_CAPABILITIES, OFFERED_CAPABILITIES)
    assert default.identity_of(None).grants == OFFERED_CAPABILITIES


@pytest.mark.parametrize("identity, message", [
    ({"grants": {"alice": ["dev:python"]}}, "need identity.server_secret_key"),
    ({"clients": {"alice": "x" * 40}}, "need identity.server_secret_key"),
    ({"server_secret_key": "SERVER", "grants": {"zed": ["dev:python"]}}, "identity.grants.zed: no client key"),
    ({"server_secret_key": "SERVER", "clients": {"eve": "short"}}, "is not a Z85 CurveZMQ public key"),
    ({"server_secret_key": "SERVER", "default_grants": ["net:anything"]}, "unknown capability 'net:anything'"),
    ({"server_secret_key": "PUBLIC"}, "holds no secret key"),
    ({"server_secret_key": "/nonexistent"}, "cannot be read"),
])
def test_bad_identity_config_is_a_clear_start_up_error(keys, identity, message):
    names = {"SERVER": keys["server_secret"], "PUBLIC": keys["server_public"]}
    identity = {k: names.get(v, v) if isinstance(v, str) else v for k, v in identity.items()}
    cfg = config.load(overrides={"identity": {"client_keys_dir": keys["clients"] if "server_secret_key" in
                                              identity else "", **identity}})
    with pytest.raises(CorralError) as error:
        Admission.from_config(cfg, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES)
    assert str(error.value).startswith("config: ") and message in str(error.value)


def test_a_server_secret_key_readable_by_others_is_refused(keys, tmp_path):
    loose = tmp_path / "loose.key_secret"
    loose.write_bytes(open(keys["server_secret"], "rb").read())
    loose.chmod(0o644)
    cfg = config.load(overrides={"identity": {"server_secret_key": str(loose)}})
    with pytest.raises(CorralError, match="readable by others .*chmod 600"):
        Admission.from_config(cfg, KNOWN_CAPABILITIES, OFFERED_CAPABILITIES)


# --- the real IntakeServer with CurveZMQ and ZAP --------------------------------------

@pytest.fixture
def curve_intake(tmp_path, keys):
    with stream_world(tmp_path, identity=curve_config(keys)) as w:
        yield w.directory, w.server, w.scheduler, w.metrics, w.client


def as_alice(keys) -> dict:
    return {"server_key": keys["server_public"], "client_key": keys["alice"]}


def scrape(metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_an_allowed_key_gets_in_under_its_name(curve_intake, keys):
    directory, server, scheduler, metrics, connect = curve_intake
    alice = connect(**as_alice(keys))
    future = alice.submit(["true"], capabilities=["dev:python"], task_id="a1")
    (submit,) = wait_for(scheduler, 1)
    assert server.admission.charges[submit.task.ticket] == ("alice", 1.0)
    directory.answer(submit.task.ticket, error_reply("a1", "", ""))
    assert future.result(timeout=5).error_code == ""
    text = scrape(metrics)
    assert 'corral_budget_spent_total{identity="alice"} 1.0' in text
    assert 'corral_budget_remaining{identity="alice"}' in text


def test_an_unknown_key_is_refused_at_the_handshake(curve_intake, keys):
    directory, server, scheduler, metrics, connect = curve_intake
    bob = connect(server_key=keys["server_public"], client_key=keys["bob"])
    with pytest.raises(HandshakeError) as error:
        bob.run(["true"], wait_s=5)
    assert error.value.code == "key_refused" and "allow-list" in str(error.value)
    assert metrics.counter_total(metrics.handshakes_denied) >= 1
    assert scheduler.proxy().seen.get() == [] and server.unanswered() == 0


def test_a_client_without_a_key_is_told_the_server_needs_one(curve_intake):
    directory, server, scheduler, metrics, connect = curve_intake
    with pytest.raises(HandshakeError) as error:
        connect().run(["true"], wait_s=5)
    assert error.value.code == "key_missing" and "requires CurveZMQ" in str(error.value)
    assert scheduler.proxy().seen.get() == []


def test_a_wrong_server_key_is_named_as_the_likely_cause(curve_intake, keys):
    directory, server, scheduler, metrics, connect = curve_intake
    with pytest.raises(HandshakeError) as error:
        connect(server_key=keys["bob_public"], client_key=keys["alice"]).run(["true"], wait_s=5)
    assert error.value.code == "server_key_mismatch" and "server key" in str(error.value)
    assert scheduler.proxy().seen.get() == []


def test_a_capability_not_granted_is_refused_naming_it(curve_intake, keys):
    directory, server, scheduler, metrics, connect = curve_intake
    reply = connect(**as_alice(keys)).run(["true"], capabilities=["dev:python", "net:egress"], wait_s=5)
    assert reply.error_code == "capability_denied" and "'net:egress'" in reply.error_message
    assert scheduler.proxy().seen.get() == [] and server.admission.charges == {}


@pytest.mark.parametrize("capabilities, code", [
    (["net:everything"], "unknown_capability"),
    (["dev:python", "dev:python"], "duplicate_capability"),
    (["net:egress"], "capability_denied"),
])
def test_capability_refusals_are_distinct_codes(curve_intake, keys, capabilities, code):
    directory, server, scheduler, metrics, connect = curve_intake
    assert connect(**as_alice(keys)).run(["true"], capabilities=capabilities, wait_s=5).error_code == code


def test_over_budget_is_refused_with_the_time_to_wait_and_refills(curve_intake, keys):
    """alice: capacity 3, refill 0.5 per second; a NORMAL task costs 1."""
    directory, server, scheduler, metrics, connect = curve_intake
    alice = connect(**as_alice(keys))
    futures = [alice.submit(["true"], task_id=f"b{i}") for i in range(3)]
    submits = wait_for(scheduler, 3)
    reply = alice.run(["true"], task_id="over", wait_s=5)
    assert reply.error_code == "budget_exhausted" and "'alice'" in reply.error_message
    assert 0 < reply.retry_after_ms <= 2000
    critical = alice.run(["true"], priority="critical", wait_s=5)  # costs 8, more than alice ever holds
    assert critical.error_code == "cost_over_capacity"
    time.sleep(reply.retry_after_ms / 1000)
    later = alice.submit(["true"], task_id="later")
    assert len(wait_for(scheduler, 4)) == 4  # after the wait it was told, it is accepted
    for submit in submits + [scheduler.proxy().seen.get()[3]]:
        directory.answer(submit.task.ticket, error_reply(submit.task.request.task_id, "", ""))
    assert all(f.result(timeout=5).error_code == "" for f in futures + [later])


def test_a_task_that_never_reached_a_vm_is_refunded(curve_intake, keys):
    directory, server, scheduler, metrics, connect = curve_intake
    alice = connect(**as_alice(keys))
    ledger = server.admission.ledger
    busy = alice.submit(["true"], task_id="busy")
    ran = alice.submit(["true"], task_id="ran")
    first, second = wait_for(scheduler, 2)
    directory.answer(first.task.ticket, error_reply("busy", "busy", "queue full", 1000))
    directory.answer(second.task.ticket, error_reply("ran", "timeout", "ran too long"))
    assert busy.result(timeout=5).error_code == "busy" and ran.result(timeout=5).error_code == "timeout"
    remaining, charged, refunded = ledger.snapshot()["alice"]
    assert (charged, refunded) == (2.0, 1.0)
    assert 'corral_budget_refunded_total{identity="alice"} 1.0' in scrape(metrics)


def test_a_curve_client_to_a_server_without_curve_is_told_so(tmp_path, keys):
    with stream_world(tmp_path, identity=config.load()) as w:
        with pytest.raises(HandshakeError) as error:
            # The handshake verdict comes first; the wait is slack for a loaded machine.
            w.client(**as_alice(keys)).run(["true"], wait_s=30)
        # Usually told exactly; when libzmq's peer closes before its ERROR is
        # read every time, the client can only name both likely causes.
        assert error.value.code in ("curve_not_offered", "server_key_mismatch")
        assert "without CurveZMQ" in str(error.value) or "does not use CurveZMQ" in str(error.value)


def test_without_curve_every_caller_is_the_local_identity_with_its_grants(tmp_path):
    cfg = config.load(overrides={"identity": {"local_grants": ["dev:python"]}})
    with stream_world(tmp_path, identity=cfg) as w:
        c = w.client()
        reply = c.run(["true"], capabilities=["res:high_cpu"], wait_s=5)
        assert reply.error_code == "capability_denied" and "'local'" in reply.error_message
        c.submit(["true"], capabilities=["dev:python"])
        (submit,) = wait_for(w.scheduler, 1)
        assert w.server.admission.charges[submit.task.ticket] == ("local", 1.0)


def test_the_cli_names_a_refused_key(curve_intake, keys, capsys):
    directory, server, scheduler, metrics, connect = curve_intake
    code = cli.main(["run", "--endpoint", server.endpoint, "--server-key", keys["server_public"],
                               "--key", keys["bob"], "--wait", "5", "--", "true"])
    assert code == 125
    assert "corral: error key_refused:" in capsys.readouterr().err
