"""The guest agent's live output and stdin, without a VM: the real agent loop
(Agent.turn) in a thread, its channel one end of a socketpair whose other end
the test plays as the host, running real commands on this machine (as the
test's own user: the task-user switch is tests/vm's). What reaches a command
in a real guest is tests/vm/test_streams.py's."""

from __future__ import annotations

import time

from protocol.channel import constants, messages
from tests.support.agent_pair import start, stdin


def test_stdin_in_two_chunks_then_eof_reaches_the_command(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"cat"], stdin=b"from the exec, ", stdin_open=True)
    loop = run_loop()
    host.send(stdin(1, b"first, "))
    time.sleep(0.2)  # cat echoes what it has so far: the pipe stays open in between
    host.send(stdin(1, b"second"), stdin(1, b"", eof=True))
    output, exit_ = host.until_exit(1)
    loop.stop()
    assert output[constants.STDOUT] == b"from the exec, first, second"
    assert exit_.exit_code == 0


def test_output_offsets_count_each_stream_from_zero(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"sh", b"-c", b"echo a; echo b >&2; sleep 0.1; echo cc; echo dd >&2"])
    loop = run_loop()
    output, exit_ = host.until_exit(1)  # checks every offset
    loop.stop()
    assert output == {constants.STDOUT: b"a\ncc\n", constants.STDERR: b"b\ndd\n"}


def test_a_command_that_never_reads_stdin_blocks_neither_the_agent_nor_the_host(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"sh", b"-c", b"sleep 1; echo done"], stdin_open=True)
    loop = run_loop()
    started = time.monotonic()
    chunk = b"x" * constants.MAX_STDIN_CHUNK
    host.sock.settimeout(5)
    for _ in range(32):  # 2 MiB, far over any pipe and socket buffer
        host.send(stdin(1, chunk))
    sent_in = time.monotonic() - started
    host.send(messages.Heartbeat(nonce=7))
    assert host.receive() == messages.HeartbeatAck(nonce=7)  # the agent still answers at once
    answered_in = time.monotonic() - started
    output, exit_ = host.until_exit(1)
    loop.stop()
    assert sent_in < 1.0 and answered_in < 1.0, (sent_in, answered_in)
    assert output[constants.STDOUT] == b"done\n" and exit_.exit_code == 0


def test_stdin_keeps_flowing_while_the_host_does_not_read_the_agent(pair):
    """The agent blocked sending output (the host holds its channel) still takes
    the host's frames: the host's stdin never waits on the agent's output."""
    agent, host, run_loop = pair
    start(agent, 1, [b"sh", b"-c", b"head -c 1000000 /dev/zero; cat"], stdin_open=True)
    loop = run_loop()
    time.sleep(0.5)  # the agent fills the socket with zeros and blocks
    data = bytes(range(256)) * 4096  # 1 MiB
    host.sock.settimeout(5)
    for start_at in range(0, len(data), constants.MAX_STDIN_CHUNK):  # would block for ever if unread
        host.send(stdin(1, data[start_at:start_at + constants.MAX_STDIN_CHUNK]))
    host.send(stdin(1, b"", eof=True))
    output, exit_ = host.until_exit(1, timeout=30)
    loop.stop()
    assert output[constants.STDOUT] == bytes(1000000) + data and exit_.exit_code == 0


def test_stdin_for_another_exec_or_after_the_exit_is_ignored_without_an_error(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"cat"], stdin_open=True)
    loop = run_loop()
    host.send(stdin(2, b"not mine"), stdin(1, b"mine"), stdin(1, b"", eof=True), stdin(1, b"after eof"))
    output, exit_ = host.until_exit(1)
    host.send(stdin(1, b"after the exit", eof=True), messages.Heartbeat(nonce=3))
    assert host.receive() == messages.HeartbeatAck(nonce=3)  # no Error before it
    loop.stop()
    assert output[constants.STDOUT] == b"mine"


def test_stdin_without_stdin_open_is_ignored_and_the_pipe_closed_after_exec_stdin(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"cat"], stdin=b"all of it")
    loop = run_loop()
    host.send(stdin(1, b" and more"))
    output, exit_ = host.until_exit(1)
    loop.stop()
    assert output[constants.STDOUT] == b"all of it"


def test_a_command_that_closes_its_stdin_early_gets_no_more_and_the_agent_carries_on(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"sh", b"-c", b"exec 0<&-; sleep 0.5; echo ok"], stdin_open=True)
    loop = run_loop()
    time.sleep(0.2)
    host.send(stdin(1, b"x" * 1000), stdin(1, b"y", eof=True))
    output, exit_ = host.until_exit(1)
    loop.stop()
    assert output[constants.STDOUT] == b"ok\n" and exit_.exit_code == 0
    assert not agent.tasks


def test_stdin_past_max_stdin_is_cut_and_the_command_gets_eof(pair):
    agent, host, run_loop = pair
    start(agent, 1, [b"wc", b"-c"], stdin=b"s" * (constants.MAX_STDIN - 5), stdin_open=True)
    loop = run_loop()
    host.send(stdin(1, b"0123456789"))  # no eof: the bound closes it
    output, exit_ = host.until_exit(1, timeout=30)
    loop.stop()
    assert output[constants.STDOUT].strip() == str(constants.MAX_STDIN).encode()
