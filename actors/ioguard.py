"""IOGuard: the one reader of every guest channel on the host, rate-limited.

Each watched VM gets two token buckets, one on bytes and one on frames, so
neither a fast writer nor a flood of tiny frames can take more than its share
of host CPU and memory. With a bucket empty the host simply stops reading that
socket; the guest's writes then block in the guest's own kernel (backpressure)
and the host spends nothing on it, not even a wake-up.

Threads: socket I/O happens only in the actor's I/O thread (a selector loop).
The actor's `on_receive` just queues commands for that thread and wakes it
through a socketpair, so the actor never blocks and each channel socket has
exactly one reader. Decoded messages go straight from the I/O thread to the
VM's Supervisor with `tell`.

Blocking mode: the socket belongs to the Supervisor, which writes to it from its
own thread with blocking `sendall` under `settimeout`. O_NONBLOCK is a flag of
the shared open file, so IOGuard never changes it (no `setblocking`, no
`settimeout`); it reads only when the selector says the socket is readable, and
with `recv(n, MSG_DONTWAIT)`, which cannot block whatever mode the owner chose.
(With a timeout set, Python polls before each recv; after the selector said
readable that poll returns at once, as nothing else reads the socket.)
The Supervisor must Unwatch before it closes the socket; if it closes first,
IOGuard sees fileno -1 or EBADF and reports vm_lost, never reading a reused fd.

Memory: a channel's decoder holds the part of one frame received so far
(<= max_payload, checked against the header; grown as bytes arrive, not
allocated as declared) plus one read of at most READ_CHUNK bytes. Across all
channels, frames in progress may hold at most `max_partial_bytes`: once a
frame's header is in, its declared length is admitted against that cap, and
while it does not fit the channel is not read (first come, first admitted) and
nothing more is held for it. An admitted frame always gets to finish (or is
ended by its deadline), so room always frees and no channel waits for ever.

Holds: a channel is read only while nothing holds it. IOGuard holds it while
its buckets are empty ("tokens") and while its frame waits for room under the
cap ("room"); the Supervisor holds it with `ChannelHold` while the host has the
VM paused for a SCRAM ("paused") and while a streaming task's caller is behind
("reader": the guest's writer then blocks in the guest, as with empty
buckets). Each reason is held and released on its own; reading resumes only
when none holds.

Stalls: each frame in progress has a deadline (protocol.channel.frame.FrameClock):
`frame_stall_s` from its first byte plus its declared length at
`rate_bytes_per_s`, counted only while the host is willing to read it, that is
while no hold stands. Past it the channel ends as a violation,
`stalled_frame`, long before any task timeout.
"""

from __future__ import annotations

import logging
import math
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pykka

from actors.directory import Directory
from actors.messages import ChannelFailed, ChannelHold, ChildFailed, GuestSaid, InjectFault, Unwatch, Watch
from config import Config
from protocol.channel import codec, messages
from protocol.channel.errors import ProtocolError, StalledFrame
from protocol.channel.frame import HEADER_SIZE, FrameClock, FrameDecoder
from protocol.hostcrc import crc32

log = logging.getLogger("corral.ioguard")

KiB = 1024
MiB = 1024 * KiB
READ_CHUNK = 64 * KiB
# Never pause a throttled VM for less than this: re-arming it sooner would only
# wake the loop to find the bucket still (by float rounding) not positive.
MIN_PAUSE_S = 0.001
STOP_JOIN_S = 5.0
# ChannelHold reasons: the host, not IOGuard, chose not to read ("tokens" and
# "room" are IOGuard's own and cannot be released from outside).
HOST_HOLDS = frozenset({"paused", "reader"})


