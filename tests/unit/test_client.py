"""protocol.client.api and the corral command line (protocol.client.cli) against
a fake corrald (tests/support/fake_corrald.py): a real ZeroMQ ROUTER in a
thread, bound to an ipc socket in the test's tmp dir, that answers as the test
says. Streams (TaskStream, `corral run` writing output as it comes, `-i`):
test_client_stream.py."""

from __future__ import annotations

import concurrent.futures
import configparser
import importlib
import io
import logging
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import config
from protocol.client.api import ClientClosedError, Client
from protocol.client.cli import main
from protocol.channel.codec import encode, replace
from protocol.wire.tasks import HIGH, PROTOCOL_TAG, StatusReply, StatusRequest, TaskRequest, error_reply
from tests.support.fake_corrald import FakeDaemon, framed, ok_reply

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_client_thread_left_behind():
    yield
    assert [t.name for t in threading.enumerate() if t.name.startswith("corral-client")] == []


def answer_each_with(make_reply):
    """An answer function replying to every request at once with make_reply(request)."""
    return lambda identity, request: [framed(identity, make_reply(request))]


# --- the client API ------------------------------------------------------------

def test_task_round_trip_carries_every_field(daemon, client):
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id, exit_code=7, stdout=b"hi\n"))
    future = client.submit(["echo", b"\xffraw"], priority="high", capabilities=["dev:python", "net:egress"],
                           env={"LANG": "C", b"K": b"v=1"}, cwd="/home/task", stdin=b"input",
                           timeout_s=2.5, output_cap=4096, task_id="round-trip-1")
    reply = future.result(timeout=5)
    assert (reply.task_id, reply.exit_code, reply.stdout) == ("round-trip-1", 7, b"hi\n")
    [request] = daemon.requests
    assert request == TaskRequest(task_id="round-trip-1", priority=HIGH, argv=(b"echo", b"\xffraw"),
                                  env=((b"LANG", b"C"), (b"K", b"v=1")), cwd=b"/home/task", stdin=b"input",
                                  timeout_ms=2500, output_cap=4096,
                                  capabilities=(b"dev:python", b"net:egress"))


def test_defaults_generate_a_task_id_and_leave_limits_to_the_daemon(daemon, client):
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id))
    reply = client.run(["true"], wait_s=5)
    [request] = daemon.requests
    assert re.fullmatch(r"[0-9a-f]{16}", request.task_id) and reply.task_id == request.task_id
    assert (request.priority, request.timeout_ms, request.output_cap, request.env, request.stdin) == \
        (2, 0, 0, (), b"")


def test_fifty_tasks_from_five_threads_in_flight_answered_out_of_order(daemon, client):
    held = []

    def answer_all_at_fifty(identity, request):
        held.append((identity, request))
        if len(held) < 50:
            return []
        random.Random(7).shuffle(held)
        return [framed(ident, ok_reply(req.task_id, stdout=req.argv[1])) for ident, req in held]

    daemon.answer = answer_all_at_fifty
    start = threading.Barrier(5)

    def submit_ten(thread_no):
        start.wait()
        return [client.submit(["echo", f"{thread_no}-{i}"]) for i in range(10)]

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futures = [f for batch in pool.map(submit_ten, range(5)) for f in batch]
    replies = [f.result(timeout=10) for f in futures]
    sent_ids = [r.task_id for r in daemon.requests]
    assert len(set(sent_ids)) == 50
    assert sorted(r.task_id for r in replies) == sorted(sent_ids)
    # Each future got the reply to its own request, not just any reply.
    by_id = {req.task_id: req for req in daemon.requests}
    assert all(by_id[r.task_id].argv[1] == r.stdout for r in replies)
    assert {r.stdout for r in replies} == {f"{t}-{i}".encode() for t in range(5) for i in range(10)}


def test_status_round_trip(daemon, client):
    daemon.answer = answer_each_with(lambda req: StatusReply(
        request_id=req.request_id, queue_depth=((b"normal", b"3"),), pool=((b"ready", b"2"),),
        accepted=9, answered=6))
    status = client.status(wait_s=5)
    [request] = daemon.requests
    assert isinstance(request, StatusRequest) and status.request_id == request.request_id
    assert (status.queue_depth, status.pool, status.accepted, status.answered) == \
        (((b"normal", b"3"),), ((b"ready", b"2"),), 9, 6)


def test_reply_for_unknown_id_is_ignored(daemon, client, caplog):
    caplog.set_level(logging.DEBUG, logger="corral.client")
    daemon.answer = lambda identity, req: [framed(identity, ok_reply("nobody-asked", exit_code=99)),
                                           framed(identity, ok_reply(req.task_id, exit_code=1))]
    reply = client.run(["x"], wait_s=5)
    assert reply.exit_code == 1
    assert "unknown task id 'nobody-asked'" in caplog.text


