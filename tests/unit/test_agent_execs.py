"""The guest agent running several execs at once (a session's VM), without a
VM: the real agent loop on a socketpair as in test_agent_streams.py, real
commands spawned as the test's own user. Each exec has its own output, stdin,
timeout and Exit; a Reset ends them all. What a real guest does is
tests/vm/test_session_vm.py's."""

from __future__ import annotations

import pwd
import time

from guest import agent as guest_agent
from protocol.channel import constants, messages
from tests.support.agent_pair import Host, start, stdin


def until_exits(host: Host, exec_ids: set[int], timeout: float = 10.0) -> tuple[dict, dict, list[int]]:
    """Each exec's output per stream (every chunk checked to start where its
    stream ended), its one Exit, and the order the Exits came in."""
    output = {i: {constants.STDOUT: b"", constants.STDERR: b""} for i in exec_ids}
    exits: dict[int, messages.Exit] = {}
    order: list[int] = []
    deadline = time.monotonic() + timeout
    while len(exits) < len(exec_ids):
        message = host.receive(max(0.1, deadline - time.monotonic()))
        assert message.exec_id in exec_ids and message.exec_id not in exits, message
        if isinstance(message, messages.Exit):
            exits[message.exec_id] = message
            order.append(message.exec_id)
            continue
        assert isinstance(message, messages.Output), message
        stream = output[message.exec_id][message.stream]
        assert message.offset == len(stream), "a chunk out of order"
        output[message.exec_id][message.stream] += message.data
    return output, exits, order


def test_two_execs_run_at_once_and_each_gets_its_own_output_and_exit(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"sh", b"-c", b"sleep 0.5; echo one; echo e1 >&2; exit 3"])
    start(agent, 2, [b"sh", b"-c", b"echo two"])
    loop = run_loop()
    output, exits, order = until_exits(host, {1, 2})
    loop.stop()
    assert order == [2, 1]  # the short one did not wait for the long one
    assert output[1] == {constants.STDOUT: b"one\n", constants.STDERR: b"e1\n"}
    assert output[2] == {constants.STDOUT: b"two\n", constants.STDERR: b""}
    assert (exits[1].exit_code, exits[2].exit_code) == (3, 0)
    assert not agent.tasks


def test_an_exec_past_its_timeout_is_killed_and_the_other_runs_on(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"sleep", b"30"], timeout_ms=300)
    start(agent, 2, [b"sh", b"-c", b"sleep 1.5; echo alive"])
    loop = run_loop()
    started = time.monotonic()
    output, exits, order = until_exits(host, {1, 2})
    loop.stop()
    assert order == [1, 2]
    assert exits[1].timed_out and exits[1].signal == 9
    assert not exits[2].timed_out and exits[2].exit_code == 0 and output[2][constants.STDOUT] == b"alive\n"
    assert time.monotonic() - started < 5


def test_stdin_goes_to_the_exec_it_names(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"cat"], stdin_open=True)
    start(agent, 2, [b"cat"], stdin_open=True)
    loop = run_loop()
    host.send(stdin(2, b"for two"), stdin(1, b"for one"), stdin(3, b"for nobody"),
              stdin(1, b"", eof=True), stdin(2, b"", eof=True))
    output, exits, _ = until_exits(host, {1, 2})
    loop.stop()
    assert output[1][constants.STDOUT] == b"for one" and output[2][constants.STDOUT] == b"for two"


def test_an_exec_with_the_id_of_a_running_one_is_refused_naming_it(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"sh", b"-c", b"sleep 0.5; echo first"])
    loop = run_loop()
    host.send(messages.Exec(exec_id=1, argv=(b"true",), env=(), cwd=b"", stdin=b"", timeout_ms=1000,
                            output_cap=100, as_root=False, capabilities=0))
    refusal = host.receive()
    assert isinstance(refusal, messages.Error) and (refusal.code, refusal.exec_id) == ("busy", 1)
    output, exits, _ = until_exits(host, {1})
    loop.stop()
    assert output[1][constants.STDOUT] == b"first\n"  # the running one is untouched


def test_a_reset_kills_every_running_exec_and_their_exits_come_before_its_answer(pair, tmp_path, monkeypatch):
    agent, host, run_loop = pair
    # The wipe after the kill is the real guest's (tests/vm): here an account
    # that owns no process, and nothing to sweep.
    home = tmp_path / "home"
    agent.task_account = pwd.struct_passwd(("task", "x", 65531, 65531, "", str(home), "/bin/sh"))
    monkeypatch.setattr(agent, "sweep_overlay", lambda: [], raising=False)
    monkeypatch.setattr(guest_agent, "WIPE_DIRS", ())
    monkeypatch.setattr(guest_agent, "sysv_ipc_in_use", lambda: False)
    monkeypatch.setattr(guest_agent, "task_has_keys", lambda uid: False)
    start(agent, 1, [b"sleep", b"30"])
    start(agent, 2, [b"sh", b"-c", b"echo started; sleep 30"])
    loop = run_loop()
    assert host.receive() == messages.Output(exec_id=2, stream=constants.STDOUT, offset=0, data=b"started\n")
    host.send(messages.Reset(reset_id=9))
    exits = [host.receive(), host.receive()]
    done = host.receive()
    loop.stop()
    assert sorted(e.exec_id for e in exits) == [1, 2] and all(e.signal == 9 for e in exits)
    assert done == messages.ResetDone(reset_id=9, ok=True, detail="")
    assert not agent.tasks
