"""Time-bounded fuzzing of the two decoders that face untrusted bytes: the
guest frame decoder (protocol.channel.frame) and the caller request path (Intake's
decode + validate, up to the reply it sends). Hypothesis generates and
shrinks; a run is as many batches of fresh random examples as fit in the time.

CI runs each target for a few seconds (tests/unit/test_fuzz.py); a longer run:

    scripts/fuzz --seconds 300           # every target, 300 s each

Properties checked on every example:
  frames   only ProtocolError subclasses escape; the decoder never buffers
           more than a header plus one frame of at most max_payload; what it
           returns is exactly a prefix of the payloads that were framed; after
           an error it stays poisoned.
  requests Intake's request handler never raises, and sends exactly one
           decodable reply to the caller, whatever the frames (none to a
           well-formed StreamAck, which is never answered).
"""

from __future__ import annotations

import itertools
import time
import zlib
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings, strategies as st

from actors.edge.connections import Connection
from protocol.channel import codec
from protocol.channel.errors import DecoderPoisoned, ProtocolError
from protocol.channel.frame import HEADER_SIZE, FrameDecoder, FrameEncoder
from protocol.wire import envelope
from protocol.wire.tasks import (CLIENT_TO_DAEMON, DAEMON_TO_CLIENT, PROTOCOL_TAG, StatusRequest, StreamAck, TaskAttach,
                                 TaskRequest, TaskStdin)

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
    No Scheduler is registered, so an accepted task is answered `unavailable`."""
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
        stream=st.booleans(), stdin_open=st.booleans()),
    st.builds(StatusRequest, request_id=st.text(max_size=8)),
    st.builds(TaskStdin, task_id=st.text(max_size=8), data=st.binary(max_size=8), eof=st.booleans()),
    st.builds(StreamAck, task_id=st.text(max_size=8), stdout_offset=st.integers(0, 2**64 - 1),
              stderr_offset=st.integers(0, 2**64 - 1)),
    st.builds(TaskAttach, task_id=st.text(max_size=8), stdout_offset=st.integers(0, 2**64 - 1),
              stderr_offset=st.integers(0, 2**64 - 1)),
)


def _is_stream_ack(frames: list[bytes]) -> bool:
    """Frames a caller sends that carry a valid StreamAck (never answered)."""
    try:
        payload = envelope.parse(PROTOCOL_TAG, frames)
        return isinstance(codec.decode(payload, CLIENT_TO_DAEMON), StreamAck)
    except (envelope.MalformedEnvelope, ProtocolError):
        return False


def check_request(tally: Tally, server, draw) -> None:
    payload = codec.encode(draw(request_strategy))
    if draw(st.booleans()):
        payload = mutate(payload, draw)
    frames = [b"caller", *envelope.build(PROTOCOL_TAG, payload)]
    if draw(st.integers(0, 4)) == 0:  # sometimes break the envelope too
        frames = [b"caller"] + [mutate(f, draw) for f in frames[1:draw(st.integers(2, 5))]]
    server.guard = guard = RecordingGuard()
    server._request(frames, None, Connection(0, fd=-1))  # must not raise
    if _is_stream_ack(frames[1:]):
        assert guard.sent == [], "a StreamAck was answered"
        tally.examples += 1
        return
    assert len(guard.sent) == 1, f"{len(guard.sent)} replies to one request"
    identity, *frames = guard.sent[0]
    assert identity == b"caller"
    decoded = codec.decode(envelope.parse(PROTOCOL_TAG, frames), DAEMON_TO_CLIENT)
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


TARGETS = {"frames": frame_target, "requests": request_target}


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

    parser = argparse.ArgumentParser(description="Fuzz corral's frame and request decoders.")
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
