"""IOGuard against real unix socketpairs and a real actor: ordered delivery,
byte and frame rate limits with backpressure (the host stops reading, the
guest's writer blocks), no deadlock on frames larger than the bucket, every
violation reported once and nothing after it, and the Supervisor still able to
write on the socket IOGuard reads."""

from __future__ import annotations

import os
import select
import socket
import statistics
import threading
import time
import tracemalloc
import zlib

import pykka
import pytest

from actors.ioguard import IOGuard, ReadLimits, TokenBucket
from actors.messages import ChannelFailed, ChannelHold, ChildFailed, GuestSaid, InjectFault, Unwatch, Watch
from protocol.channel import codec, constants, messages
from protocol.channel.errors import (BadMagic, CrcMismatch, FrameTooLarge, SequenceError, StalledFrame,
                             TruncatedFrame, UnexpectedMessage, UnknownMessageType)
from protocol.channel.frame import HEADER, HEADER_SIZE, MAGIC, FrameEncoder

KiB = 1024
MiB = 1024 * KiB


# --- TokenBucket -----------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_starts_full_and_refills_up_to_capacity():
    clock = FakeClock()
    bucket = TokenBucket(100, 50, clock=clock)
    assert bucket.tokens == 100
    bucket.consume(80)
    assert bucket.tokens == 20
    clock.now += 1.0
    assert bucket.tokens == 70
    clock.now += 10.0
    assert bucket.tokens == 100  # capped
    assert bucket.seconds_until_positive() == 0


def test_bucket_overdraw_goes_into_debt_that_is_waited_off():
    clock = FakeClock()
    bucket = TokenBucket(100, 50, clock=clock)
    bucket.consume(250)  # a read larger than the whole bucket still goes through
    assert bucket.tokens == -150
    assert bucket.seconds_until_positive() == pytest.approx(3.0)
    clock.now += 2.0
    assert bucket.tokens == pytest.approx(-50)
    assert bucket.seconds_until_positive() == pytest.approx(1.0)
    clock.now += 1.5
    assert bucket.tokens == pytest.approx(25)
    assert bucket.seconds_until_positive() == 0


def test_bucket_edge_cases():
    clock = FakeClock()
    bucket = TokenBucket(10, 10, clock=clock)
    bucket.consume(10)
    assert bucket.tokens == 0
    assert 0 < bucket.seconds_until_positive() < 0.01  # empty is not ready
    clock.now -= 5  # a clock stepping back adds nothing
    assert bucket.tokens == 0
    dry = TokenBucket(10, 0, clock=clock)
    dry.consume(11)
    assert dry.seconds_until_positive() == float("inf")
    with pytest.raises(ValueError):
        TokenBucket(0, 1)
    with pytest.raises(ValueError):
        TokenBucket(1, -1)


# --- harness ---------------------------------------------------------------------

