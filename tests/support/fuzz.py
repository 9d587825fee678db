"""Time-bounded fuzzing of what faces untrusted bytes: the guest frame decoder
(protocol.channel.frame), the caller request path (Intake's decode +
validate, up to the reply it sends), and a Supervisor taking a command's
output from a guest (chunks, offsets, exec ids, the Exit). Hypothesis
generates and shrinks; a run is as many batches of fresh random examples as
fit in the time.

CI runs each target for a few seconds (tests/unit/test_fuzz.py); a longer run:

    scripts/fuzz --seconds 300           # every target, 300 s each

Properties checked on every example:
  frames   only ProtocolError subclasses escape; the decoder never buffers
           more than a header plus one frame of at most max_payload; what it
           returns is exactly a prefix of the payloads that were framed; after
           an error it stays poisoned.
  requests Intake's request handler never raises, and sends exactly one
           decodable reply to the caller, whatever the frames (none to a
           well-formed StreamAck, which is never answered); a well-formed
           session open, close or list gets a SessionReply with its id.
  guest_output
           a real Supervisor (its libvirt, timers and neighbours stand-ins)
           running a task, streaming or not, fed a command's Output chunks
           and Exit with offsets, exec ids, order and what follows the Exit
           mutated, or their encoded bytes mutated: it never raises, answers
           the task exactly once, forwards a streaming task's chunks in order
           from offset 0 within the output cap and before the answer. With
           only the messages mutated, the answer and the end of the VM are
           exactly the channel rules' (docs/protocol.md): a chunk out of
           order or for another exec is output_out_of_order or wrong_exec
           before the Exit; anything after the Exit (output_after_exit for
           its chunks) ends the VM without a second answer. Beside it, a
           Stdin (the host's stdin for a running command) with its bytes
           mutated, through the agent's decoder: a protocol error or a
           message within its bounds that re-encodes to the same bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import zlib
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings, strategies as st

from actors.edge.connections import Connection
from protocol.channel import codec, messages as guest
from protocol.channel.errors import DecoderPoisoned, ProtocolError
from protocol.channel.frame import HEADER_SIZE, FrameDecoder, FrameEncoder
from protocol.wire import envelope
from protocol.wire.tasks import (CLIENT_TO_DAEMON, DAEMON_TO_CLIENT, PROTOCOL_TAG, SessionClose, SessionList,
                                 SessionOpen, SessionReply, StatusRequest, StreamAck, TaskAttach, TaskRequest,
                                 TaskStdin)

MAX_PAYLOAD = 512  # small, so oversize lengths are common
BATCH = settings(max_examples=50, deadline=None, database=None, derandomize=False,
                 suppress_health_check=list(HealthCheck))


@dataclass
class Tally:
    examples: int = 0
    errors_seen: int = 0  # examples that ended in a (correctly raised) protocol error


# --- mutations shared by both targets -----------------------------------------

def mutate(data: bytes, draw) -> bytes:
    """A few random edits: flip, overwrite, insert, delete, truncate."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


def chunks(stream: bytes, draw) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]


# --- target 1: the frame decoder ---------------------------------------------------

def check_frames(tally: Tally, payloads: list[bytes], draw) -> None:
    encoder = FrameEncoder(zlib.crc32)
    stream = b"".join(encoder.encode(p) for p in payloads)
    if draw(st.booleans()):
        stream = mutate(stream, draw)
    decoder = FrameDecoder(zlib.crc32, max_payload=MAX_PAYLOAD)
    got: list[bytes] = []
    failed = False
    for chunk in chunks(stream, draw):
        try:
            got += decoder.feed(chunk)
        except ProtocolError:
            failed = True
            break
        assert decoder.buffered <= HEADER_SIZE + MAX_PAYLOAD
    if failed:
        tally.errors_seen += 1
        try:
            decoder.feed(b"\0")
            raise AssertionError("a failed decoder accepted more bytes")
        except DecoderPoisoned:
            pass
    else:
        try:
            decoder.eof()
        except ProtocolError:
            tally.errors_seen += 1
    # Whatever came out is exactly the framed payloads, in order, from the first.
    assert got == payloads[:len(got)], "decoder returned a payload that was never framed"
    tally.examples += 1


