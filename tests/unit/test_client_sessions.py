"""Sessions in the client library (Client.session, Session) and the command
line (corral session open|ls|close|pause|resume|fork, corral exec, corral cp), against a fake
corrald (tests/support/fake_corrald.py) that keeps sessions as corrald does
for one identity: ids it opened, each with its files, execs that echo."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from protocol.channel.constants import STDOUT
from protocol.client.api import Client, Session, SessionError, SessionFileError
from protocol.client.cli import main
from protocol.wire.tasks import (ErrorCode, SessionClose, SessionFork, SessionList, SessionOpen, SessionPause,
                                 SessionResume, TaskOutput, TaskRequest, TaskStdin, error_reply, session_reply)
from tests.support.fake_corrald import FakeDaemon, framed, ok_reply
from tests.unit.test_client_stream import echo_stdin_back

REPO = Path(__file__).resolve().parents[2]
SID = "s-00112233445566aa"


@pytest.fixture(autouse=True)
def no_client_thread_left_behind():
    yield
    assert [t.name for t in threading.enumerate() if t.name.startswith("corral-client")] == []


class FakeSessions:
    """corrald's session answers, as far as a caller can tell them apart."""

    def __init__(self) -> None:
        self.files: dict[str, dict[bytes, bytes]] = {}  # open sessions: id -> guest files
        self.paused: set[str] = set()
        self.opened = 0
        self.refuse_open: tuple[str, str, int] | None = None  # (code, text, retry ms)
        self.lock = threading.Lock()

    def __call__(self, identity, request):
        with self.lock:
            return [framed(identity, reply) for reply in self.answer(request)]

    def answer(self, request):
        if isinstance(request, SessionOpen):
            if self.refuse_open:
                code, text, retry = self.refuse_open
                return [session_reply(request.request_id, error_code=code, error_message=text,
                                      retry_after_ms=retry)]
            self.opened += 1
            session_id = f"s-{self.opened:016x}"
            self.files[session_id] = {}
            return [session_reply(request.request_id, session_id=session_id)]
        if isinstance(request, (SessionClose, SessionPause, SessionResume, SessionFork)):
            if request.session_id not in self.files:
                return [session_reply(request.request_id, error_code=ErrorCode.SESSION_NOT_FOUND,
                                      error_message=f"no session {request.session_id}")]
        if isinstance(request, SessionClose):
            self.files.pop(request.session_id)
            self.paused.discard(request.session_id)
            return [session_reply(request.request_id, session_id=request.session_id)]
        if isinstance(request, (SessionPause, SessionResume)):
            (self.paused.add if isinstance(request, SessionPause) else self.paused.discard)(request.session_id)
            return [session_reply(request.request_id, session_id=request.session_id)]
        if isinstance(request, SessionFork):
            new = []
            for _ in range(request.count):
                self.opened += 1
                new.append(f"s-{self.opened:016x}")
                self.files[new[-1]] = dict(self.files[request.session_id])
            return [session_reply(request.request_id, session_id=request.session_id,
                                  sessions=tuple((sid, b"", 0, 0, 0, "open") for sid in new))]
        if isinstance(request, SessionList):
            return [session_reply(request.request_id, sessions=tuple(
                (sid, b"job=build\nowner=me" if i == 0 else b"", 65_000, 5_000 * i, 3 + i,
                 "paused" if sid in self.paused else "open")
                for i, sid in enumerate(self.files)))]
        if not isinstance(request, TaskRequest):
            return []
        files = self.files.get(request.session_id)
        if files is None:
            return [error_reply(request.task_id, ErrorCode.SESSION_NOT_FOUND, f"no session {request.session_id}")]
        if request.session_id in self.paused:
            return [error_reply(request.task_id, ErrorCode.SESSION_PAUSED,
                                f"session {request.session_id} is paused; resume it first")]
        for path, mode, data in request.files_in:
            if not path.startswith(b"/tmp/"):
                return [error_reply(request.task_id, ErrorCode.PUT_FAILED, f"{path.decode()}: Permission denied")]
            files[path] = data
        files_out = tuple((path, "" if path in files else "No such file or directory", files.get(path, b""), b"")
                          for path in request.collect)
        out = b" ".join(request.argv) + b"\n" if request.argv != (b"true",) else b""
        if request.stream:
            return [TaskOutput(task_id=request.task_id, stream=STDOUT, offset=0, data=out),
                    ok_reply(request.task_id, files_out=files_out)]
        return [ok_reply(request.task_id, stdout=out, files_out=files_out)]