class Box:
    """Thread-safe record of what the fake Supervisor was told, with arrival times."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.items: list[tuple[float, object]] = []

    def put(self, message) -> None:
        with self.cond:
            self.items.append((time.monotonic(), message))
            self.cond.notify_all()

    @property
    def messages(self) -> list:
        with self.cond:
            return [m for _, m in self.items]

    def said(self) -> list:
        return [m.message for m in self.messages if isinstance(m, GuestSaid)]

    def failures(self) -> list:
        return [m for m in self.messages if isinstance(m, ChannelFailed)]

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate([m for _, m in self.items]), timeout)


class Recorder(pykka.ThreadingActor):
    """The fake Supervisor: a real actor that records every message it is told."""

    def __init__(self, box: Box) -> None:
        super().__init__()
        self.box = box

    def on_receive(self, message) -> None:
        self.box.put(message)


class Guest:
    """The guest end of one channel socketpair."""

    def __init__(self) -> None:
        self.host, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.encoder = FrameEncoder(zlib.crc32)

    def frame(self, message) -> bytes:
        return self.encoder.encode(codec.encode(message))

    def send(self, *msgs) -> None:
        self.sock.sendall(b"".join(self.frame(m) for m in msgs))

    def close(self) -> None:
        self.sock.close()
        self.host.close()


class Writer:
    """Pushes frames from `make_frame()` into the guest socket as fast as the host
    takes them, in its own thread, until stopped (never blocks for long)."""

    def __init__(self, guest: Guest, make_frame) -> None:
        self.guest = guest
        self.make_frame = make_frame
        self.stop_event = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sock = self.guest.sock
        pending = memoryview(b"")
        while not self.stop_event.is_set():
            if not pending:
                pending = memoryview(self.make_frame())
            _, writable, _ = select.select([], [sock], [], 0.05)
            if not writable:
                continue
            try:
                n = sock.send(pending, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                return
            self.sent += n
            pending = pending[n:]

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)


HELLO = messages.Hello(agent_version="0.1", boot_id="b", kernel="k")


def ack(n: int) -> messages.HeartbeatAck:
    return messages.HeartbeatAck(nonce=n)


def output(data: bytes, exec_id: int = 1) -> messages.Output:
    return messages.Output(exec_id=exec_id, stream=constants.STDOUT, offset=0, data=data)


@pytest.fixture
def world():
    """Starts IOGuards, fake Supervisors and channels; stops and closes them all."""
    made = {"guests": [], "writers": []}

    class World:
        def guard(self, directory=None, **limits):
            return IOGuard.start(limits=ReadLimits(**limits), directory=directory)

        def channel(self):
            guest = Guest()
            made["guests"].append(guest)
            return guest

        def supervisor(self):
            box = Box()
            return box, Recorder.start(box)

        def watch(self, guard, vm_id, guest):
            """A channel watched by `guard`, reported to a fresh fake Supervisor."""
            box, ref = self.supervisor()
            guard.ask(Watch(vm_id, guest.host, ref))  # ask: queued for the I/O thread on return
            return box

        def writer(self, guest, make_frame):
            writer = Writer(guest, make_frame)
            made["writers"].append(writer)
            return writer

    yield World()
    for writer in made["writers"]:
        writer.stop()
    pykka.ActorRegistry.stop_all()
    for guest in made["guests"]:
        guest.close()


def stats_for(guard, vm_id):
    """One watched VM's counters, None if not watched."""
    return guard.proxy().stats().get(timeout=5)["vms"].get(vm_id)


def quiet(seconds: float = 0.3) -> None:
    """Give IOGuard time to (wrongly) deliver something."""
    time.sleep(seconds)


# --- delivery ----------------------------------------------------------------------

def test_frames_arrive_in_order(world):
    guard = world.guard()
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    sent = [HELLO] + [output(b"x" * i) for i in range(50)] + [
        messages.Exit(exec_id=1, exit_code=0, signal=0, timed_out=False, stdout_truncated=False,
                      stderr_truncated=False, wall_ms=1, user_cpu_ms=0, sys_cpu_ms=0, max_rss_kib=1),
        ack(7)]
    guest.send(*sent)
    assert box.wait_for(lambda ms: len(ms) >= len(sent))
    assert box.said() == sent
    assert all(m.vm_id == "vm1" for m in box.messages)
    stats = stats_for(guard, "vm1")
    assert stats["frames_read"] == len(sent)
    assert stats["bytes_read"] == sum(len(guest.encoder.encode(codec.encode(m))) for m in sent)
    total = guard.proxy().stats().get(timeout=5)["total"]
    assert total["frames_read"] == len(sent) and total["watched"] == 1


def test_frame_larger_than_the_bucket_is_delivered_then_its_debt_is_waited_off(world):
    guard = world.guard(burst_bytes=4 * KiB, rate_bytes_per_s=64 * KiB)
    guest = world.channel()
    t0 = time.monotonic()
    box = world.watch(guard, "vm1", guest)
    big = output(os.urandom(64 * KiB))
    guest.send(big, ack(1))
    assert box.wait_for(lambda ms: len(ms) >= 2, timeout=5), "a frame over the bucket deadlocked"
    (_, first), (t_ack, second) = box.items
    assert first.message == big and second.message == ack(1)
    # The small frame is read only once the ~61 KiB of debt the big one left
    # (65.5 KiB read, 4 KiB bucket) is paid off at 64 KiB/s: about 0.96 s.
    assert t_ack - t0 > 0.85
    stats = stats_for(guard, "vm1")
    assert stats["stalls"] >= 1 and stats["throttled_s"] > 0.6