class TokenBucket:
    """A token bucket refilled lazily from `clock`; starts full.

    `consume` always succeeds and may overdraw into debt: a read larger than the
    bucket goes through and the debt is waited off before the next one (as
    Firecracker's rate limiter does), so a frame larger than the capacity can
    never deadlock the channel. Not thread-safe: one owner thread.
    """

    def __init__(self, capacity: float, refill_per_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity!r}")
        if refill_per_s < 0:
            raise ValueError(f"refill_per_s must be >= 0, got {refill_per_s!r}")
        self.capacity = float(capacity)
        self.refill_per_s = float(refill_per_s)
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._last:  # a clock that stands still or steps back adds nothing
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.refill_per_s)
            self._last = now

    @property
    def tokens(self) -> float:
        """Tokens available now; negative while in debt."""
        self._refill()
        return self._tokens

    def consume(self, n: float) -> None:
        """Take `n` tokens, overdrawing if needed."""
        self._refill()
        self._tokens -= n

    def seconds_until_positive(self) -> float:
        """0 if tokens > 0, else the time until they are (inf with no refill).

        At exactly 0 tokens any wait will do; return a tiny positive one so a
        caller that sleeps on it never mistakes "empty" for "ready".
        """
        tokens = self.tokens
        if tokens > 0:
            return 0.0
        if self.refill_per_s <= 0:
            return math.inf
        return max(-tokens / self.refill_per_s, 1e-6)


@dataclass(frozen=True)
class ReadLimits:
    """How fast and how much IOGuard reads of each guest channel, and of all at once."""

    burst_bytes: int = 256 * KiB  # the byte bucket's capacity
    rate_bytes_per_s: float = 1 * MiB  # ... and its refill
    frames_per_s: float = 200  # the frame bucket's refill
    frames_burst: int = 64  # ... and its capacity
    max_payload: int = messages.GUEST_TO_HOST_MAX_PAYLOAD  # the largest frame a guest may send
    frame_stall_s: float = 1.0  # a frame's deadline, besides its length at rate_bytes_per_s
    max_partial_bytes: int = 32 * MiB  # frames in progress, across all channels

    @classmethod
    def from_config(cls, cfg: Config) -> ReadLimits:
        io = cfg.ioguard
        return cls(burst_bytes=io.burst_bytes, rate_bytes_per_s=io.rate_bytes_per_s,
                   frames_per_s=io.frames_per_s, frames_burst=io.frames_burst,
                   frame_stall_s=io.frame_stall_s, max_partial_bytes=io.max_partial_bytes)


@dataclass
class _Channel:
    """What the I/O thread knows about one watched VM."""

    vm_id: str
    sock: socket.socket
    fd: int
    supervisor: pykka.ActorRef
    decoder: FrameDecoder
    byte_bucket: TokenBucket
    frame_bucket: TokenBucket
    clock: FrameClock
    registered: bool = False
    rearm_at: float = 0.0  # while throttled: when to look at the buckets again
    throttled_since: float = 0.0
    corrupt_next: bool = False  # InjectFault corrupt_frame armed
    bytes_fed: int = 0  # bytes given to the decoder (to find frame boundaries)
    holds: set = field(default_factory=set)  # why the channel is not read: "tokens", "room", HOST_HOLDS
    admitted: int | None = None  # decoder.frames_decoded when its frame in progress was admitted
    reserved: int = 0  # bytes of max_partial_bytes admitted to that frame
    held: int = 0  # bytes its decoder holds (after the last read)
    stats: dict = field(default_factory=lambda: _zero_stats())


def _zero_stats() -> dict:
    return {"bytes_read": 0, "frames_read": 0, "throttled_s": 0.0, "stalls": 0, "room_waits": 0}