def test_malformed_replies_are_ignored_and_a_later_good_reply_resolves(daemon, client, caplog):
    caplog.set_level(logging.WARNING, logger="corral.client")

    def garbage_then_good(identity, req):
        good = encode(ok_reply(req.task_id, exit_code=5))
        stranger = encode(TaskRequest(task_id=req.task_id, priority=2, argv=(b"x",), env=(), cwd=b"",
                                      stdin=b"", timeout_ms=0, output_cap=0, capabilities=()))
        return [[identity, b"", PROTOCOL_TAG, b"\xff\x00garbage"],  # unknown type id
                [identity, b"", PROTOCOL_TAG, good[:-3]],  # truncated
                [identity, b"", PROTOCOL_TAG, good + b"\x00"],  # trailing bytes
                [identity, b"", PROTOCOL_TAG, stranger],  # a client's message, not a daemon's
                [identity, b"", b"corral/0", good],  # another protocol
                [identity, b"", PROTOCOL_TAG],  # frames missing
                [identity, b"no delimiter"],
                [identity, b"", PROTOCOL_TAG, good]]

    daemon.answer = garbage_then_good
    assert client.run(["x"], wait_s=5).exit_code == 5
    assert len([r for r in caplog.records if "ignored a" in r.getMessage()]) == 7
    # The I/O thread lived through it.
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id, exit_code=6))
    assert client.run(["y"], wait_s=5).exit_code == 6


def test_tasks_wait_in_the_outbox_beyond_the_high_water_mark(daemon):
    # More than the socket's high-water mark: the rest waits in the outbox.
    # (A daemon that is not there at all: tests/test_reach.py.)
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id))
    with Client(daemon.endpoint) as client:
        futures = [client.submit(["true"]) for _ in range(1500)]
        replies = [f.result(timeout=10) for f in futures]
    assert len({r.task_id for r in replies}) == 1500


def test_duplicate_in_flight_task_id_is_refused(daemon, client):
    client.submit(["a"], task_id="same")
    with pytest.raises(ValueError, match="'same' is already in flight"):
        client.submit(["b"], task_id="same")


def test_bad_arguments_fail_in_the_caller(client):
    with pytest.raises(TypeError, match="not one string"):
        client.submit("ls -l")
    with pytest.raises(ValueError, match="priority 'urgent'"):
        client.submit(["ls"], priority="urgent")
    with pytest.raises(ValueError, match="argv"):
        client.submit([])  # the protocol needs at least one argument


def test_run_without_answer_raises_a_helpful_timeout(daemon, client):
    with pytest.raises(TimeoutError) as caught:
        client.run(["sleep", "1"], wait_s=0.2, task_id="late")
    assert str(caught.value) == (f"no answer from corrald at {daemon.endpoint} within 0.2 s; "
                                 "is it running? start it with scripts/run")
    # The abandoned id is free again, and its late reply would be ignored.
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id))
    assert client.run(["true"], wait_s=5, task_id="late").task_id == "late"


def test_close_fails_pending_futures(daemon):
    client = Client(daemon.endpoint)
    futures = [client.submit(["sleep", "9"]) for _ in range(3)]
    client.close()
    for future in futures:
        with pytest.raises(ClientClosedError, match="client closed before corrald at .* answered task"):
            future.result(timeout=1)
    with pytest.raises(ClientClosedError):
        client.submit(["true"])
    client.close()  # twice is harmless


def test_default_endpoint_comes_from_config():
    with Client() as client:
        assert client.endpoint == config.load().daemon.endpoint


# --- the command line ----------------------------------------------------------

def cli(daemon, *args: str) -> int:
    return main(["run", "--endpoint", daemon.endpoint, "--wait", "5", *args])


@pytest.fixture
def no_implicit_stdin(monkeypatch):
    class Unreadable:
        def __getattr__(self, name):
            raise AssertionError("corral read stdin without --stdin-file -")

    monkeypatch.setattr("sys.stdin", Unreadable())


def test_cli_passes_output_and_exit_code_through(daemon, capsysbinary, no_implicit_stdin):
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id, exit_code=3, stdout=b"out\xff\x00\n",
                                                          stderr=b"err\n"))
    assert cli(daemon, "--priority", "low", "--cap", "dev:python", "--cap", "bogus:cap", "--timeout", "4",
               "--env", "A=1=2", "--cwd", "/tmp", "--", "python3", "-c", "exit(3)") == 3
    out, err = capsysbinary.readouterr()
    assert (out, err) == (b"out\xff\x00\n", b"err\n")
    [request] = daemon.requests
    assert (request.argv, request.priority, request.capabilities, request.timeout_ms, request.env,
            request.cwd, request.stdin) == ((b"python3", b"-c", b"exit(3)"), 3, (b"dev:python", b"bogus:cap"),
                                            4000, ((b"A", b"1=2"),), b"/tmp", b"")