def test_byte_rate_is_bounded_by_the_bucket(world):
    capacity, rate = 64 * KiB, 512 * KiB
    guard = world.guard(burst_bytes=capacity, rate_bytes_per_s=rate)
    guest = world.channel()
    chunk = os.urandom(16 * KiB)
    writer = world.writer(guest, lambda: guest.frame(output(chunk)))
    t0 = time.monotonic()
    box = world.watch(guard, "vm1", guest)
    time.sleep(3.0)
    stats = stats_for(guard, "vm1")
    elapsed = time.monotonic() - t0
    expected = capacity + rate * elapsed
    assert 0.85 * expected <= stats["bytes_read"] <= 1.15 * expected, (stats, expected)
    assert stats["stalls"] > 0 and stats["throttled_s"] > 0
    assert writer.sent > stats["bytes_read"]  # the guest wanted to send more
    delivered = sum(len(m.data) for m in box.said())
    assert delivered <= stats["bytes_read"]


def test_backpressure_the_host_stops_reading_and_burns_no_cpu(world):
    guard = world.guard(burst_bytes=4 * KiB, rate_bytes_per_s=2 * KiB)
    guest = world.channel()
    world.watch(guard, "vm1", guest)
    stream = memoryview(b"".join(guest.frame(output(b"y" * 8 * KiB)) for _ in range(256)))  # 2 MiB
    sent, blocked = 0, False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sent < len(stream):
        try:
            sent += guest.sock.send(stream[sent:sent + 64 * KiB], socket.MSG_DONTWAIT)
        except BlockingIOError:
            blocked = True
            break
    assert blocked, f"the guest could send {sent} bytes without blocking: the host kept reading"
    # The guest may fill its buffer before the I/O thread even ran (or took the
    # Watch): wait for the pause.
    deadline = time.monotonic() + 2
    while not (stats_for(guard, "vm1") or {}).get("throttled") and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = stats_for(guard, "vm1")
    assert stats["throttled"] and stats["stalls"] >= 1
    assert stats["bytes_read"] < sent - 64 * KiB  # the rest sits in the socket, unread
    # Throttled means idle: no busy loop while the bucket refills.
    cpu0 = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu0 < 0.2
    with pytest.raises(BlockingIOError):
        guest.sock.send(stream[sent:sent + 64 * KiB], socket.MSG_DONTWAIT)


def test_a_flood_of_tiny_frames_is_bounded(world):
    burst, per_s = 10, 100
    guard = world.guard(frames_per_s=per_s, frames_burst=burst)
    guest = world.channel()
    nonces = iter(range(1, 10**9))
    world.writer(guest, lambda: guest.frame(ack(next(nonces))))
    t0 = time.monotonic()
    box = world.watch(guard, "vm1", guest)
    time.sleep(2.0)
    elapsed = time.monotonic() - t0
    delivered = len(box.said())
    expected = burst + per_s * elapsed
    assert 0.85 * expected <= delivered <= expected + 2, (delivered, expected)
    assert box.said() == [ack(n) for n in range(1, delivered + 1)]
    assert stats_for(guard, "vm1")["stalls"] > 0


def test_a_throttled_vm_does_not_slow_an_unthrottled_one(world):
    guard = world.guard(burst_bytes=16 * KiB, rate_bytes_per_s=64 * KiB)
    noisy, calm = world.channel(), world.channel()
    world.writer(noisy, lambda: noisy.frame(output(b"z" * 16 * KiB)))
    noisy_box = world.watch(guard, "noisy", noisy)
    calm_box = world.watch(guard, "calm", calm)
    sent_at = {}
    for n in range(1, 61):  # ~1.2 s of a heartbeat every 20 ms
        sent_at[n] = time.monotonic()
        calm.send(ack(n))
        time.sleep(0.02)
    assert calm_box.wait_for(lambda ms: len(ms) >= 60, timeout=5)
    assert calm_box.said() == [ack(n) for n in range(1, 61)]
    latencies = [t - sent_at[m.message.nonce] for t, m in calm_box.items]
    assert statistics.median(latencies) < 0.05 and max(latencies) < 0.5, latencies
    assert stats_for(guard, "noisy")["stalls"] > 0
    assert stats_for(guard, "calm")["stalls"] == 0
    assert noisy_box.said()  # the noisy VM is slowed, not starved


# --- stalled frames and the cap on partial frames ----------------------------------------

class Counter(pykka.ThreadingActor):
    """A fake Supervisor that keeps no payloads: "frame" for each message, and failures."""

    def __init__(self, box: Box) -> None:
        super().__init__()
        self.box = box

    def on_receive(self, message) -> None:
        self.box.put("frame" if isinstance(message, GuestSaid) else message)