class IOGuard(pykka.ThreadingActor):
    """Reads every guest channel, meters it, verifies it, forwards what it says.

    Messages (tell): Watch, Unwatch, ChannelHold, InjectFault(kind="corrupt_frame",
    vm_id) and InjectFault(kind="crash"). Sends: GuestSaid and ChannelFailed to
    the VM's Supervisor. Proxy call: stats().
    """

    def __init__(self, *, limits: ReadLimits = ReadLimits(), directory: Directory | None = None) -> None:
        super().__init__()
        TokenBucket(limits.burst_bytes, limits.rate_bytes_per_s)  # validate now, not on the first Watch
        TokenBucket(limits.frames_burst, limits.frames_per_s)
        FrameClock(limits.frame_stall_s, limits.rate_bytes_per_s)
        if limits.max_partial_bytes < limits.max_payload:
            # The largest frame could never be admitted: its channel would wait for ever.
            raise ValueError(f"max_partial_bytes ({limits.max_partial_bytes}) must be at least "
                             f"max_payload ({limits.max_payload})")
        self.limits = limits
        self.directory = directory  # optional: where to report our own crash ("root")
        self._io: _IOLoop | None = None

    # --- pykka life cycle ------------------------------------------------------

    def on_start(self) -> None:
        self._io = _IOLoop(self)
        self._io.start()

    def on_receive(self, message: Any) -> None:
        if isinstance(message, InjectFault) and message.kind == "crash":
            raise RuntimeError("injected fault: ioguard crash")
        if isinstance(message, (Watch, Unwatch, ChannelHold, InjectFault)):
            self._io.submit(message)
        else:
            log.warning("ioguard ignores %r", message)

    def on_stop(self) -> None:
        self._shutdown_io(notify=False)  # an orderly stop: the VMs' owners stop too

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        # A successor cannot take over a half-read stream (decoder state is
        # lost), so every watched VM's channel ends here and its owner is told.
        self._shutdown_io(notify=True)
        if self.directory is not None:
            self.directory.tell("root", ChildFailed("ioguard", repr(exception_value)))

    def _shutdown_io(self, notify: bool) -> None:
        if self._io is not None:
            self._io.stop(notify)
            self._io = None

    # --- queries (ref.proxy().stats().get()) -----------------------------------

    def stats(self) -> dict:
        """{"total": {...}, "vms": {vm_id: {...}}}: bytes_read, frames_read,
        throttled_s, stalls, room_waits per watched VM; totals also count VMs
        already forgotten plus watched, violations, lost channels, partial_peak
        and held_peak (the most bytes ever admitted, and held, at once). Both
        also say how things are now: partial_bytes (admitted to frames in
        progress), partial_held (received of them) and waiting_for_room (a
        count in the totals), and per VM whether it is `throttled` and which
        ChannelHold reasons hold it (`held_by`, sorted)."""
        return self._io.stats() if self._io is not None else {"total": {}, "vms": {}}


