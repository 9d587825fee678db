"""Resume, the first exchange with a VM restored from a snapshot, without a VM:
the host's GuestLink.resume against a scripted guest on a socketpair, and the
agent's own Channel and Resume handling on another (its clock and CRNG calls
replaced: they would set this host's clock). What the real agent does with
the clock is tests/vm/test_resume.py's."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time
import zlib

import pytest

from actors.messages import Watch
from actors.vm.errors import GuestTimeout
from actors.vm.guest_link import GuestLink
from guest import agent as guest_agent
from protocol.channel import codec, constants, messages
from protocol.channel.errors import MalformedPayload, SequenceError, UnexpectedMessage
from protocol.channel.frame import FrameDecoder, FrameEncoder
from tests.support.agent_pair import Host, start, stdin

# A restored clone continues the template's sequences: its Hello was guest frame 0.
RESTORED_GUEST_SEQ = 1


class ScriptedGuest:
    """The guest end of a socketpair: reads host frames and answers as scripted."""

    def __init__(self, sock: socket.socket, guest_seq: int = RESTORED_GUEST_SEQ, host_seq: int = 0):
        self.sock = sock
        self.encoder = FrameEncoder(zlib.crc32, first_seq=guest_seq)
        self.decoder = FrameDecoder(zlib.crc32, first_seq=host_seq)
        self.received: list = []
        self.seqs: list[int] = []  # the sequence id each received host frame carried
        self.taken = 0  # of received, returned by receive()

    def receive(self, timeout: float = 2.0):
        """The next host message (one frame per read: the host sends and waits)."""
        self.sock.settimeout(timeout)
        while self.taken == len(self.received):
            seq = self.decoder.expected_seq
            data = self.sock.recv(65536)
            assert data, "host closed the channel"
            for payload in self.decoder.feed(data):
                self.seqs.append(seq)
                seq = (seq + 1) & 0xFFFFFFFF
                self.received.append(codec.decode(payload, messages.HOST_TO_GUEST))
        self.taken += 1
        return self.received[self.taken - 1]

    def send(self, message) -> None:
        self.sock.sendall(self.encoder.encode(codec.encode(message)))

    def accept_resume(self, step_ns: int = 42) -> messages.Resume:
        """What an honest agent does: rebase both ways, answer on the new base."""
        resume = self.receive()
        assert isinstance(resume, messages.Resume)
        self.decoder.rebase(resume.host_seq)
        self.encoder.rebase(resume.guest_seq)
        self.send(messages.ResumeDone(clock_step_ns=step_ns))
        return resume


@pytest.fixture
def restored():
    """A GuestLink as a Supervisor builds it for a restored clone, and its guest."""
    host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = GuestLink("unused.sock", guest_first_seq=RESTORED_GUEST_SEQ)
    link.sock = host_end
    guest = ScriptedGuest(guest_end)
    yield link, guest
    link.close()
    guest_end.close()


def in_thread(target) -> threading.Thread:
    result: dict = {}

    def run():
        try:
            result["value"] = target()
        except BaseException as e:  # surfaced by join_result
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.result = result
    thread.start()
    return thread


def join_result(thread: threading.Thread):
    thread.join(5)
    assert not thread.is_alive()
    if "error" in thread.result:
        raise thread.result["error"]
    return thread.result.get("value")


def soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


# --- the host end -----------------------------------------------------------------

def test_resume_sends_time_entropy_and_new_bases_then_both_sides_count_from_them(restored):
    link, guest = restored
    peer = in_thread(guest.accept_resume)
    before = time.time_ns()
    done = link.resume(soon())
    after = time.time_ns()
    resume = join_result(peer)
    assert done == messages.ResumeDone(clock_step_ns=42)
    assert guest.seqs == [0]  # the host's first frame on a restored clone
    assert before <= resume.time_ns <= after
    assert len(resume.entropy) == constants.RESUME_ENTROPY_LEN
    # Host -> guest: the next host frame carries host_seq, and the guest (rebased) takes it.
    assert link.encoder.next_seq == resume.host_seq
    link.send(messages.Heartbeat(nonce=7))
    assert guest.receive() == messages.Heartbeat(nonce=7)
    assert guest.seqs[-1] == resume.host_seq
    # Guest -> host: ResumeDone carried guest_seq; the next guest frame guest_seq + 1.
    assert link.decoder.expected_seq == (resume.guest_seq + 1) & 0xFFFFFFFF
    guest.send(messages.HeartbeatAck(nonce=7))
    assert link.receive(frozenset({messages.HeartbeatAck}), soon()) == messages.HeartbeatAck(nonce=7)


def test_a_guest_frame_with_the_pre_rebase_sequence_is_refused_after_resume(restored):
    link, guest = restored
    peer = in_thread(guest.accept_resume)
    link.resume(soon())
    resume = join_result(peer)
    stale = FrameEncoder(zlib.crc32, first_seq=RESTORED_GUEST_SEQ)  # the count without the rebase
    guest.sock.sendall(stale.encode(codec.encode(messages.HeartbeatAck(nonce=1))))
    with pytest.raises(SequenceError) as info:
        link.receive(frozenset({messages.HeartbeatAck}), soon())
    assert (info.value.expected, info.value.got) == ((resume.guest_seq + 1) & 0xFFFFFFFF, RESTORED_GUEST_SEQ)


def test_a_resume_done_on_the_old_sequence_is_refused(restored):
    link, guest = restored

    def answer_without_rebasing():
        guest.receive()
        guest.send(messages.ResumeDone(clock_step_ns=0))  # carries sequence 1

    peer = in_thread(answer_without_rebasing)
    with pytest.raises(SequenceError):
        link.resume(soon())
    join_result(peer)


def test_a_guest_that_spoke_first_fails_the_resume(restored):
    link, guest = restored
    guest.send(messages.HeartbeatAck(nonce=1))  # unasked, on the old base: read after the rebase
    peer = in_thread(guest.accept_resume)
    with pytest.raises(SequenceError):
        link.resume(soon())
    join_result(peer)


def test_a_guest_message_already_read_before_the_resume_fails_it_at_once(restored):
    link, guest = restored
    link.pending.append(messages.HeartbeatAck(nonce=1))
    with pytest.raises(UnexpectedMessage, match="before the Resume"):
        link.resume(soon())


def test_a_refusal_is_read_as_the_guest_error(restored):
    link, guest = restored

    def refuse():
        resume = guest.receive()
        guest.decoder.rebase(resume.host_seq)
        guest.encoder.rebase(resume.guest_seq)
        guest.send(messages.Error(code="resume_refused", message="too late"))

    peer = in_thread(refuse)
    with pytest.raises(UnexpectedMessage, match="resume_refused: too late"):
        link.resume(soon())
    join_result(peer)


def test_any_other_answer_to_a_resume_is_refused(restored):
    link, guest = restored

    def answer_hello():
        resume = guest.receive()
        guest.encoder.rebase(resume.guest_seq)
        guest.send(messages.Hello(agent_version="0", boot_id="b", kernel="k"))

    peer = in_thread(answer_hello)
    with pytest.raises(UnexpectedMessage, match="guest sent Hello"):
        link.resume(soon())
    join_result(peer)


def test_a_silent_guest_times_out_at_the_deadline(restored):
    link, _ = restored
    started = time.monotonic()
    with pytest.raises(GuestTimeout):
        link.resume(started + 0.3)
    assert 0.25 < time.monotonic() - started < 2


def test_each_resume_draws_new_bases_and_entropy():
    drawn = []
    for _ in range(3):
        host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with host_end, guest_end:
            link = GuestLink("unused.sock", guest_first_seq=RESTORED_GUEST_SEQ)
            link.sock = host_end
            guest = ScriptedGuest(guest_end)
            peer = in_thread(guest.accept_resume)
            link.resume(soon())
            resume = join_result(peer)
            drawn.append((resume.host_seq, resume.guest_seq, resume.entropy))
    for column in zip(*drawn):
        assert len(set(column)) == 3  # 32 random bits (256 for the entropy): equal only by a fluke


def test_link_first_sequences_are_the_constructors():
    host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with host_end, guest_end:
        link = GuestLink("unused.sock", guest_first_seq=7, host_first_seq=0xFFFFFFFF)
        link.sock = host_end
        guest = ScriptedGuest(guest_end, guest_seq=7, host_seq=0xFFFFFFFF)
        link.send(messages.Heartbeat(nonce=1))
        link.send(messages.Heartbeat(nonce=2))
        assert [guest.receive(), guest.receive()] == [messages.Heartbeat(1), messages.Heartbeat(2)]
        assert guest.seqs == [0xFFFFFFFF, 0]
        guest.send(messages.HeartbeatAck(nonce=1))
        assert link.receive(frozenset({messages.HeartbeatAck}), soon()).nonce == 1
    with pytest.raises(ValueError):
        GuestLink("unused.sock", guest_first_seq=1 << 32)


def test_watch_carries_a_checked_first_sequence():
    assert Watch("vm", None, None).first_seq == 0
    assert Watch("vm", None, None, first_seq=0xFFFFFFFF).first_seq == 0xFFFFFFFF
    for bad in (-1, 1 << 32, "1"):
        with pytest.raises(ValueError):
            Watch("vm", None, None, first_seq=bad)


# --- the agent end --------------------------------------------------------------------

class HostSide:
    """The host end of the agent's channel socketpair."""

    def __init__(self, sock: socket.socket, host_seq: int = 0, guest_seq: int = RESTORED_GUEST_SEQ):
        self.sock = sock
        self.encoder = FrameEncoder(zlib.crc32, first_seq=host_seq)
        self.decoder = FrameDecoder(zlib.crc32, first_seq=guest_seq)

    def frame(self, message) -> bytes:
        return self.encoder.encode(codec.encode(message))

    def receive(self):
        self.sock.settimeout(2)
        while True:
            payloads = self.decoder.feed(self.sock.recv(65536))
            if payloads:
                (payload,) = payloads
                return codec.decode(payload, messages.GUEST_TO_HOST)