def declared(guest, length: int) -> bytes:
    """The header of an Output frame declaring `length` payload bytes (CRC of nothing real)."""
    return HEADER.pack(MAGIC, length, 0, guest.encoder.next_seq)


def failed_at(box: Box) -> float:
    [(at, failure)] = [(t, m) for t, m in box.items if isinstance(m, ChannelFailed)]
    assert failure.code == StalledFrame.code and failure.violation, failure
    return at


def test_a_frame_that_stops_is_a_violation_at_its_deadline_holding_only_what_arrived(world):
    # Declares 1 MiB, sends 10 bytes, stops: allowed 0.5 s + 1 MiB at 1 MiB/s.
    guard = world.guard(frame_stall_s=0.5, rate_bytes_per_s=1 * MiB)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    tracemalloc.start()
    try:
        started = time.monotonic()
        guest.sock.sendall(declared(guest, 1 * MiB) + b"0123456789")
        deadline = time.monotonic() + 1
        while (stats_for(guard, "vm1") or {}).get("partial_held") != 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = stats_for(guard, "vm1")
        assert (stats["partial_held"], stats["partial_bytes"]) == (10, 1 * MiB)  # admitted, not allocated
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 256 * KiB  # never the 1 MiB the header declares
        assert box.wait_for(lambda ms: ms, timeout=5)
    finally:
        tracemalloc.stop()
    after = failed_at(box) - started
    assert 1.4 < after < 2.5, after  # at its deadline, not at any task timeout
    assert "10 of 1048576 payload bytes" in box.failures()[0].detail
    assert stats_for(guard, "vm1") is None
    total = guard.proxy().stats().get(timeout=5)["total"]
    assert (total["violations"], total["partial_bytes"], total["partial_held"]) == (1, 0, 0)
    print(f"FIGURE stalled 1 MiB frame (10 bytes sent) ended {after:.2f} s after its first byte "
          f"(deadline 0.5 s + 1 MiB at 1 MiB/s)")


def test_half_a_header_that_stops_is_a_violation_after_the_base_time(world):
    guard = world.guard(frame_stall_s=0.5)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    started = time.monotonic()
    guest.sock.sendall(declared(guest, 100)[:7])
    assert box.wait_for(lambda ms: ms, timeout=5)
    after = failed_at(box) - started
    assert 0.45 < after < 1.5, after
    assert "7 of 16 header bytes" in box.failures()[0].detail


def test_a_trickle_is_a_violation_although_bytes_keep_coming(world):
    guard = world.guard(frame_stall_s=0.5, rate_bytes_per_s=64 * KiB)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    started = time.monotonic()
    guest.sock.sendall(declared(guest, 64 * KiB))  # allowed 0.5 s + 1 s
    while not box.failures() and time.monotonic() - started < 5:
        guest.sock.sendall(b"x" * 100)  # 100 bytes every 50 ms: 2 KiB/s
        time.sleep(0.05)
    after = failed_at(box) - started
    assert 1.4 < after < 2.5, after


def test_frames_at_the_guaranteed_rate_are_never_stalled(world):
    # A guest that paces a frame at the rate IOGuard guarantees is within its time.
    guard = world.guard(frame_stall_s=0.5, rate_bytes_per_s=64 * KiB, burst_bytes=16 * KiB)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    frame = guest.frame(output(os.urandom(60 * KiB)))
    for at in range(0, len(frame), 4 * KiB):
        guest.sock.sendall(frame[at:at + 4 * KiB])
        time.sleep(4 / 64)  # 64 KiB/s
    assert box.wait_for(lambda ms: ms, timeout=5)
    assert box.said() and not box.failures()


def test_time_the_host_throttles_a_frame_is_not_the_guests(world):
    # 96 KiB frame, 32 KiB/s, 4 KiB bucket, 0.3 s base: allowed 3.3 s of reading.
    # The host reads 64 KiB, then pays ~1.9 s of debt without reading: that
    # time is added, so the rest sent at 4 s (past 3.3 s of wall time) is in time.
    guard = world.guard(frame_stall_s=0.3, rate_bytes_per_s=32 * KiB, burst_bytes=4 * KiB)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    big = output(os.urandom(96 * KiB))
    frame = guest.frame(big)
    started = time.monotonic()
    guest.sock.sendall(frame[:HEADER_SIZE + 64 * KiB])
    time.sleep(4.0 - (time.monotonic() - started))
    guest.sock.sendall(frame[HEADER_SIZE + 64 * KiB:])
    assert box.wait_for(lambda ms: ms, timeout=5)
    assert box.said() == [big] and not box.failures()
    assert stats_for(guard, "vm1")["throttled_s"] > 1.5