@pytest.fixture
def sessions(daemon):
    fake = FakeSessions()
    daemon.answer = fake
    return fake


# --- the client API ------------------------------------------------------------

def test_session_opens_with_every_field_and_closes_on_the_way_out(daemon, client, sessions):
    with client.session(["dev:python", "net:egress"], idle_s=60, life_s=600.5, labels={"job": "build"},
                        egress_allow=["pypi.org"]) as session:
        assert isinstance(session, Session) and session.session_id == "s-0000000000000001"
        assert list(sessions.files) == [session.session_id]
    assert sessions.files == {} and session.closed
    opened, closed = daemon.of_type(SessionOpen), daemon.of_type(SessionClose)
    assert [(o.capabilities, o.idle_s, o.max_life_s, o.labels, o.egress_allow) for o in opened] == \
        [((b"dev:python", b"net:egress"), 60, 601, ((b"job", b"build"),), (b"pypi.org",))]
    assert [c.session_id for c in closed] == [session.session_id]
    assert re.fullmatch(r"[0-9a-f]{16}", opened[0].request_id)


def test_defaults_leave_idle_time_and_lifetime_to_corrald(daemon, client, sessions):
    client.session()
    (opened,) = daemon.of_type(SessionOpen)
    assert (opened.capabilities, opened.idle_s, opened.max_life_s, opened.labels) == ((), 0, 0, ())


def test_a_refused_open_raises_session_error_with_its_code(client, sessions):
    sessions.refuse_open = (ErrorCode.SESSION_LIMIT, "'local' holds 4 sessions", 0)
    with pytest.raises(SessionError, match="session_limit: 'local' holds 4 sessions") as caught:
        client.session()
    assert caught.value.code == ErrorCode.SESSION_LIMIT
    sessions.refuse_open = (ErrorCode.BUSY, "queue full", 1500)
    with pytest.raises(SessionError) as caught:
        client.session()
    assert (caught.value.code, caught.value.retry_after_ms) == ("busy", 1500)


def test_bad_session_arguments_fail_in_the_caller(client):
    with pytest.raises(ValueError, match="idle_s must be a positive number"):
        client.session(idle_s=0)
    with pytest.raises(ValueError, match="life_s"):
        client.session(life_s=-1)
    session = Session(client, SID)
    with pytest.raises(ValueError, match="no capabilities or egress rules"):
        session.exec(["true"], capabilities=["dev:python"])
    with pytest.raises(ValueError, match="stdin_open needs stream=True"):
        session.exec(["cat"], stdin_open=True)


def test_exec_is_a_task_request_in_the_session_and_returns_its_reply(daemon, client, sessions):
    with client.session() as session:
        reply = session.exec(["echo", "hi"], env={"A": "1"}, cwd="/tmp", stdin=b"in", timeout_s=3)
        assert (reply.error_code, reply.exit_code, reply.stdout) == ("", 0, b"echo hi\n")
        (request,) = daemon.of_type(TaskRequest)
        assert (request.session_id, request.argv, request.capabilities, request.env, request.cwd,
                request.stdin, request.timeout_ms, request.stream) == \
            (session.session_id, (b"echo", b"hi"), (), ((b"A", b"1"),), b"/tmp", b"in", 3000, False)


def test_exec_with_stream_gives_a_task_stream(daemon, client, sessions):
    with client.session() as session:
        stream = session.exec(["echo", "live"], stream=True)
        assert [c.data for c in stream] == [b"echo live\n"] and stream.reply().exit_code == 0
    assert daemon.of_type(TaskRequest)[0].stream is True