@pytest.fixture
def agent_pair(monkeypatch):
    """An agent as restored (Hello was its frame 0), its clock and CRNG calls recorded."""
    agent_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = guest_agent.Channel(agent_end.fileno())
    channel.encoder.rebase(RESTORED_GUEST_SEQ)
    agent = guest_agent.Agent.__new__(guest_agent.Agent)  # no __init__: it prepares a real guest
    agent.channel, agent.tasks, agent.put_error = channel, {}, ""
    agent.relay_pid, agent.executed = None, False
    calls = []

    def reseed_and_set_clock(entropy, time_ns):
        calls.append((entropy, time_ns))
        return -5

    monkeypatch.setattr(agent, "reseed_and_set_clock", reseed_and_set_clock)
    host = HostSide(host_end)
    yield agent, host, calls
    agent_end.close()
    host_end.close()


def resume_message(host_seq: int = 1000, guest_seq: int = 2000) -> messages.Resume:
    return messages.Resume(time_ns=123, entropy=bytes(range(32)), host_seq=host_seq, guest_seq=guest_seq)


def deliver(agent, host, *frames: bytes) -> None:
    host.sock.sendall(b"".join(frames))
    for message in agent.channel.read():
        agent.handle(message)


def test_agent_answers_a_resume_on_the_new_base_and_expects_the_host_on_its_base(agent_pair):
    agent, host, calls = agent_pair
    deliver(agent, host, host.frame(resume_message()))
    assert calls == [(bytes(range(32)), 123)]
    host.decoder.rebase(2000)
    assert host.receive() == messages.ResumeDone(clock_step_ns=-5)
    host.encoder.rebase(1000)
    deliver(agent, host, host.frame(messages.Heartbeat(nonce=3)))
    assert host.receive() == messages.HeartbeatAck(nonce=3)
    assert host.decoder.expected_seq == 2002