class _IOLoop:
    """The I/O thread: a selector over the channels plus a wake-up socketpair."""

    def __init__(self, owner: IOGuard) -> None:
        self.owner = owner
        self.limits = owner.limits
        self.selector = selectors.DefaultSelector()
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.channels: dict[str, _Channel] = {}
        self.throttled: dict[str, _Channel] = {}
        # Frames whose header is in, waiting for room under max_partial_bytes, oldest first.
        self.waiting: dict[str, _Channel] = {}
        self.partial_bytes = 0  # admitted to frames in progress, across all channels
        self.partial_held = 0  # received of them: what the decoders hold
        self.stopping = False
        self.lock = threading.Lock()  # guards every stats counter (read by other threads)
        self.totals = dict(_zero_stats(), violations=0, channels_lost=0, partial_peak=0, held_peak=0)
        self.thread = threading.Thread(target=self._run, name="ioguard-io", daemon=True)

    # --- called from the actor's thread ----------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, command: Any) -> None:
        self.commands.put(command)
        self._wake()

    def stop(self, notify: bool) -> None:
        self.submit(("stop", notify))
        self.thread.join(STOP_JOIN_S)
        if self.thread.is_alive():
            log.error("ioguard I/O thread did not stop within %.0f s", STOP_JOIN_S)
            return  # leave its resources to it rather than pull them from under it
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()

    def stats(self) -> dict:
        now = time.monotonic()
        with self.lock:
            vms = {}
            for vm_id, ch in self.channels.items():
                s = dict(ch.stats, throttled=vm_id in self.throttled, waiting_for_room=vm_id in self.waiting,
                         partial_bytes=ch.reserved, partial_held=ch.held,
                         held_by=sorted(ch.holds & HOST_HOLDS))
                if s["throttled"]:  # count the pause in progress too
                    s["throttled_s"] += now - ch.throttled_since
                vms[vm_id] = s
            total = dict(self.totals, watched=len(self.channels), partial_bytes=self.partial_bytes,
                         partial_held=self.partial_held, waiting_for_room=len(self.waiting))
            total["throttled_s"] += sum(now - ch.throttled_since for ch in self.throttled.values())
        return {"total": total, "vms": vms}

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    # --- the I/O thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self.stopping:
                events = self.selector.select(self._select_timeout())
                # Commands first: an Unwatch told before new data arrived wins.
                self._run_commands()
                for key, _ in events:
                    ch = key.data
                    if ch is not None and self.channels.get(ch.vm_id) is ch and ch.registered:
                        self._on_readable(ch)
                self._rearm_due()
                self._end_stalled()
        except Exception as e:  # a bug here must not leave VMs silently unread
            log.exception("ioguard I/O thread failed")
            for ch in list(self.channels.values()):
                self._fail(ch, "vm_lost", f"ioguard I/O thread failed: {e!r}", violation=False)
            self.owner.actor_ref.stop(block=False)

    def _select_timeout(self) -> float | None:
        wake_ups = [ch.rearm_at for ch in self.throttled.values()]
        wake_ups += [at for at in (ch.clock.deadline for ch in self.channels.values()) if at is not None]
        if not wake_ups:
            return None  # nothing to re-arm or time out: sleep until a socket or a command
        return max(0.0, min(wake_ups) - time.monotonic())

    def _run_commands(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, Watch):
                self._watch(command)
            elif isinstance(command, Unwatch):
                ch = self.channels.get(command.vm_id)
                if ch is not None:
                    self._forget(ch)
            elif isinstance(command, ChannelHold):
                ch = self.channels.get(command.vm_id)
                if ch is not None:
                    self._host_hold(ch, command)
            elif isinstance(command, InjectFault):
                ch = self.channels.get(command.vm_id)
                if command.kind == "corrupt_frame" and ch is not None:
                    ch.corrupt_next = True
                else:
                    log.warning("ioguard ignores fault %r (unknown kind or VM)", command)
            elif isinstance(command, tuple) and command[0] == "stop":
                self.stopping = True
                for ch in list(self.channels.values()):
                    if command[1]:
                        self._fail(ch, "vm_lost", "ioguard failed", violation=False)
                    else:
                        self._forget(ch)

    def _watch(self, command: Watch) -> None:
        old = self.channels.get(command.vm_id)
        if old is not None:
            log.warning("VM %s watched again: replacing its channel", command.vm_id)
            self._forget(old)
        limits = self.limits
        ch = _Channel(
            vm_id=command.vm_id, sock=command.sock, fd=command.sock.fileno(),
            supervisor=command.supervisor,
            decoder=FrameDecoder(crc32, max_payload=limits.max_payload, first_seq=command.first_seq),
            byte_bucket=TokenBucket(limits.burst_bytes, limits.rate_bytes_per_s),
            frame_bucket=TokenBucket(limits.frames_burst, limits.frames_per_s),
            clock=FrameClock(limits.frame_stall_s, limits.rate_bytes_per_s))
        with self.lock:
            self.channels[ch.vm_id] = ch
        try:
            self._register(ch)
        except (ValueError, KeyError, OSError) as e:  # closed socket, fd already watched
            self._fail(ch, "vm_lost", f"cannot watch the channel: {e}", violation=False)

    def _register(self, ch: _Channel) -> None:
        # A socket its owner closed has fileno -1; its old number may already
        # belong to someone else's new socket, so never register a stale fd.
        ch.fd = ch.sock.fileno()
        self.selector.register(ch.fd, selectors.EVENT_READ, ch)
        ch.registered = True

    def _unregister(self, ch: _Channel) -> None:
        if ch.registered:
            ch.registered = False
            try:
                self.selector.unregister(ch.fd)
            except (KeyError, ValueError):
                pass

    def _forget(self, ch: _Channel) -> None:
        """Stop reading `ch` for good. The socket is the Supervisor's: not closed."""
        self._unregister(ch)
        with self.lock:
            if ch.vm_id in self.throttled:
                self._end_pause(ch, time.monotonic())
            if self.channels.get(ch.vm_id) is ch:
                del self.channels[ch.vm_id]
            if self.waiting.get(ch.vm_id) is ch:
                del self.waiting[ch.vm_id]
            self.partial_held -= ch.held
            ch.held = 0
        ch.decoder = None  # drop a half-read frame's buffer now
        if ch.reserved:
            self._free_room(ch)

    def _fail(self, ch: _Channel, code: str, detail: str, violation: bool) -> None:
        """Report the channel's end once, then forget it."""
        if self.channels.get(ch.vm_id) is not ch:
            return
        self._forget(ch)
        with self.lock:
            self.totals["violations" if violation else "channels_lost"] += 1
        level = logging.WARNING if violation else logging.INFO
        log.log(level, "VM %s channel ended: %s: %s", ch.vm_id, code, detail)
        self._tell(ch, ChannelFailed(ch.vm_id, code=code, detail=detail, violation=violation))

    def _tell(self, ch: _Channel, message: Any) -> bool:
        try:
            ch.supervisor.tell(message)
            return True
        except pykka.ActorDeadError:
            # Nobody listens any more: stop reading (quietly, nobody to tell).
            log.info("VM %s: supervisor is dead; channel forgotten", ch.vm_id)
            self._forget(ch)
            return False

    # --- reading -----------------------------------------------------------------

    def _on_readable(self, ch: _Channel) -> None:
        if not self._has_tokens(ch):
            self._pause(ch)
            return
        try:
            data = ch.sock.recv(min(READ_CHUNK, max(1, ch.decoder.wanted)), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return  # nothing after all; the selector will tell us again
        except OSError as e:
            self._fail(ch, "vm_lost", f"channel read failed: {e}", violation=False)
            return
        if not data:
            self._on_eof(ch)
            return
        ch.byte_bucket.consume(len(data))  # may overdraw: see TokenBucket
        with self.lock:
            ch.stats["bytes_read"] += len(data)
            self.totals["bytes_read"] += len(data)
        if ch.corrupt_next:
            data = self._corrupt(ch, data)
        ch.bytes_fed += len(data)
        decoder = ch.decoder
        try:
            for payload in decoder.feed(data):
                ch.frame_bucket.consume(1)
                with self.lock:
                    ch.stats["frames_read"] += 1
                    self.totals["frames_read"] += 1
                message = codec.decode(payload, messages.GUEST_TO_HOST)
                if not self._tell(ch, GuestSaid(ch.vm_id, message)):
                    return
        except ProtocolError as e:
            self._fail(ch, e.code, str(e), violation=True)
            return
        now = time.monotonic()
        with self.lock:
            self.partial_held += decoder.buffered - ch.held
            ch.held = decoder.buffered
            self.totals["held_peak"] = max(self.totals["held_peak"], self.partial_held)
        ch.clock.update(decoder, now)
        if ch.admitted is not None and ch.admitted != decoder.frames_decoded:
            self._free_room(ch)  # its admitted frame is complete
        if decoder.declared_length is not None and ch.admitted is None:
            # A header just came in. Reads never go past it (see `wanted`), so
            # nothing of its payload is held before it is admitted.
            self._admit(ch, now)
        if not self._has_tokens(ch):
            self._pause(ch)

    def _on_eof(self, ch: _Channel) -> None:
        try:
            ch.decoder.eof()
        except ProtocolError as e:  # the guest hung up inside a frame
            self._fail(ch, e.code, str(e), violation=True)
            return
        self._fail(ch, "vm_lost", "guest channel closed (VM gone)", violation=False)

    @staticmethod
    def _corrupt(ch: _Channel, data: bytes) -> bytes:
        """Flip one payload bit of `data` if it holds any (else wait for a read
        that does), so the frame fails its CRC check. Reads never cross a
        header/payload boundary, but do not rely on it."""
        offset = ch.bytes_fed - ch.decoder.bytes_decoded  # position inside the current frame
        first_payload_byte = max(0, HEADER_SIZE - offset)
        if first_payload_byte >= len(data):
            return data
        ch.corrupt_next = False
        buf = bytearray(data)
        buf[first_payload_byte] ^= 0x01
        return bytes(buf)

    # --- throttling ----------------------------------------------------------------

    @staticmethod
    def _has_tokens(ch: _Channel) -> bool:
        return ch.byte_bucket.tokens > 0 and ch.frame_bucket.tokens > 0

    def _pause(self, ch: _Channel) -> None:
        """Stop selecting `ch` until its buckets are positive again: the host does
        not read, the guest's writer blocks, and this thread sleeps."""
        wait = max(ch.byte_bucket.seconds_until_positive(), ch.frame_bucket.seconds_until_positive())
        now = time.monotonic()
        self._unregister(ch)
        ch.rearm_at = now + max(wait, MIN_PAUSE_S)
        self._hold(ch, "tokens", now)
        with self.lock:
            ch.throttled_since = now
            self.throttled[ch.vm_id] = ch
            ch.stats["stalls"] += 1
            self.totals["stalls"] += 1

    def _end_pause(self, ch: _Channel, now: float) -> None:
        # Caller holds self.lock.
        paused = now - ch.throttled_since
        ch.stats["throttled_s"] += paused
        self.totals["throttled_s"] += paused
        del self.throttled[ch.vm_id]
        self._release(ch, "tokens", now)

    # --- the frame clock and the cap on partial frames ------------------------------

    @staticmethod
    def _hold(ch: _Channel, reason: str, now: float) -> None:
        """The host does not read `ch` (for `reason`): its frame clock stands."""
        if not ch.holds:
            ch.clock.hold(now)
        ch.holds.add(reason)

    @staticmethod
    def _release(ch: _Channel, reason: str, now: float) -> None:
        if reason in ch.holds:
            ch.holds.discard(reason)
            if not ch.holds:
                ch.clock.release(now)

    def _host_hold(self, ch: _Channel, command: ChannelHold) -> None:
        """The Supervisor stops (or lets resume) reading `ch` for its reason."""
        if command.reason not in HOST_HOLDS:
            log.warning("ioguard ignores a hold for an unknown reason: %r", command)
            return
        now = time.monotonic()
        if command.held:
            self._hold(ch, command.reason, now)
            self._unregister(ch)
        elif command.reason in ch.holds:
            self._release(ch, command.reason, now)
            if not ch.holds:  # tokens and room hold on their own: their ends register it
                self._resume_reading(ch, "cannot watch the channel again")

    def _end_stalled(self) -> None:
        now = time.monotonic()
        for ch in [c for c in self.channels.values() if c.clock.deadline is not None]:
            try:
                ch.clock.check(ch.decoder, now)
            except StalledFrame as e:
                self._fail(ch, e.code, str(e), violation=True)

    def _admit(self, ch: _Channel, now: float) -> None:
        """Admit `ch`'s frame against max_partial_bytes, or park the channel
        (unread, its clock standing) behind the frames already waiting."""
        length = ch.decoder.declared_length
        if not self.waiting and self.partial_bytes + length <= self.limits.max_partial_bytes:
            self._reserve(ch, length)
            return
        self._unregister(ch)
        self._hold(ch, "room", now)
        with self.lock:
            self.waiting[ch.vm_id] = ch
            ch.stats["room_waits"] += 1
            self.totals["room_waits"] += 1

    def _reserve(self, ch: _Channel, length: int) -> None:
        ch.admitted = ch.decoder.frames_decoded
        ch.reserved = length
        with self.lock:
            self.partial_bytes += length
            self.totals["partial_peak"] = max(self.totals["partial_peak"], self.partial_bytes)

    def _free_room(self, ch: _Channel) -> None:
        """`ch`'s admitted frame is complete or gone: its room goes to the frames
        waiting, oldest first, as far as it reaches."""
        with self.lock:
            self.partial_bytes -= ch.reserved
        ch.reserved, ch.admitted = 0, None
        now = time.monotonic()
        while self.waiting and not self.stopping:
            first = next(iter(self.waiting.values()))
            length = first.decoder.declared_length
            if self.partial_bytes + length > self.limits.max_partial_bytes:
                return
            with self.lock:
                del self.waiting[first.vm_id]
            self._reserve(first, length)
            self._release(first, "room", now)
            if not first.holds:
                self._resume_reading(first, "cannot watch the channel again")

    def _resume_reading(self, ch: _Channel, failure: str) -> None:
        if ch.registered:
            return
        try:
            self._register(ch)
        except (ValueError, KeyError, OSError) as e:  # its owner closed it meanwhile
            self._fail(ch, "vm_lost", f"{failure}: {e}", violation=False)

    def _rearm_due(self) -> None:
        now = time.monotonic()
        for ch in [c for c in self.throttled.values() if c.rearm_at <= now]:
            if not self._has_tokens(ch):  # float rounding: not quite yet
                wait = max(ch.byte_bucket.seconds_until_positive(), ch.frame_bucket.seconds_until_positive())
                ch.rearm_at = now + max(wait, MIN_PAUSE_S)
                continue
            with self.lock:
                self._end_pause(ch, now)
            if not ch.holds:
                self._resume_reading(ch, "cannot watch the channel again")