def test_an_exec_in_a_session_that_is_gone_is_answered_session_not_found(client, sessions):
    reply = Session(client, SID).exec(["true"])
    assert (reply.error_code, reply.error_message) == (ErrorCode.SESSION_NOT_FOUND, f"no session {SID}")


def test_put_and_get_are_execs_of_true_with_files(daemon, client, sessions):
    with client.session() as session:
        session.put("/tmp/notes", b"\x00binary\xff", mode=0o600)
        assert session.get("/tmp/notes") == b"\x00binary\xff"
        put, get = daemon.of_type(TaskRequest)
        assert (put.argv, put.files_in, put.collect) == ((b"true",), ((b"/tmp/notes", 0o600, b"\x00binary\xff"),), ())
        assert (get.argv, get.files_in, get.collect) == ((b"true",), (), (b"/tmp/notes",))
        assert put.session_id == get.session_id == session.session_id


def test_get_of_a_missing_file_names_the_guests_reason(client, sessions):
    with client.session() as session:
        with pytest.raises(SessionFileError) as caught:
            session.get("/tmp/none")
    assert caught.value.path == "/tmp/none" and caught.value.error == "No such file or directory"
    assert str(caught.value) == f"cannot get /tmp/none from session {session.session_id}: No such file or directory"


def test_put_and_get_raise_session_error_for_a_failed_exec(client, sessions):
    with client.session() as session:
        with pytest.raises(SessionError) as caught:
            session.put("/etc/passwd", b"x")
        assert caught.value.code == ErrorCode.PUT_FAILED and "Permission denied" in str(caught.value)
    with pytest.raises(SessionError) as caught:
        Session(client, SID).get("/tmp/x")
    assert caught.value.code == ErrorCode.SESSION_NOT_FOUND


def test_close_says_whether_the_session_was_still_open(client, sessions):
    session = client.session()
    assert session.close() is True
    assert Session(client, session.session_id).close() is False
    with Session(client, SID):  # gone already (say, its idle time ended it): leaving is no error
        pass
    with pytest.raises(SessionError) as caught:
        client.close_session(SID)
    assert caught.value.code == ErrorCode.SESSION_NOT_FOUND


def test_an_error_inside_the_with_block_is_not_hidden_by_the_close(client, sessions, daemon):
    with pytest.raises(KeyError):
        with client.session():
            daemon.answer = lambda identity, request: [framed(identity, session_reply(
                request.request_id, error_code=ErrorCode.UNAVAILABLE, error_message="restarting"))]
            raise KeyError("the caller's own")


def test_sessions_lists_the_callers_sessions(client, sessions):
    first, second = client.session(), client.session()
    listed = client.sessions()
    assert [s.session_id for s in listed] == [first.session_id, second.session_id]
    assert listed[0].labels == {"job": "build", "owner": "me"} and listed[1].labels == {}
    assert (listed[0].age_s, listed[0].idle_s, listed[0].execs, listed[0].state) == (65.0, 0.0, 3, "open")
    assert listed[1].idle_s == 5.0


def test_a_session_request_in_flight_when_the_connection_drops_raises_connection_lost(tmp_path):
    fake = FakeDaemon(f"ipc://{tmp_path}/d.sock")
    with Client(fake.endpoint) as c:
        errors = []

        def open_one():
            try:
                c.session(wait_s=10)
            except SessionError as exc:
                errors.append(exc)

        opener = threading.Thread(target=open_one)
        opener.start()
        deadline = time.monotonic() + 5
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        fake.stop()
        opener.join(10)
    assert [e.code for e in errors] == [ErrorCode.CONNECTION_LOST]


# --- the command line ----------------------------------------------------------

def corral(daemon, *args: str) -> int:
    return main(["--endpoint", daemon.endpoint, *args])


