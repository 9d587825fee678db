"""The answer built from a finished task, no actor and no VM: made-up Exit
reports and collected files in, TaskReply out."""

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from actors.artifacts.signing import Signer
from actors.messages import Task
from actors.replies import exit_reply, whole_ms, with_files
from protocol.channel import messages as guest
from protocol.channel.codec import replace
from protocol.wire import outcomes, receipts
from protocol.wire.tasks import NORMAL, TaskRequest

ACCEPTED, ASSIGNED, ACQUIRED = 100.0, 100.25, 100.2625


def task(timeout_ms=1500, collect=()):
    return Task(7, TaskRequest(task_id="t7", priority=NORMAL, argv=(b"make", b"it"), env=(), cwd=b"",
                               stdin=b"", timeout_ms=timeout_ms, output_cap=100, capabilities=(),
                               collect=collect), ACCEPTED)


def exit_message(**fields):
    values = dict(exec_id=2, exit_code=0, signal=0, timed_out=False, stdout_truncated=False,
                  stderr_truncated=False, wall_ms=40, user_cpu_ms=30, sys_cpu_ms=5, max_rss_kib=2048)
    return guest.Exit(**dict(values, **fields))


def test_a_clean_exit_is_completed_with_its_output_figures_and_times():
    reply = exit_reply(task(), exit_message(), b"out", b"err", ASSIGNED, ACQUIRED)
    assert (reply.task_id, reply.error_code, reply.error_message) == ("t7", "", "")
    assert (reply.exit_code, reply.signal, reply.timed_out, reply.outcome) == (0, 0, False, outcomes.COMPLETED)
    assert (reply.stdout, reply.stderr) == (b"out", b"err")
    assert (reply.queued_ms, reply.acquire_ms) == (250, 12)
    assert (reply.run_ms, reply.user_cpu_ms, reply.sys_cpu_ms, reply.max_rss_kib) == (40, 30, 5, 2048)
    assert reply.retry_after_ms == 0 and reply.files_out == ()


def test_a_command_killed_at_its_timeout_is_answered_timeout():
    reply = exit_reply(task(timeout_ms=1500), exit_message(timed_out=True, exit_code=-1, signal=9),
                       b"", b"", ASSIGNED, ACQUIRED)
    assert reply.error_code == "timeout" and reply.timed_out
    assert reply.error_message == "the command ran past its timeout of 1.5 s and was killed"
    assert reply.outcome == outcomes.TIMED_OUT  # before the signal


@pytest.mark.parametrize("fields, outcome", [
    (dict(oom_killed=True, exit_code=-1, signal=9), outcomes.OOM_KILLED),
    (dict(exit_code=-1, signal=15), outcomes.KILLED_BY_SIGNAL),
    (dict(exit_code=2, stdout_truncated=True), outcomes.EXITED_NONZERO),
    (dict(stderr_truncated=True), outcomes.OUTPUT_TRUNCATED),
])
def test_the_outcome_says_what_happened_to_the_command(fields, outcome):
    reply = exit_reply(task(), exit_message(**fields), b"", b"", ASSIGNED, ACQUIRED)
    assert reply.outcome == outcome and reply.error_code == ""
    assert (reply.stdout_truncated, reply.stderr_truncated) == (
        fields.get("stdout_truncated", False), fields.get("stderr_truncated", False))


def test_times_that_run_backwards_count_as_zero():
    reply = exit_reply(task(), exit_message(), b"", b"", assigned_at=ACCEPTED - 1, acquired_at=ACCEPTED - 2)
    assert (reply.queued_ms, reply.acquire_ms) == (0, 0)
    assert whole_ms(0.0019) == 1 and whole_ms(-5) == 0


def test_collected_files_come_with_receipts_that_verify_and_failed_ones_without():
    key = Ed25519PrivateKey.generate()
    signer = Signer(key, Path("unused.key"))
    finished = task(collect=(b"/tmp/a", b"/tmp/missing"))
    reply = exit_reply(finished, exit_message(exit_code=3), b"", b"", ASSIGNED, ACQUIRED)
    answered = with_files(reply, finished, [(b"/tmp/a", "", b"data"), (b"/tmp/missing", "not found", b"")],
                          signer)
    (path, error, data, receipt), missing = answered.files_out
    assert (path, error, data) == (b"/tmp/a", "", b"data")
    body = receipts.verify(b"data", receipt, key.public_key())
    assert (body.task_id, body.command, body.outcome, body.exit_code) == (
        "t7", (b"make", b"it"), outcomes.EXITED_NONZERO, 3)
    assert missing == (b"/tmp/missing", "not found", b"", b"")
    assert replace(answered, files_out=()) == reply  # nothing else changed


def test_without_a_signer_files_come_unsigned():
    finished = task(collect=(b"/tmp/a",))
    reply = exit_reply(finished, exit_message(), b"", b"", ASSIGNED, ACQUIRED)
    assert with_files(reply, finished, [(b"/tmp/a", "", b"x")], None).files_out == ((b"/tmp/a", "", b"x", b""),)