@pytest.mark.parametrize("reason", ["paused", "reader"])
def test_a_vm_the_host_holds_is_not_stalled_until_it_is_released(world, reason):
    # paused: a SCRAM paused the VM; reader: a streaming task's caller is behind.
    guard = world.guard(frame_stall_s=0.3, rate_bytes_per_s=1 * MiB)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    guest.sock.sendall(declared(guest, 1000) + b"abc")  # allowed ~0.3 s
    guard.tell(ChannelHold("vm1", held=True, reason=reason))
    quiet(1.0)
    assert not box.messages
    released = time.monotonic()
    guard.tell(ChannelHold("vm1", held=False, reason=reason))
    assert box.wait_for(lambda ms: ms, timeout=5)
    assert 0.1 < failed_at(box) - released < 1.0


def hold(guard, vm_id: str, reason: str, held: bool = True) -> None:
    """Tell a ChannelHold and wait until the I/O thread took it."""
    guard.tell(ChannelHold(vm_id, held=held, reason=reason))
    deadline = time.monotonic() + 5
    while (reason in (stats_for(guard, vm_id) or {"held_by": ()})["held_by"]) != held:  # None: Watch not yet taken
        assert time.monotonic() < deadline, f"hold {reason} {held} not taken"
        time.sleep(0.005)


def wait_throttled(guard, vm_id: str) -> None:
    deadline = time.monotonic() + 5
    while not (stats_for(guard, vm_id) or {}).get("throttled"):  # None: Watch not yet taken
        assert time.monotonic() < deadline, "never throttled"
        time.sleep(0.01)