def test_cli_session_open_prints_the_id_alone_on_its_last_line(daemon, sessions, capsys):
    assert corral(daemon, "session", "open", "--cap", "dev:python", "--cap", "fs:write_tmp", "--idle", "30",
                  "--life", "900", "--label", "job=build", "--label", "try=2") == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "s-0000000000000001" and err == ""
    (opened,) = daemon.of_type(SessionOpen)
    assert (opened.capabilities, opened.idle_s, opened.max_life_s, opened.labels) == \
        ((b"dev:python", b"fs:write_tmp"), 30, 900, ((b"job", b"build"), (b"try", b"2")))


def test_cli_session_open_refused_exits_125(daemon, sessions, capsys):
    sessions.refuse_open = (ErrorCode.SESSION_LIMIT, "'local' holds 4 sessions", 0)
    assert corral(daemon, "session", "open") == 125
    assert capsys.readouterr() == ("", "corral: error session_limit: 'local' holds 4 sessions\n")


def test_cli_exec_runs_like_corral_run_in_the_session(daemon, sessions, capsysbinary):
    assert corral(daemon, "session", "open") == 0
    session_id = capsysbinary.readouterr().out.decode().strip()
    assert corral(daemon, "exec", session_id, "--timeout", "5", "--env", "A=1", "--", "sh", "-c", "exit 0") == 0
    assert capsysbinary.readouterr() == (b"sh -c exit 0\n", b"")
    (request,) = daemon.of_type(TaskRequest)
    assert (request.session_id, request.argv, request.timeout_ms, request.env, request.stream,
            request.capabilities) == (session_id, (b"sh", b"-c", b"exit 0"), 5000, ((b"A", b"1"),), True, ())


def test_cli_exec_exit_code_and_options_before_the_id(daemon, capsysbinary):
    daemon.answer = lambda identity, request: [framed(identity, ok_reply(request.task_id, exit_code=3))]
    assert main(["exec", "--timeout", "2", SID, "--endpoint", daemon.endpoint, "--", "false", "--", "x"]) == 3
    (request,) = daemon.of_type(TaskRequest)
    assert (request.session_id, request.argv, request.timeout_ms) == (SID, (b"false", b"--", b"x"), 2000)


def test_cli_exec_in_an_unknown_session_exits_125_naming_it(daemon, sessions, capsysbinary):
    assert corral(daemon, "exec", SID, "--", "true") == 125
    assert capsysbinary.readouterr() == (b"", f"corral: error session_not_found: no session {SID}\n".encode())


def test_cli_exec_needs_a_command(capsys):
    assert main(["exec", SID, "--endpoint", "ipc:///nonexistent/x.sock"]) == 2
    assert "exec needs a command: corral exec ID [options] -- CMD [ARGS...]" in capsys.readouterr().err


def test_cli_exec_interactive_forwards_stdin(daemon):
    daemon.answer = echo_stdin_back
    done = subprocess.run([sys.executable, "-m", "protocol.client", "exec", SID, "-i", "--endpoint",
                           daemon.endpoint, "--", "cat"], cwd=REPO, input=b"hello\nworld\n",
                          capture_output=True, timeout=60)
    assert (done.stdout, done.stderr, done.returncode) == (b"hello\nworld\n", b"", 0)
    (request,) = daemon.of_type(TaskRequest)
    assert (request.session_id, request.stdin_open) == (SID, True)
    assert b"".join(m.data for m in daemon.of_type(TaskStdin)) == b"hello\nworld\n"


def test_cli_session_ls_lists_ids_labels_age_and_idle_time(daemon, sessions, capsys):
    assert corral(daemon, "session", "ls") == 0
    assert capsys.readouterr().out == "no sessions\n"
    for _ in range(2):
        corral(daemon, "session", "open")
    capsys.readouterr()
    assert corral(daemon, "session", "ls") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "AGE", "IDLE", "EXECS", "STATE", "LABELS"]
    assert [line.split() for line in lines[1:]] == [
        ["s-0000000000000001", "65s", "0s", "3", "open", "job=build,owner=me"],
        ["s-0000000000000002", "65s", "5s", "4", "open"]]