def test_agent_takes_a_second_resume_while_still_idle(agent_pair):
    agent, host, calls = agent_pair
    deliver(agent, host, host.frame(messages.Heartbeat(nonce=1)))
    assert host.receive() == messages.HeartbeatAck(nonce=1)
    for n, (host_seq, guest_seq) in enumerate([(10, 20), (0xFFFFFFFF, 5)]):
        deliver(agent, host, host.frame(resume_message(host_seq, guest_seq)))
        host.decoder.rebase(guest_seq)
        assert host.receive() == messages.ResumeDone(clock_step_ns=-5)
        host.encoder.rebase(host_seq)
    assert len(calls) == 2


def test_agent_takes_a_resume_after_any_message_that_started_no_exec(agent_pair):
    agent, host, calls = agent_pair
    deliver(agent, host, host.frame(messages.Error(code="x", message="any work-like message")))
    assert host.receive().code == "unexpected"
    deliver(agent, host, host.frame(resume_message()))
    host.decoder.rebase(2000)
    assert host.receive() == messages.ResumeDone(clock_step_ns=-5)
    assert len(calls) == 1


def resume_on(host: Host, host_seq: int, guest_seq: int):
    """Send a Resume from the agent_pair Host, both of its directions rebased as
    the agent does; the agent's answer."""
    host.send(resume_message(host_seq, guest_seq))
    host.encoder.rebase(host_seq)
    host.decoder.rebase(guest_seq)
    return host.receive()