def test_cli_stdin_file_and_dash(daemon, tmp_path, monkeypatch, capsysbinary):
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id, stdout=req.stdin))
    (tmp_path / "in").write_bytes(b"from file")
    assert cli(daemon, "--stdin-file", str(tmp_path / "in"), "--", "cat") == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    assert cli(daemon, "--stdin-file", "-", "cat") == 0
    assert capsysbinary.readouterr().out == b"from filefrom stdin"


def test_cli_signal_exits_128_plus_n(daemon, capsysbinary):
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id, exit_code=-1, signal=9))
    assert cli(daemon, "--", "kill", "-9", "$$") == 137
    assert capsysbinary.readouterr().err == b"corral: command killed by signal 9 (SIGKILL)\n"


def test_cli_error_reply_exits_125(daemon, capsysbinary):
    daemon.answer = answer_each_with(lambda req: error_reply(req.task_id, "busy", "queue full (1000 tasks)",
                                                             retry_after_ms=2000))
    assert cli(daemon, "--", "true") == 125
    out, err = capsysbinary.readouterr()
    assert (out, err) == (b"", b"corral: error busy: queue full (1000 tasks); retry after 2 s\n")


def test_cli_notes_truncated_output(daemon, capsysbinary):
    daemon.answer = answer_each_with(lambda req: ok_reply(req.task_id, stdout=b"x" * 10, stdout_truncated=True))
    assert cli(daemon, "--output-cap", "10", "--", "yes") == 0
    out, err = capsysbinary.readouterr()
    assert (out, err) == (b"x" * 10, b"corral: output truncated (stdout)\n")
    assert daemon.requests[0].output_cap == 10


def test_cli_timed_out_command_keeps_its_output(daemon, capsysbinary):
    daemon.answer = answer_each_with(lambda req: replace(
        error_reply(req.task_id, "timeout", "killed at its deadline"), stdout=b"partial", timed_out=True,
        signal=9, run_ms=2000))
    assert cli(daemon, "--timeout", "2", "--", "sleep", "9") == 124
    out, err = capsysbinary.readouterr()
    assert (out, err) == (b"partial", b"corral: timed out after 2.0 s\n")


def test_cli_without_answer_exits_125_naming_the_endpoint(daemon, capsys):
    # corrald is there (the socket answers the connect) but says nothing.
    assert main(["run", "--endpoint", daemon.endpoint, "--wait", "0.2", "--", "true"]) == 125
    assert capsys.readouterr().err == (f"corral: no answer from corrald at {daemon.endpoint} within 0.2 s; "
                                       "is it running? start it with scripts/run\n")


def test_cli_status_table(daemon, capsys):
    daemon.answer = answer_each_with(lambda req: StatusReply(
        request_id=req.request_id,
        queue_depth=((b"critical", b"0"), (b"high", b"1"), (b"normal", b"12"), (b"low", b"0")),
        pool=((b"ready", b"3"), (b"busy", b"2")), accepted=40, answered=25))
    assert main(["status", "--endpoint", daemon.endpoint]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"corrald at {daemon.endpoint}"
    rows = [line.split() for line in lines[1:-1]]
    assert rows == [["queue", "tasks"], ["critical", "0"], ["high", "1"], ["normal", "12"], ["low", "0"],
                    ["pool", "VMs"], ["ready", "3"], ["busy", "2"]]
    assert len({len(line) for line in lines[1:-1]}) == 1  # numbers right-aligned in one column
    assert lines[-1] == "tasks accepted 40, answered 25"


def test_cli_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert "usage: corral" in capsys.readouterr().err
    assert main(["run", "--endpoint", "ipc:///nonexistent/x.sock"]) == 2
    assert "run needs a command" in capsys.readouterr().err
    assert main(["run", "--env", "NOEQUALS", "--", "true"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_the_corral_script_and_python_m_protocol_client_both_run_cli_main():
    entry_points = configparser.ConfigParser()
    entry_points.read(REPO / "setup.cfg")
    scripts = dict(line.split(" = ") for line in
                   entry_points["options.entry_points"]["console_scripts"].strip().splitlines())
    module, _, name = scripts["corral"].partition(":")
    assert getattr(importlib.import_module(module), name) is main
    done = subprocess.run([sys.executable, "-m", "protocol.client", "run", "--env", "X"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr.splitlines()[0]) == (2, "usage: corral run [options] -- CMD [ARGS...]")

def test_tasks_in_flight_when_the_daemon_goes_are_answered_connection_lost(tmp_path):
    fake = FakeDaemon(f"ipc://{tmp_path}/d.sock")
    with Client(fake.endpoint) as c:
        in_flight = c.submit(["sleep", "60"], task_id="in-flight")
        deadline = time.monotonic() + 5
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.requests, "the request never reached the fake daemon"
        fake.stop()  # as a crash would: the socket closes with the task unanswered
        reply = in_flight.result(timeout=5)
        assert (reply.task_id, reply.error_code, reply.outcome) == ("in-flight", "connection_lost", "unknown")
        assert "outcome is unknown" in reply.error_message
