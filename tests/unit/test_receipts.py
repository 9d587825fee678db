"""Receipts, the host key, the host's collect bookkeeping and the request checks
for files, without VMs (tests/test_artifacts.py does them end to end)."""

import json
import stat

import pytest

from actors.artifacts import signing
from actors.artifacts.files import Collection, files_out
from actors.edge.intake_server import TaskLimits, validate
from actors.errors import CorralError, Rejected
from protocol.channel import messages as guest
from protocol.client import cli
from protocol.wire import receipts, outcomes
from protocol.wire.tasks import TaskRequest

MiB = 1 << 20


@pytest.fixture
def signer(tmp_path):
    return signing.load_or_create(tmp_path / "keys" / "receipt.key")


def sample(signer, data=b"\x7fELF..."):
    body = receipts.body_for("t1", (b"gcc", b"-shared", b"\xff"), "completed", 0, 0, b"/tmp/lib.so", data)
    return signer.receipt(body)


def test_key_is_made_once_with_mode_0600_and_its_public_half_beside_it(tmp_path):
    key_file = tmp_path / "keys" / "receipt.key"
    first = signing.load_or_create(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert first.public_key_file.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    again = signing.load_or_create(key_file)
    assert again.key_id == first.key_id  # loaded, not replaced


def test_a_key_others_can_read_is_refused(tmp_path):
    key_file = tmp_path / "receipt.key"
    signing.load_or_create(key_file)
    key_file.chmod(0o644)
    with pytest.raises(CorralError, match="must be a regular file of mode 0600"):
        signing.load_or_create(key_file)


def test_a_receipt_verifies_and_says_what_it_signs(signer):
    receipt = sample(signer)
    body = receipts.verify(b"\x7fELF...", receipt, receipts.load_public_key(signer.public_key_file))
    assert (body.task_id, body.command, body.outcome, body.exit_code, body.path) == \
        ("t1", (b"gcc", b"-shared", b"\xff"), "completed", 0, b"/tmp/lib.so")


@pytest.mark.parametrize("field, value", [
    ("task_id", "t2"), ("command", ["gcc", "-O0"]), ("exit_code", 1), ("outcome", "exited_nonzero"),
    ("path", "/tmp/other.so"), ("signal", 9)])
def test_any_changed_fact_breaks_the_signature(signer, field, value):
    doc = json.loads(sample(signer))
    doc[field] = value
    with pytest.raises(receipts.ReceiptInvalid, match="bad signature"):
        receipts.verify(b"\x7fELF...", json.dumps(doc).encode(), receipts.load_public_key(signer.public_key_file))


def test_a_changed_artifact_or_another_key_is_rejected(signer, tmp_path):
    receipt = sample(signer)
    public = receipts.load_public_key(signer.public_key_file)
    with pytest.raises(receipts.ReceiptInvalid, match="does not match the receipt"):
        receipts.verify(b"\x7fELF..!", receipt, public)
    other = signing.load_or_create(tmp_path / "other.key")
    with pytest.raises(receipts.ReceiptInvalid, match="not by the trusted key"):
        receipts.verify(b"\x7fELF...", receipt, receipts.load_public_key(other.public_key_file))
    # A receipt re-signed by another key but claiming the trusted key's id.
    forged = json.loads(other.receipt(receipts.body_for("t1", (b"gcc", b"-shared", b"\xff"), "completed",
                                                        0, 0, b"/tmp/lib.so", b"\x7fELF...")))
    forged["key_id"] = signer.key_id
    with pytest.raises(receipts.ReceiptInvalid, match="bad signature"):
        receipts.verify(b"\x7fELF...", json.dumps(forged).encode(), public)


def test_corral_verify_checks_a_file_against_its_receipt_offline(signer, tmp_path, capsys):
    artifact = tmp_path / "lib.so"
    artifact.write_bytes(b"\x7fELF...")
    (tmp_path / "lib.so.receipt").write_bytes(sample(signer))
    key = str(signer.public_key_file)
    assert cli.main(["verify", "--host-key", key, "--expect-exit", "0", str(artifact)]) == 0
    assert "verified" in capsys.readouterr().out
    assert cli.main(["verify", "--host-key", key, "--expect-exit", "3", str(artifact)]) == 1
    artifact.write_bytes(b"\x7fELF..!")
    assert cli.main(["verify", "--host-key", key, str(artifact)]) == 1
    assert "REJECTED" in capsys.readouterr().err


@pytest.mark.parametrize("junk", [b"", b"{", b"[]", b'{"format": "corral-receipt/1"}', b"x" * 10000])
def test_malformed_receipts_are_rejected_clearly(signer, junk):
    with pytest.raises(receipts.ReceiptInvalid):
        receipts.verify(b"", junk, receipts.load_public_key(signer.public_key_file))


def chunk(index, data=b"", last=True, error="", collect_id=1):
    return guest.Collected(collect_id=collect_id, index=index, data=data, last=last, error=error)


def test_collection_keeps_files_in_order_and_reports_errors_per_file():
    c = Collection(1, (b"/tmp/a", b"/tmp/missing", b"/tmp/b"), cap=MiB)
    assert c.add(chunk(0, b"aa", last=False)) == ""
    assert c.add(chunk(0, b"a")) == ""
    assert c.add(chunk(1, error="No such file or directory")) == ""
    assert c.add(chunk(2, b"")) == ""
    assert c.done
    assert c.results == [(b"/tmp/a", "", b"aaa"), (b"/tmp/missing", "No such file or directory", b""),
                         (b"/tmp/b", "", b"")]


def test_collection_never_holds_more_than_the_cap_whatever_the_guest_sends():
    c = Collection(1, (b"/tmp/small", b"/tmp/big", b"/tmp/after"), cap=MiB)
    c.add(chunk(0, b"s" * 1000))
    for _ in range(5):  # a lying guest: 5 MiB for a task capped at 1 MiB
        c.add(chunk(1, b"b" * (MiB - 16), last=False))
        assert c.held + len(c.buffer) <= MiB
    c.add(chunk(1, b""))
    c.add(chunk(2, b"ok"))
    assert [(p, e.startswith("over the collect cap"), len(d)) for p, e, d in c.results] == \
        [(b"/tmp/small", False, 1000), (b"/tmp/big", True, 0), (b"/tmp/after", False, 2)]


@pytest.mark.parametrize("bad", [chunk(1), chunk(0, collect_id=2), chunk(0, b"x", error="e"),
                                 chunk(0, last=False, error="e")])
def test_collection_names_out_of_order_or_inconsistent_chunks_as_violations(bad):
    assert Collection(1, (b"/tmp/a", b"/tmp/b"), cap=MiB).add(bad)


def test_files_out_signs_only_collected_files(signer):
    out = files_out([(b"/tmp/a", "", b"A"), (b"/tmp/b", "No such file", b"")], signer, "t", (b"cc",),
                    "completed", 0, 0)
    assert out[1] == (b"/tmp/b", "No such file", b"", b"")
    receipts.verify(b"A", out[0][3], receipts.load_public_key(signer.public_key_file))


LIMITS = TaskLimits(default_timeout_ms=60_000, max_timeout_ms=3_600_000, default_output_cap=MiB,
                    max_output_cap=16 * MiB, max_request_bytes=16 * MiB, max_put_bytes=2 * MiB)


def request(**fields):
    base = dict(task_id="t", priority=2, argv=(b"true",), env=(), cwd=b"", stdin=b"", timeout_ms=0,
                output_cap=0, capabilities=())
    return TaskRequest(**{**base, **fields})


@pytest.mark.parametrize("files_in, collect, code, text", [
    (((b"/tmp/a", 0o644, b"x" * MiB), (b"/tmp/b", 0o644, b"y" * (MiB + 1))), (), "files_too_large",
     "files_in[1] '/tmp/b': 1048577 bytes bring the files to put to 2097153 bytes, over the cap of 2097152"),
    (((b"tmp/a", 0o644, b""),), (), "invalid_request", "files_in[0] 'tmp/a': must be an absolute path"),
    (((b"/tmp/a", 0o4755, b""),), (), "invalid_request", "has bits beyond 0777"),
    ((), (b"/tmp/../etc/shadow",), "invalid_request", "collect[0] '/tmp/../etc/shadow': has an empty, '.'"),
    ((), (b"/tmp/a", b"/tmp/a"), "invalid_request", "collect[1] '/tmp/a': named twice"),
])
def test_bad_files_are_refused_naming_the_file(files_in, collect, code, text):
    with pytest.raises(Rejected) as info:
        validate(request(files_in=files_in, collect=collect), LIMITS)
    assert info.value.code == code and text in str(info.value)


def test_files_within_the_cap_are_accepted():
    ok = validate(request(files_in=((b"/tmp/a", 0o755, b"x" * (2 * MiB)),), collect=(b"/home/task/out",)), LIMITS)
    assert ok.files_in[0][1] == 0o755


def test_outcome_precedence_is_fate_first_then_truncation():
    assert outcomes.classify(timed_out=True, oom_killed=True, signal=9, exit_code=-1, truncated=True) == "timed_out"
    assert outcomes.classify(timed_out=False, oom_killed=True, signal=9, exit_code=-1, truncated=True) == "oom_killed"
    assert outcomes.classify(timed_out=False, oom_killed=False, signal=11, exit_code=-1, truncated=True) \
        == "killed_by_signal"
    assert outcomes.classify(timed_out=False, oom_killed=False, signal=0, exit_code=2, truncated=True) \
        == "exited_nonzero"
    assert outcomes.classify(timed_out=False, oom_killed=False, signal=0, exit_code=0, truncated=True) \
        == "output_truncated"
    assert outcomes.classify(timed_out=False, oom_killed=False, signal=0, exit_code=0, truncated=False) \
        == "completed"
    assert outcomes.for_error("vm_lost", command_started=True) == "vm_crashed"
    assert outcomes.for_error("vm_lost", command_started=False) == "not_run"
