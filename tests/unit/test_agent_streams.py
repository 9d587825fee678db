"""The guest agent's live output and stdin, without a VM: the real agent loop
(Agent.turn) in a thread, its channel one end of a socketpair whose other end
the test plays as the host, running real commands on this machine (as the
test's own user: the task-user switch is tests/vm's). What reaches a command
in a real guest is tests/vm/test_streams.py's."""

from __future__ import annotations

import socket
import threading
import time
import zlib

import pytest

from guest import agent as guest_agent
from protocol.channel import codec, constants, messages
from protocol.channel.frame import FrameDecoder, FrameEncoder

ENV = {b"PATH": b"/usr/bin:/bin", b"LANG": b"C.UTF-8"}


class Host:
    """The host end of the agent's channel."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.encoder = FrameEncoder(zlib.crc32)
        self.decoder = FrameDecoder(zlib.crc32)
        self.pending: list = []

    def send(self, *said) -> None:
        self.sock.sendall(b"".join(self.encoder.encode(codec.encode(m)) for m in said))

    def receive(self, timeout: float = 10.0):
        self.sock.settimeout(timeout)
        while not self.pending:
            data = self.sock.recv(1 << 20)
            assert data, "the agent closed its end"
            self.pending += [codec.decode(p, messages.GUEST_TO_HOST) for p in self.decoder.feed(data)]
        return self.pending.pop(0)

    def until_exit(self, exec_id: int, timeout: float = 10.0) -> tuple[dict[int, bytes], messages.Exit]:
        """The command's output per stream (each chunk checked to start where its
        stream ended) and its Exit."""
        output = {constants.STDOUT: b"", constants.STDERR: b""}
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.1, deadline - time.monotonic()))
            assert message.exec_id == exec_id, message
            if isinstance(message, messages.Exit):
                return output, message
            assert isinstance(message, messages.Output), message
            assert message.offset == len(output[message.stream]), "a chunk out of order"
            output[message.stream] += message.data


class AgentLoop:
    """The agent's loop, turning in its own thread until stopped."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                self.agent.turn(max_wait_s=0.05)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def pair():
    agent_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    agent = guest_agent.Agent.__new__(guest_agent.Agent)  # no __init__: it prepares a real guest
    agent.channel, agent.tasks, agent.resumable, agent.put_error = guest_agent.Channel(agent_end.fileno()), {}, False, ""
    agent.next_reap = time.monotonic() + guest_agent.REAP_INTERVAL_S
    loops = []

    def run_loop():
        loops.append(AgentLoop(agent))
        return loops[-1]

    yield agent, Host(host_end), run_loop
    for loop in loops:
        loop.stopped.set()
        loop.thread.join(10)
    for task in agent.tasks.values():
        task.kill()
        task.close()
    agent_end.close()
    host_end.close()


def start(agent, exec_id: int, argv: list[bytes], stdin: bytes = b"", stdin_open: bool = False,
          output_cap: int = 1 << 24, timeout_ms: int = 30_000) -> messages.Exec:
    """What Agent.start does for an Exec, without the task user: spawn as ourselves."""
    request = messages.Exec(exec_id=exec_id, argv=tuple(argv), env=tuple(ENV.items()), cwd=b"/", stdin=stdin,
                            timeout_ms=timeout_ms, output_cap=output_cap, as_root=True, capabilities=0,
                            stdin_open=stdin_open)
    pid, stdin_fd, stdout_fd, stderr_fd = guest_agent.spawn(list(argv), ENV, b"/", None)
    agent.tasks[exec_id] = guest_agent.Task(agent, request, time.monotonic(), pid, stdin_fd, stdout_fd, stderr_fd)
    return request


def stdin(exec_id: int, data: bytes, eof: bool = False) -> messages.Stdin:
    return messages.Stdin(exec_id=exec_id, data=data, eof=eof)


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
