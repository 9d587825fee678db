"""The guest agent without a VM: its real loop (Agent.turn) in a thread, its
channel one end of a socketpair whose other end the test plays as the host
(Host), and commands started as Agent.start would, but as the test's own
user. The `pair` fixture (tests/unit/conftest.py) sets it up."""

from __future__ import annotations

import socket
import threading
import time
import zlib
from contextlib import contextmanager

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


@contextmanager
def agent_pair():
    """(an Agent on one end of a socketpair, the Host on the other, a function
    that starts the agent's loop in a thread); loops stopped and commands
    killed at the end."""
    agent_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    agent = guest_agent.Agent.__new__(guest_agent.Agent)  # no __init__: it prepares a real guest
    agent.channel, agent.tasks, agent.put_error = guest_agent.Channel(agent_end.fileno()), {}, ""
    agent.relay_pid, agent.executed = None, False  # no egress relay (no net:egress VM)
    agent.next_reap = time.monotonic() + guest_agent.REAP_INTERVAL_S
    loops = []

    def run_loop():
        loops.append(AgentLoop(agent))
        return loops[-1]

    try:
        yield agent, Host(host_end), run_loop
    finally:
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