def fill(guest: Guest, message) -> int:
    """Send frames of `message` until the guest's socket would block; the
    whole frames sent (a part of one may be in the socket too)."""
    frames, pending = 0, memoryview(b"")
    while True:
        if not pending:
            pending = memoryview(guest.frame(message))
        try:
            n = guest.sock.send(pending, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return frames
        pending = pending[n:]
        frames += not pending


@pytest.mark.parametrize("reason", ["reader", "paused"])
def test_a_held_channel_is_not_read_and_its_guest_blocks_until_the_hold_ends(world, reason):
    guard = world.guard()
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    guest.send(output(b"before"))
    assert box.wait_for(lambda ms: len(ms) == 1)
    hold(guard, "vm1", reason)
    chunk = output(b"z" * 4 * KiB)
    frames = fill(guest, chunk)  # the guest's writer would block now
    quiet(0.5)
    assert box.said() == [output(b"before")]
    hold(guard, "vm1", reason, held=False)
    assert box.wait_for(lambda ms: len(ms) == 1 + frames)
    assert box.said()[1:] == [chunk] * frames and not box.failures()


def test_reading_resumes_only_when_no_reason_holds(world):
    guard = world.guard()
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    hold(guard, "vm1", "paused")
    hold(guard, "vm1", "reader")
    assert stats_for(guard, "vm1")["held_by"] == ["paused", "reader"]
    guest.send(ack(1))
    hold(guard, "vm1", "reader", held=False)
    quiet(0.5)
    assert not box.messages  # still paused
    hold(guard, "vm1", "reader")
    hold(guard, "vm1", "paused", held=False)
    quiet(0.5)
    assert not box.messages  # still held for the reader
    hold(guard, "vm1", "reader", held=False)
    assert box.wait_for(lambda ms: ms) and box.said() == [ack(1)]


def test_a_hold_on_a_throttled_channel_outlasts_the_refill(world):
    """Empty buckets and a host hold are separate reasons: the bucket's refill
    does not resume a channel the host still holds."""
    guard = world.guard(burst_bytes=4 * KiB, rate_bytes_per_s=16 * KiB)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    fill(guest, output(b"y" * 8 * KiB))
    wait_throttled(guard, "vm1")
    hold(guard, "vm1", "reader")
    read = stats_for(guard, "vm1")["bytes_read"]
    quiet(1.5)  # the 8 KiB debt is paid off in 0.5 s
    assert stats_for(guard, "vm1")["bytes_read"] == read
    hold(guard, "vm1", "reader", held=False)
    assert box.wait_for(lambda ms: stats_for(guard, "vm1")["bytes_read"] > read)
    assert not box.failures()


def test_a_release_of_a_hold_not_held_and_unknown_reasons_change_nothing(world):
    guard = world.guard(burst_bytes=4 * KiB, rate_bytes_per_s=4 * KiB)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    guard.tell(ChannelHold("vm1", held=False, reason="reader"))  # never held: no second registration
    guard.tell(ChannelHold("vm1", held=True, reason="bogus"))
    guest.send(ack(1))
    assert box.wait_for(lambda ms: ms) and box.said() == [ack(1)]
    # IOGuard's own reasons cannot be released from outside: a throttled channel stays so.
    fill(guest, output(b"y" * 8 * KiB))
    wait_throttled(guard, "vm1")
    guard.tell(ChannelHold("vm1", held=False, reason="tokens"))
    quiet(0.3)
    stats = stats_for(guard, "vm1")
    assert stats["throttled"] and stats["held_by"] == [] and not box.failures()


def test_partial_frames_across_many_channels_stay_under_the_global_cap(world):
    # 24 guests each send 3 frames of 1 MiB as fast as they can; at most 3 MiB
    # of frames in progress may be admitted at once: the others wait, unread.
    cap = 3 * MiB
    guard = world.guard(rate_bytes_per_s=8 * MiB, burst_bytes=256 * KiB, max_partial_bytes=cap)
    payload = b"m" * (1 * MiB)
    boxes, go = [], threading.Event()

    def send(guest, stream):
        go.wait()
        guest.sock.sendall(stream)

    for n in range(24):
        guest = world.channel()
        box = Box()
        boxes.append(box)
        guard.ask(Watch(f"vm{n}", guest.host, Counter.start(box)))
        stream = b"".join(guest.frame(output(payload)) for _ in range(3))
        threading.Thread(target=send, args=(guest, stream), daemon=True).start()
    go.set()
    for box in boxes:
        assert box.wait_for(lambda ms: len(ms) >= 3, timeout=60), "a channel waited for ever"
    assert all(box.messages == ["frame"] * 3 for box in boxes)
    total = guard.proxy().stats().get(timeout=5)["total"]
    # Admitted and held at once: never over the cap (24 MiB were on their way).
    assert total["held_peak"] <= total["partial_peak"] <= cap
    assert total["held_peak"] > 1 * MiB  # frames were in progress side by side
    assert total["room_waits"] > 0 and total["partial_bytes"] == total["partial_held"] == 0
    assert total["waiting_for_room"] == 0
    print(f"FIGURE 24 channels x 3 frames of 1 MiB under a 3 MiB cap: at most "
          f"{total['held_peak'] / MiB:.2f} MiB held in partial frames, {total['room_waits']} waits for room")


def test_a_frame_waiting_for_room_is_not_stalled_by_the_wait(world):
    # vm1's admitted frame stalls and takes all the room until its deadline;
    # vm2's frame (complete in its socket) waits longer than its own deadline,
    # but its clock starts only when it is admitted: it is delivered, not ended.
    guard = world.guard(frame_stall_s=0.3, rate_bytes_per_s=1 * MiB,
                        max_payload=64 * KiB, max_partial_bytes=64 * KiB)
    stuck, waiting = world.channel(), world.channel()
    stuck_box = world.watch(guard, "vm1", stuck)
    stuck.sock.sendall(declared(stuck, 64 * KiB) + b"x")
    deadline = time.monotonic() + 1
    while (stats_for(guard, "vm1") or {}).get("partial_bytes") != 64 * KiB and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting_box = world.watch(guard, "vm2", waiting)
    big = output(os.urandom(60 * KiB))
    waiting.send(big)
    quiet(0.2)
    assert stats_for(guard, "vm2")["waiting_for_room"]
    assert stuck_box.wait_for(lambda ms: ms, timeout=5)
    failed_at(stuck_box)
    assert waiting_box.wait_for(lambda ms: ms, timeout=5)
    assert waiting_box.said() == [big] and not waiting_box.failures()


# --- violations and channel ends -------------------------------------------------------

def _bad_magic(guest):
    payload = codec.encode(ack(2))
    return HEADER.pack(0xBADC0FFE, len(payload), zlib.crc32(payload), 1) + payload


def _crc_mismatch(guest):
    frame = bytearray(guest.frame(ack(2)))
    frame[-1] ^= 0x80
    return bytes(frame)


def _too_large(guest):
    return HEADER.pack(MAGIC, 0xFFFFFFF0, 0, 1)  # declares ~4 GiB: must not be allocated


def _host_only_message(guest):
    return guest.frame(messages.Reset(reset_id=1))


def _unknown_type(guest):
    return guest.encoder.encode(b"\xfe")


def _sequence_gap(guest):
    return FrameEncoder(zlib.crc32, first_seq=5).encode(codec.encode(ack(2)))


@pytest.mark.parametrize("make_bad, error", [
    (_bad_magic, BadMagic),
    (_crc_mismatch, CrcMismatch),
    (_too_large, FrameTooLarge),
    (_host_only_message, UnexpectedMessage),
    (_unknown_type, UnknownMessageType),
    (_sequence_gap, SequenceError),
], ids=lambda v: getattr(v, "__name__", None))
def test_a_violation_is_reported_once_and_nothing_is_delivered_after_it(world, make_bad, error):
    guard = world.guard()
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    tracemalloc.start()
    try:
        guest.send(ack(1))
        guest.sock.sendall(make_bad(guest))
        guest.send(ack(3), ack(4))
        assert box.wait_for(lambda ms: any(isinstance(m, ChannelFailed) for m in ms))
        quiet()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert box.said() == [ack(1)]
    [failed] = box.failures()
    assert failed == ChannelFailed("vm1", code=error.code, detail=failed.detail, violation=True)
    assert len(box.messages) == 2
    assert peak < 2 * 1024 * KiB  # never what a hostile header declares
    assert stats_for(guard, "vm1") is None  # forgotten
    assert guest.host.fileno() != -1  # the socket is the Supervisor's to close
    assert guard.proxy().stats().get(timeout=5)["total"]["violations"] == 1


@pytest.mark.parametrize("first_seq", [0x89ABCDEF, 0xFFFFFFFF])
def test_a_watch_from_a_rebased_sequence_reads_on_from_it_and_refuses_the_old_count(world, first_seq):
    # A restored VM's Supervisor hands over its channel after GuestLink.resume:
    # the guest's next frame carries the rebased sequence, not 0.
    guard = world.guard()
    guest = world.channel()
    guest.encoder.rebase(first_seq)
    box, ref = world.supervisor()
    guard.ask(Watch("vm1", guest.host, ref, first_seq=first_seq))
    guest.send(ack(1), ack(2))
    stale = FrameEncoder(zlib.crc32, first_seq=2).encode(codec.encode(ack(3)))  # as if never rebased
    guest.sock.sendall(stale)
    assert box.wait_for(lambda ms: any(isinstance(m, ChannelFailed) for m in ms))
    assert box.said() == [ack(1), ack(2)]
    [failed] = box.failures()
    assert failed.code == SequenceError.code and failed.violation
    assert f"expected {(first_seq + 2) & 0xFFFFFFFF}, got 2" in failed.detail


def test_a_frame_over_the_configured_max_payload_is_a_violation(world):
    guard = world.guard(max_payload=1024)
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    guest.send(output(b"a" * 1000), output(b"a" * 1100))
    assert box.wait_for(lambda ms: len(ms) >= 2)
    quiet(0.1)
    assert box.said() == [output(b"a" * 1000)]
    assert [f.code for f in box.failures()] == [FrameTooLarge.code]


def test_eof_is_a_lost_vm(world):
    guard = world.guard()
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    guest.send(HELLO)
    guest.sock.shutdown(socket.SHUT_WR)
    assert box.wait_for(lambda ms: len(ms) >= 2)
    quiet(0.1)
    assert box.said() == [HELLO]
    [failed] = box.failures()
    assert failed.code == "vm_lost" and failed.violation is False
    assert guard.proxy().stats().get(timeout=5)["total"]["channels_lost"] == 1


def test_eof_inside_a_frame_is_a_violation(world):
    guard = world.guard()
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    frame = guest.frame(output(b"half"))
    guest.sock.sendall(frame[:len(frame) // 2 + 3])
    guest.sock.shutdown(socket.SHUT_WR)
    assert box.wait_for(lambda ms: len(ms) >= 1)
    quiet(0.1)
    [failed] = box.messages
    assert failed.code == TruncatedFrame.code and failed.violation is True


def test_inject_fault_corrupts_the_next_frame(world):
    guard = world.guard()
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    guest.send(ack(1))
    assert box.wait_for(lambda ms: len(ms) >= 1)
    guard.ask(InjectFault(kind="corrupt_frame", vm_id="vm1"))
    guest.send(output(b"hello"), ack(3))
    assert box.wait_for(lambda ms: len(ms) >= 2)
    quiet(0.1)
    assert box.said() == [ack(1)]
    [failed] = box.failures()
    assert failed.code == CrcMismatch.code and failed.violation is True


def test_unwatch_stops_delivery_and_leaves_the_socket_to_its_owner(world):
    guard = world.guard()
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    guest.send(ack(1))
    assert box.wait_for(lambda ms: len(ms) >= 1)
    guard.ask(Unwatch("vm1"))
    later = guest.frame(ack(2))
    guest.sock.sendall(later)
    quiet()
    assert box.messages == [GuestSaid("vm1", ack(1))]
    assert stats_for(guard, "vm1") is None
    # Still open, and the owner reads and writes it as before.
    guest.host.settimeout(2)
    assert guest.host.recv(4096) == later
    guest.host.sendall(b"ping")
    assert guest.sock.recv(4) == b"ping"


@pytest.mark.parametrize("send_timeout", [None, 2.0])
def test_the_supervisor_can_sendall_on_the_socket_ioguard_reads(world, send_timeout):
    guard = world.guard()
    guest = world.channel()
    guest.host.settimeout(send_timeout)
    blocking_before = os.get_blocking(guest.host.fileno())
    box = world.watch(guard, "vm1", guest)
    to_guest = os.urandom(4 * 1024 * KiB)  # far more than the socket buffer: sendall must wait
    received = bytearray()

    def guest_side():  # the guest reads what the host sends and talks back meanwhile
        guest.sock.settimeout(5)
        n = 0
        while len(received) < len(to_guest):
            received.extend(guest.sock.recv(256 * KiB))
            n += 1
            if n % 8 == 0:
                guest.send(ack(n))

    reader = threading.Thread(target=guest_side)
    reader.start()
    guest.host.sendall(to_guest)
    reader.join(10)
    assert bytes(received) == to_guest
    assert guest.host.gettimeout() == send_timeout
    assert os.get_blocking(guest.host.fileno()) == blocking_before
    assert box.wait_for(lambda ms: len(ms) >= 1)
    assert box.failures() == []
    assert [m.nonce for m in box.said()] == sorted(m.nonce for m in box.said())


def test_a_dead_supervisor_is_forgotten_and_others_keep_flowing(world):
    guard = world.guard()
    orphan, other = world.channel(), world.channel()
    _, dead = world.supervisor()
    guard.ask(Watch("orphan", orphan.host, dead))
    dead.stop()
    box = world.watch(guard, "other", other)
    orphan.send(ack(1))
    other.send(ack(2))
    assert box.wait_for(lambda ms: len(ms) >= 1)
    quiet(0.1)
    assert stats_for(guard, "orphan") is None
    assert guard.is_alive()


def test_watching_a_closed_socket_is_a_lost_vm(world):
    guard = world.guard()
    guest = world.channel()
    guest.host.close()
    box = world.watch(guard, "vm1", guest)
    assert box.wait_for(lambda ms: len(ms) >= 1)
    [failed] = box.messages
    assert failed.code == "vm_lost" and failed.violation is False


def test_a_crash_ends_every_channel_and_is_reported_to_root(world):
    told = []

    class Directory:
        def tell(self, name, message):
            told.append((name, message))

    guard = world.guard(directory=Directory())
    guest = world.channel()
    box = world.watch(guard, "vm1", guest)
    guard.tell(InjectFault(kind="crash"))
    assert box.wait_for(lambda ms: len(ms) >= 1)
    [failed] = box.messages
    assert failed.code == "vm_lost" and failed.violation is False
    deadline = time.monotonic() + 5
    while (guard.is_alive() or not told) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not guard.is_alive()
    assert [(n, type(m)) for n, m in told] == [("root", ChildFailed)]
    assert not any(t.name == "ioguard-io" for t in threading.enumerate())


def test_stop_joins_the_io_thread(world):
    guard = world.guard()
    guest = world.channel()
    world.watch(guard, "vm1", guest)
    assert any(t.name == "ioguard-io" for t in threading.enumerate())
    guard.stop()
    assert not any(t.name == "ioguard-io" for t in threading.enumerate())
    assert guest.host.fileno() != -1