def test_agent_takes_a_resume_after_an_exec_finished(pair, monkeypatch):
    """A session's VM is saved between its execs: its clones hear a Resume after work."""
    agent, host, run_loop = pair
    calls = []
    monkeypatch.setattr(agent, "reseed_and_set_clock", lambda entropy, time_ns: calls.append(time_ns) or 7)
    start(agent, 1, [b"sh", b"-c", b"echo done"])
    loop = run_loop()
    output, exit_message = host.until_exit(1)
    assert output[constants.STDOUT] == b"done\n" and exit_message.exit_code == 0
    assert resume_on(host, 500, 600) == messages.ResumeDone(clock_step_ns=7)
    assert calls == [123]
    host.send(messages.Heartbeat(nonce=9))  # both directions go on from the new bases
    assert host.receive() == messages.HeartbeatAck(nonce=9)
    loop.stop()


def test_agent_refuses_a_resume_while_an_exec_runs_and_the_exec_goes_on(pair, monkeypatch):
    agent, host, run_loop = pair
    calls = []
    monkeypatch.setattr(agent, "reseed_and_set_clock", lambda entropy, time_ns: calls.append(time_ns) or 7)
    start(agent, 1, [b"sh", b"-c", b"read line; echo got $line"], stdin_open=True)
    loop = run_loop()
    refusal = resume_on(host, 500, 600)  # the refusal comes on the new base: the host reads why
    assert isinstance(refusal, messages.Error) and refusal.code == "resume_refused"
    assert calls == []  # neither clock nor CRNG touched
    host.send(stdin(1, b"more\n", eof=True))
    output, exit_message = host.until_exit(1)
    assert output[constants.STDOUT] == b"got more\n" and exit_message.exit_code == 0
    loop.stop()


def test_agent_answers_an_error_when_the_kernel_refuses(agent_pair, monkeypatch):
    agent, host, _ = agent_pair

    def refused(entropy, time_ns):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(agent, "reseed_and_set_clock", refused)
    monkeypatch.setattr(guest_agent, "log", lambda message: None)  # no /dev/kmsg here
    deliver(agent, host, host.frame(resume_message()))
    host.decoder.rebase(2000)
    error = host.receive()
    assert isinstance(error, messages.Error) and error.code == "resume_failed"
    assert "not permitted" in error.message