def frame_target(tally: Tally):
    @BATCH
    @given(st.lists(st.binary(max_size=MAX_PAYLOAD + 64), max_size=8), st.data())
    def run(payloads, data):
        check_frames(tally, payloads, data.draw)
    return run


# --- target 2: the caller request path (Intake) -----------------------------------

class RecordingGuard:
    """Stands in for the server's ConnectionGuard: every answer is recorded as
    sent over the one fuzzing connection."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send(self, conn, frames) -> bool:
        self.sent.append(list(frames))
        return True


def make_server():
    """An IntakeServer whose thread never runs: _request is called directly.
    No Scheduler or Sessions actor is registered, so an accepted task, exec or
    session request is answered `unavailable`."""
    from actors.directory import Directory
    from actors.edge.intake_server import IntakeServer, TaskLimits
    from actors.edge.metrics import Metrics

    limits = TaskLimits(default_timeout_ms=60_000, max_timeout_ms=3_600_000,
                        default_output_cap=1 << 20, max_output_cap=16 << 20, max_request_bytes=1 << 20)
    return IntakeServer("inproc://fuzz", limits, Metrics(), Directory())


CAPABILITIES = [b"base:execute", b"dev:python", b"dev:gpu", b"net:egress", b"bogus", b"\xff"]
request_strategy = st.one_of(
    st.builds(
        TaskRequest,
        task_id=st.text(max_size=8),
        priority=st.integers(0, 3),
        argv=st.lists(st.binary(max_size=6), min_size=1, max_size=3).map(tuple),
        env=st.lists(st.tuples(st.binary(max_size=4), st.binary(max_size=4)), max_size=2).map(tuple),
        cwd=st.sampled_from([b"", b"/", b"/tmp", b"rel", b"/a\0b"]),
        stdin=st.binary(max_size=8),
        timeout_ms=st.sampled_from([0, 1, 60_000, 3_600_001, 0xFFFFFFFF]),
        output_cap=st.sampled_from([0, 1, 1 << 20, (16 << 20) + 1]),
        capabilities=st.lists(st.sampled_from(CAPABILITIES), max_size=3).map(tuple),
        stream=st.booleans(), stdin_open=st.booleans(),
        session_id=st.sampled_from(["", "", "s-0123456789abcdef", "x"])),
    st.builds(SessionOpen, request_id=st.text(max_size=8),
              capabilities=st.lists(st.sampled_from(CAPABILITIES), max_size=3).map(tuple),
              idle_s=st.sampled_from([0, 1, 3600, 0xFFFFFFFF]), max_life_s=st.sampled_from([0, 60, 0xFFFFFFFF]),
              labels=st.lists(st.tuples(st.sampled_from([b"", b"k", b"a=b", b"k\n"]),
                                        st.sampled_from([b"", b"v", b"v\0"])), max_size=2).map(tuple),
              egress_allow=st.lists(st.sampled_from([b"pypi.org", b"*.x.org", b"10.0.0.0/8:443", b"bad rule"]),
                                    max_size=2).map(tuple)),
    st.builds(SessionClose, request_id=st.text(max_size=8), session_id=st.text(max_size=20)),
    st.builds(SessionList, request_id=st.text(max_size=8)),
    st.builds(StatusRequest, request_id=st.text(max_size=8)),
    st.builds(TaskStdin, task_id=st.text(max_size=8), data=st.binary(max_size=8), eof=st.booleans()),
    st.builds(StreamAck, task_id=st.text(max_size=8), stdout_offset=st.integers(0, 2**64 - 1),
              stderr_offset=st.integers(0, 2**64 - 1)),
    st.builds(TaskAttach, task_id=st.text(max_size=8), stdout_offset=st.integers(0, 2**64 - 1),
              stderr_offset=st.integers(0, 2**64 - 1)),
)


def _decoded(frames: list[bytes]):
    """The request these frames carry, or None if they carry none."""
    try:
        return codec.decode(envelope.parse(PROTOCOL_TAG, frames), CLIENT_TO_DAEMON)
    except (envelope.MalformedEnvelope, ProtocolError):
        return None


def _is_stream_ack(frames: list[bytes]) -> bool:
    """Frames a caller sends that carry a valid StreamAck (never answered)."""
    return isinstance(_decoded(frames), StreamAck)


def check_request(tally: Tally, server, draw) -> None:
    payload = codec.encode(draw(request_strategy))
    if draw(st.booleans()):
        payload = mutate(payload, draw)
    frames = [b"caller", *envelope.build(PROTOCOL_TAG, payload)]
    if draw(st.integers(0, 4)) == 0:  # sometimes break the envelope too
        frames = [b"caller"] + [mutate(f, draw) for f in frames[1:draw(st.integers(2, 5))]]
    server.guard = guard = RecordingGuard()
    sent = _decoded(frames[1:])
    server._request(frames, None, Connection(0, fd=-1))  # must not raise
    if _is_stream_ack(frames[1:]):
        assert guard.sent == [], "a StreamAck was answered"
        tally.examples += 1
        return
    assert len(guard.sent) == 1, f"{len(guard.sent)} replies to one request"
    identity, *frames = guard.sent[0]
    assert identity == b"caller"
    decoded = codec.decode(envelope.parse(PROTOCOL_TAG, frames), DAEMON_TO_CLIENT)
    if isinstance(sent, (SessionOpen, SessionClose, SessionList)):
        assert isinstance(decoded, SessionReply) and decoded.request_id == sent.request_id, decoded
    if getattr(decoded, "error_code", ""):
        tally.errors_seen += 1
    assert server.unanswered() == 0 and not server.in_flight and not server.streams
    tally.examples += 1


def request_target(tally: Tally):
    server = make_server()

    @BATCH
    @given(st.data())
    def run(data):
        check_request(tally, server, data.draw)
    return run


# --- target 3: a Supervisor taking a command's output -------------------------------

class Told:
    """Stands in for a neighbour actor (Intake, IOGuard, the pool...): records what it is told."""

    def __init__(self) -> None:
        self.seen: list = []

    def tell(self, message) -> None:
        self.seen.append(message)


class StandIn:
    """Libvirt, timers, the VM's run control and its channel: whatever is asked, done; what is sent, kept."""

    def __init__(self) -> None:
        self.sent: list = []

    def send(self, message) -> None:
        self.sent.append(message)

    def __getattr__(self, name):  # pause, resume, close, set_cpu, call_later, destroy...
        return lambda *args, **kwargs: None