def test_cli_session_close(daemon, sessions, capsys):
    corral(daemon, "session", "open")
    session_id = capsys.readouterr().out.strip()
    assert corral(daemon, "session", "close", session_id) == 0
    assert capsys.readouterr() == ("", "")
    assert corral(daemon, "session", "close", session_id) == 125
    assert capsys.readouterr().err == f"corral: error session_not_found: no session {session_id}\n"
    assert corral(daemon, "exec", session_id, "--", "true") == 125


def test_cli_session_needs_a_subcommand(capsys):
    assert main(["session"]) == 2
    assert "open|ls|close|pause|resume|fork" in capsys.readouterr().err


# --- snapshots: pause, resume, fork ---------------------------------------------------------

def test_pause_resume_and_fork_send_their_requests_and_fork_gives_sessions_of_the_same_client(
        daemon, client, sessions):
    session = client.session()
    session.put("/tmp/a", b"kept")
    session.pause()
    assert client.sessions()[0].state == "paused"
    with pytest.raises(SessionError) as caught:
        session.get("/tmp/a")
    assert caught.value.code == ErrorCode.SESSION_PAUSED
    session.resume()
    forks = session.fork(2)
    assert [type(f) for f in forks] == [Session, Session] and all(f.client is client for f in forks)
    assert [f.session_id for f in forks] == ["s-0000000000000002", "s-0000000000000003"]
    assert [f.get("/tmp/a") for f in forks] == [b"kept", b"kept"]
    assert client.fork_session(session.session_id) == ["s-0000000000000004"]
    (pause,), (resume,) = daemon.of_type(SessionPause), daemon.of_type(SessionResume)
    assert pause.session_id == resume.session_id == session.session_id
    assert [(f.session_id, f.count) for f in daemon.of_type(SessionFork)] == [(session.session_id, 2),
                                                                             (session.session_id, 1)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", m.request_id) for m in (pause, resume))


@pytest.mark.parametrize("count", [0, 9, -1, 1.5, True, "2"])
def test_a_fork_count_outside_1_to_max_forks_fails_in_the_caller(client, count):
    with pytest.raises(ValueError, match="count must be a whole number from 1 to 8"):
        client.fork_session(SID, count)


def test_pause_resume_and_fork_of_an_unknown_session_raise_session_not_found(client, sessions):
    for call in (client.pause_session, client.resume_session, client.fork_session):
        with pytest.raises(SessionError, match=f"session_not_found: no session {SID}"):
            call(SID)


def test_cli_session_pause_resume_and_a_paused_exec(daemon, sessions, capsysbinary):
    corral(daemon, "session", "open")
    session_id = capsysbinary.readouterr().out.decode().strip()
    assert corral(daemon, "session", "pause", session_id) == 0
    assert capsysbinary.readouterr() == (b"", b"")
    assert corral(daemon, "exec", session_id, "--", "true") == 125
    assert capsysbinary.readouterr() == (
        b"", f"corral: error session_paused: session {session_id} is paused; resume it first\n".encode())
    assert corral(daemon, "session", "ls") == 0
    assert capsysbinary.readouterr().out.decode().splitlines()[1].split()[4] == "paused"
    assert corral(daemon, "session", "resume", session_id) == 0
    assert corral(daemon, "exec", session_id, "--", "true") == 0


def test_cli_session_fork_prints_each_new_id_alone_on_its_line(daemon, sessions, capsys):
    corral(daemon, "session", "open")
    session_id = capsys.readouterr().out.strip()
    assert corral(daemon, "session", "fork", session_id, "-n", "3") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["s-0000000000000002", "s-0000000000000003", "s-0000000000000004"] and err == ""
    assert corral(daemon, "session", "fork", session_id) == 0
    assert capsys.readouterr().out == "s-0000000000000005\n"
    assert [f.count for f in daemon.of_type(SessionFork)] == [3, 1]


def test_cli_session_pause_resume_fork_errors_exit_125(daemon, sessions, capsys):
    for command in ("pause", "resume", "fork"):
        assert corral(daemon, "session", command, SID) == 125
        assert capsys.readouterr() == ("", f"corral: error session_not_found: no session {SID}\n")


@pytest.mark.parametrize("argv, fragment", [
    (["session", "fork", SID, "-n", "0"], "a fork makes 1 to 8 new sessions, not 0"),
    (["session", "fork", SID, "-n", "9"], "a fork makes 1 to 8 new sessions, not 9"),
    (["session", "fork", SID, "-n", "x"], "invalid"),
    (["session", "pause"], "the following arguments are required: ID"),
    (["session", "resume"], "the following arguments are required: ID"),
])
def test_cli_session_snapshot_commands_check_their_arguments(argv, fragment, capsys):
    assert main(argv + ["--endpoint", "ipc:///nonexistent/x.sock"]) == 2
    assert fragment in capsys.readouterr().err


def test_cli_cp_both_ways(daemon, sessions, capsysbinary, tmp_path):
    corral(daemon, "session", "open")
    session_id = capsysbinary.readouterr().out.decode().strip()
    local = tmp_path / "script.sh"
    local.write_bytes(b"#!/bin/sh\necho hi\n")
    local.chmod(0o750)
    assert corral(daemon, "cp", str(local), f"{session_id}:/tmp/script.sh") == 0
    (put,) = daemon.of_type(TaskRequest)
    assert put.files_in == ((b"/tmp/script.sh", 0o750, b"#!/bin/sh\necho hi\n"),)
    back = tmp_path / "back"
    back.mkdir()
    assert corral(daemon, "cp", f"{session_id}:/tmp/script.sh", str(back)) == 0  # a directory: same name
    assert (back / "script.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert corral(daemon, "cp", f"{session_id}:/tmp/script.sh", str(tmp_path / "renamed")) == 0
    assert (tmp_path / "renamed").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert corral(daemon, "cp", f"{session_id}:/tmp/script.sh", "-") == 0
    assert capsysbinary.readouterr() == (b"#!/bin/sh\necho hi\n", b"")


def test_cli_cp_failures(daemon, sessions, capsysbinary, tmp_path, monkeypatch):
    corral(daemon, "session", "open")
    session_id = capsysbinary.readouterr().out.decode().strip()
    assert corral(daemon, "cp", f"{session_id}:/tmp/none", str(tmp_path / "x")) == 1
    assert capsysbinary.readouterr().err == (f"corral: cannot get /tmp/none from session {session_id}: "
                                             "No such file or directory\n").encode()
    assert not (tmp_path / "x").exists()
    assert corral(daemon, "cp", str(tmp_path / "missing"), f"{session_id}:/tmp/x") == 1
    assert b"cannot read" in capsysbinary.readouterr().err
    (tmp_path / "f").write_bytes(b"x")
    assert corral(daemon, "cp", str(tmp_path / "f"), f"{session_id}:/etc/f") == 125
    assert capsysbinary.readouterr().err == b"corral: error put_failed: /etc/f: Permission denied\n"
    assert corral(daemon, "cp", str(tmp_path / "f"), f"{SID}:/tmp/f") == 125
    assert capsysbinary.readouterr().err == f"corral: error session_not_found: no session {SID}\n".encode()
    assert corral(daemon, "cp", str(tmp_path / "f"), str(tmp_path / "g")) == 2
    assert corral(daemon, "cp", f"{SID}:/a", f"{SID}:/b") == 2
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"piped")))
    assert corral(daemon, "cp", "-", f"{session_id}:/tmp/piped") == 0
    assert sessions.files[session_id][b"/tmp/piped"] == b"piped"


def test_cli_help_names_the_session_commands_and_the_admin_ones(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("session", "exec", "cp"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    words = " ".join(out.split())  # argparse wraps help to the terminal's width
    assert "operators: status, scram, resume, drain, pool-size, sessions, session-close, fault" in words