@pytest.mark.parametrize("after", ["next frame", "part of a header"])
def test_agent_refuses_host_bytes_after_a_resume_before_its_answer(agent_pair, after):
    agent, host, calls = agent_pair
    resume = host.frame(resume_message())
    following = host.frame(messages.Heartbeat(nonce=1))  # on the old count: decodes, then is refused
    host.sock.sendall(resume + (following if after == "next frame" else following[:5]))
    with pytest.raises(UnexpectedMessage, match="after a Resume"):
        agent.channel.read()
    assert calls == []


def test_agent_treats_a_host_frame_on_the_old_count_after_resume_as_a_violation(agent_pair):
    agent, host, _ = agent_pair
    deliver(agent, host, host.frame(resume_message()))
    with pytest.raises(SequenceError):  # main() powers the VM off on any ProtocolError
        deliver(agent, host, host.frame(messages.Heartbeat(nonce=1)))  # host forgot to rebase


def test_agent_refuses_a_malformed_resume_as_a_protocol_error(agent_pair):
    agent, host, calls = agent_pair
    payload = codec.encode(resume_message())
    short = payload[:9] + (31).to_bytes(4, "big") + payload[13:44] + payload[45:]  # 31 bytes of entropy
    host.sock.sendall(host.encoder.encode(short))
    with pytest.raises(MalformedPayload, match="Resume.entropy"):
        agent.channel.read()
    assert calls == []


def test_a_resume_after_an_exec_restarts_the_egress_relay_and_one_before_any_keeps_it(pair, monkeypatch):
    """A session's VM restored: its relay's streams and frame sequences were
    the old proxy's, so the agent kills it and starts a new one before it
    answers (the new proxy connects after the answer). A refill clone's relay
    (no Exec before its template was saved) carried nothing and is kept."""
    agent, host, run_loop = pair
    monkeypatch.setattr(agent, "reseed_and_set_clock", lambda entropy, time_ns: 7)
    # Agent.start as the pair starts commands (as this test's user, not the task user's).
    monkeypatch.setattr(agent, "start", lambda request: start(agent, request.exec_id, list(request.argv)))
    relay = subprocess.Popen(["sleep", "60"])  # stands for the running relay
    agent.relay_pid = relay.pid
    started = []
    monkeypatch.setattr(guest_agent, "start_egress_relay", lambda: started.append(1) or 4242)
    waited = []  # the new relay listens before the answer: the next exec may come at once
    monkeypatch.setattr(guest_agent, "relay_listening", lambda deadline: waited.append(started[:]) or True)
    loop = run_loop()
    assert resume_on(host, 10, 20) == messages.ResumeDone(clock_step_ns=7)
    assert (agent.relay_pid, started, relay.poll()) == (relay.pid, [], None)  # no Exec yet: kept
    host.send(messages.Exec(exec_id=1, argv=(b"true",), env=(), cwd=b"/", stdin=b"", timeout_ms=10_000,
                            output_cap=1024, as_root=False, capabilities=0))
    assert host.until_exit(1)[1].exit_code == 0
    assert resume_on(host, 30, 40) == messages.ResumeDone(clock_step_ns=7)
    assert started == [1] and agent.relay_pid == 4242 and waited == [[1]]
    with pytest.raises(ProcessLookupError):  # killed and reaped by the agent before it answered
        os.kill(relay.pid, 0)
    loop.stop()


def test_relay_listening_sees_a_listener_on_the_proxy_address_without_connecting(monkeypatch):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    monkeypatch.setattr(guest_agent.egress, "PROXY_PORT", listener.getsockname()[1])
    assert not guest_agent.relay_listening(time.monotonic() + 0.05)  # bound, not listening
    listener.listen(1)
    listener.setblocking(False)
    assert guest_agent.relay_listening(time.monotonic() + 5)
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody connected to find out
    listener.close()