VM = "fuzz-vm"
EXEC_OUTPUT_CAPS = [0, 1, 5, 64]
KINDS = ("wrong_exec", "output_out_of_order", "output_after_exit", "unexpected_message")


@st.composite
def command_output(draw):
    """An honest command's chunks and Exit (exec id 0 here: the runner puts the
    real one in), then some of its messages mutated."""
    said, sent = [], {1: 0, 2: 0}
    for stream, data in draw(st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=24)),
                                      max_size=6)):
        said.append(guest.Output(exec_id=0, stream=stream, offset=sent[stream], data=data))
        sent[stream] += len(data)
    said.append(guest.Exit(exec_id=0, exit_code=draw(st.integers(0, 3)), signal=0, timed_out=False,
                           stdout_truncated=False, stderr_truncated=False, wall_ms=1, user_cpu_ms=0, sys_cpu_ms=0,
                           max_rss_kib=0))
    for _ in range(draw(st.integers(0, 2))):
        if not said:
            break
        op = draw(st.sampled_from(["offset", "exec", "swap", "repeat", "drop", "late", "cut"]))
        at = draw(st.integers(0, len(said) - 1))
        message = said[at]
        if op == "offset" and isinstance(message, guest.Output):
            said[at] = codec.replace(message, offset=draw(st.integers(0, 40)))
        elif op == "exec":
            said[at] = codec.replace(message, exec_id=draw(st.sampled_from([1, 2, 0xFFFFFFFF])))
        elif op == "swap" and at + 1 < len(said):
            said[at], said[at + 1] = said[at + 1], said[at]
        elif op == "repeat":
            said.insert(at, message)
        elif op == "drop" and len(said) > 1:
            del said[at]
        elif op == "late":  # a chunk after everything, where its stream would go on
            stream = draw(st.sampled_from([1, 2]))
            said.append(guest.Output(exec_id=0, stream=stream, offset=sent[stream], data=b"late"))
        elif op == "cut":
            del said[at:]
    return said


def rules(said: list, exec_id: int, cap: int) -> tuple[str, bool, dict, dict]:
    """What the channel rules say of `said`, which holds an Exit: (violation
    kind or "", whether the task is answered with it, the output within the
    cap per stream, the bytes received per stream)."""
    received, kept = {1: 0, 2: 0}, {1: b"", 2: b""}
    for index, message in enumerate(said):
        if message.exec_id != exec_id:
            return "wrong_exec", True, kept, received
        if isinstance(message, guest.Exit):
            after = said[index + 1:]
            if not after:
                return "", False, kept, received
            late = isinstance(after[0], guest.Output) and after[0].exec_id == exec_id
            return ("output_after_exit" if late else "unexpected_message"), False, kept, received
        if message.offset != received[message.stream]:
            return "output_out_of_order", True, kept, received
        kept[message.stream] += message.data[:max(0, cap - received[message.stream])]
        received[message.stream] += len(message.data)
    raise AssertionError("no Exit")


def run_supervisor(metrics, said: list, stream: bool, cap: int, mutate_bytes,
                   draw) -> tuple[list, int, Told, Told, str]:
    """A Supervisor with a task running; feed it `said`. What it was fed (with
    the real exec id, and an Exit where none was), the exec id, what Intake and
    the pool were told, and the violation IOGuard found in the bytes."""
    from actors.directory import Directory
    from actors.messages import ChannelFailed, GuestSaid, RunTask, Task
    from actors.supervisor import Supervisor, VmSettings
    from protocol.channel.errors import ProtocolError
    from protocol.wire.tasks import TaskRequest

    directory = Directory()
    intake, pool = Told(), Told()
    for name, ref in (("intake", intake), ("pool", pool), ("ioguard", Told()), ("scheduler", Told())):
        directory[name] = ref
    link = StandIn()
    settings = VmSettings(boot_timeout_s=10, acquire_timeout_s=10, reset_timeout_s=10, deadman_grace_s=5,
                          max_uses=10, max_age_s=300, strict=False)
    supervisor = Supervisor(VM, directory=directory, hypervisor=StandIn(), refill=StandIn(), timers=StandIn(),
                            metrics=metrics, settings=settings)
    supervisor.link, supervisor.run_control = link, StandIn()  # what on_start would connect
    supervisor.on_receive(GuestSaid(VM, guest.Hello(agent_version="f", boot_id="b", kernel="k")))
    request = TaskRequest(task_id="f", priority=2, argv=(b"cmd",), env=(), cwd=b"", stdin=b"", timeout_ms=60_000,
                          output_cap=cap, capabilities=(), stream=stream)
    supervisor.on_receive(RunTask(Task(1, request, time.monotonic()), time.monotonic()))
    supervisor.on_receive(GuestSaid(VM, guest.HeartbeatAck(nonce=link.sent[-1].nonce)))
    exec_id = link.sent[-1].exec_id
    said = [codec.replace(m, exec_id=exec_id if m.exec_id == 0 else m.exec_id) for m in said]
    if not any(isinstance(m, guest.Exit) for m in said):  # a command ends
        said.append(guest.Exit(exec_id=exec_id, exit_code=0, signal=0, timed_out=False, stdout_truncated=False,
                               stderr_truncated=False, wall_ms=1, user_cpu_ms=0, sys_cpu_ms=0, max_rss_kib=0))
    found = ""
    for message in said:
        if mutate_bytes:  # through the decoder, as IOGuard does
            payload = codec.encode(message)
            if draw(st.integers(0, 3)) == 0:
                payload = mutate(payload, draw)
            try:
                message = codec.decode(payload, guest.GUEST_TO_HOST)
            except ProtocolError as e:
                found = e.code
                supervisor.on_receive(ChannelFailed(VM, code=e.code, detail=str(e), violation=True))
                break
        supervisor.on_receive(GuestSaid(VM, message))
    return said, exec_id, intake, pool, found


def check_stdin(draw) -> None:
    from protocol.channel.constants import MAX_STDIN_CHUNK
    from protocol.channel.errors import ProtocolError

    data = draw(st.sampled_from([b"", b"x", b"y" * MAX_STDIN_CHUNK]))
    payload = mutate(codec.encode(guest.Stdin(exec_id=draw(st.integers(0, 3)), data=data, eof=draw(st.booleans()))),
                     draw)
    try:
        message = codec.decode(payload, guest.HOST_TO_GUEST)
    except ProtocolError:
        return
    assert codec.encode(message) == payload
    if isinstance(message, guest.Stdin):
        assert len(message.data) <= MAX_STDIN_CHUNK


def check_output(tally: Tally, metrics, draw) -> None:
    from actors.messages import Answer, OutputChunk, PoolVmState

    check_stdin(draw)

    stream, cap, mutate_bytes = draw(st.booleans()), draw(st.sampled_from(EXEC_OUTPUT_CAPS)), draw(st.booleans())
    counted = {kind: metrics.violations.labels(kind)._value.get() for kind in KINDS}
    said, exec_id, intake, pool, found = run_supervisor(metrics, draw(command_output()), stream, cap, mutate_bytes,
                                                        draw)
    answers = [m for m in intake.seen if isinstance(m, Answer)]
    assert len(answers) == 1, f"{len(answers)} answers"
    reply = answers[0].reply
    chunks = [m for m in intake.seen if isinstance(m, OutputChunk)]
    assert all(intake.seen.index(c) < intake.seen.index(answers[0]) for c in chunks), "a chunk after the answer"
    forwarded = {1: b"", 2: b""}
    for chunk in chunks:
        assert chunk.offset == len(forwarded[chunk.stream]), "chunks forwarded out of order"
        forwarded[chunk.stream] += chunk.data
    assert all(len(data) <= cap for data in forwarded.values())
    assert not chunks or stream
    gone = [m for m in pool.seen if m.state == PoolVmState.GONE]
    if not mutate_bytes:
        kind, answered_with_it, kept, received = rules(said, exec_id, cap)
        found = kind
        if answered_with_it:
            assert reply.error_code == "protocol_violation" and kind in reply.error_message, reply
        else:
            assert reply.error_code == "", reply
            assert (reply.stdout, reply.stderr) == ((b"", b"") if stream else (kept[1], kept[2]))
            assert (reply.stdout_truncated, reply.stderr_truncated) == (received[1] > cap, received[2] > cap)
        if stream:
            assert forwarded == kept
        assert bool(gone) == bool(kind), (kind, gone)
        assert {k: metrics.violations.labels(k)._value.get() - n for k, n in counted.items()} == {
            k: int(k == kind) for k in KINDS}, f"not counted as {kind or 'no violation'}"
    if found:
        tally.errors_seen += 1
    tally.examples += 1


@contextlib.contextmanager
def quiet_supervisor():
    """Each violation is a warning in corrald's log; thousands here are noise."""
    logger = logging.getLogger("corral.supervisor")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def output_target(tally: Tally):
    from actors.edge.metrics import Metrics

    metrics = Metrics()

    @BATCH
    @given(st.data())
    def run(data):
        with quiet_supervisor():
            check_output(tally, metrics, data.draw)
    return run


TARGETS = {"frames": frame_target, "requests": request_target, "guest_output": output_target}


def fuzz(name: str, seconds: float) -> tuple[Tally, float]:
    """Run target `name` in fresh random batches until `seconds` have passed."""
    tally = Tally()
    run = TARGETS[name](tally)
    started = time.monotonic()
    for _ in itertools.count():
        run()
        if time.monotonic() - started >= seconds:
            break
    return tally, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Fuzz corral's frame and request decoders and a "
                                                 "Supervisor's handling of a command's output.")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; known: {', '.join(TARGETS)}")
    for name in args.targets or list(TARGETS):
        tally, took = fuzz(name, args.seconds)
        print(f"{name}: {tally.examples} examples in {took:.0f} s ({tally.examples / took:.0f}/s), "
              f"{tally.errors_seen} ended in a protocol error or refusal, 0 property failures", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
