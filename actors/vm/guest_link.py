"""The host end of one VM's SecureChannel: a unix socket QEMU listens on.

Verify then parse (protocol.channel.frame), then a strict per-state allow-list of what
the guest may send (default deny). Every wait has a deadline on the monotonic
clock, and so has every frame in progress (protocol.channel.frame.FrameClock, as in
IOGuard): a frame that stalls is a StalledFrame long before the caller's
deadline. The host never holds more than the frame cap (grown as bytes arrive)
plus a task's output cap for one guest. Any violation raises a ProtocolError and the VM's owner destroys it:
there is no resynchronising on garbage.

A VM restored from a snapshot continues the sequences of the VM saved (a
template's agent said Hello, frame 0, before the save: guest_first_seq=1; a
session's VM, saved between execs, had sent and read many), and `resume`
then moves both directions to fresh random bases.
"""

from __future__ import annotations

import itertools
import secrets
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass

from actors.vm.errors import ChannelClosed, GuestTimeout
from protocol.channel import codec, messages
from protocol.channel.capabilities import ALL_SOFT_BITS
from protocol.channel.constants import RESUME_ENTROPY_LEN, STDERR, STDOUT
from protocol.channel.errors import OutputOutOfOrder, UnexpectedMessage, WrongExec
from protocol.channel.frame import FrameClock, FrameDecoder, FrameEncoder
from protocol.hostcrc import crc32

READ_CHUNK = 64 * 1024
# The largest frame a guest may send: its largest message (an Output chunk).
GUEST_FRAME_CAP = messages.GUEST_TO_HOST_MAX_PAYLOAD
# A frame's time (FrameClock): the defaults of config [ioguard] frame_stall_s and rate_bytes_per_s.
FRAME_STALL_S = 1.0
FRAME_RATE_BYTES_PER_S = 1024 * 1024


class CappedOutput:
    """A command's stdout and stderr as the host keeps them: at most `cap`
    bytes per stream, the rest dropped and flagged. The host does not trust
    the guest to truncate, nor to send its chunks in order: each chunk must
    start where its stream ended (Output.offset). With `keep` False (a
    streaming task, whose chunks go on to the caller) nothing is kept, only
    counted and flagged."""

    def __init__(self, cap: int, keep: bool = True):
        self.cap = cap
        self.keep = keep
        self.streams = {STDOUT: bytearray(), STDERR: bytearray()}
        self.received = {STDOUT: 0, STDERR: 0}  # bytes the guest sent per stream: the next offset
        self.dropped = {STDOUT: False, STDERR: False}

    def add(self, stream: int, offset: int, data: bytes) -> bytes:
        """Take a chunk; return the part of it within the cap (kept if `keep`).
        OutputOutOfOrder if it does not start where its stream ended."""
        if offset != self.received[stream]:
            raise OutputOutOfOrder(f"stream {stream} chunk at offset {offset}, "
                                   f"expected {self.received[stream]}")
        room = self.cap - min(offset, self.cap)
        self.received[stream] += len(data)
        if len(data) > room:
            self.dropped[stream] = True
            data = data[:room]
        if self.keep:
            self.streams[stream] += data
        return data

    def stdout(self) -> bytes:
        return bytes(self.streams[STDOUT])

    def stderr(self) -> bytes:
        return bytes(self.streams[STDERR])

    def flag(self, exit_message: messages.Exit) -> messages.Exit:
        """The Exit with truncation flagged where the guest or the host cut."""
        return codec.replace(
            exit_message,
            stdout_truncated=exit_message.stdout_truncated or self.dropped[STDOUT],
            stderr_truncated=exit_message.stderr_truncated or self.dropped[STDERR])


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit: messages.Exit


class GuestLink:
    """One connection to one guest agent. Not thread-safe: its owner's thread uses it."""

    def __init__(self, path: str, frame_stall_s: float = FRAME_STALL_S,
                 frame_rate_bytes_per_s: float = FRAME_RATE_BYTES_PER_S, *,
                 guest_first_seq: int = 0, host_first_seq: int = 0):
        """`guest_first_seq`/`host_first_seq`: the sequence ids of the first
        frame each side sends on this connection (0 on a fresh boot)."""
        self.path = str(path)
        self.sock: socket.socket | None = None
        self.encoder = FrameEncoder(crc32, first_seq=host_first_seq)
        self.decoder = FrameDecoder(crc32, max_payload=GUEST_FRAME_CAP, first_seq=guest_first_seq)
        self.clock = FrameClock(frame_stall_s, frame_rate_bytes_per_s)
        self.pending: list = []  # decoded guest messages not yet consumed
        self.ids = itertools.count(1)

    def connect(self, deadline: float) -> None:
        """QEMU creates the socket as the domain starts; retry until then."""
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                self.sock = sock
                return
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise GuestTimeout(f"channel socket {self.path} did not open in time") from None
                time.sleep(0.005)
            except OSError as e:
                sock.close()
                raise ChannelClosed(f"cannot connect to {self.path}: {e}") from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, message: codec.Message) -> None:
        try:
            self.sock.sendall(self.encoder.encode(codec.encode(message)))
        except OSError as e:
            raise ChannelClosed(f"channel to guest closed while sending: {e}") from None

    def receive(self, allowed: frozenset, deadline: float):
        """The next guest message, which must be of a type in `allowed`."""
        while not self.pending:
            now = time.monotonic()
            self.clock.check(self.decoder, now)  # a frame that stalled is the guest's fault
            remaining = deadline - now
            if remaining <= 0:
                raise GuestTimeout("guest did not answer in time")
            stall_at = self.clock.deadline
            self.sock.settimeout(remaining if stall_at is None else min(remaining, stall_at - now))
            try:
                data = self.sock.recv(min(READ_CHUNK, max(self.decoder.wanted, 1)))
            except socket.timeout:
                continue  # the caller's deadline or the frame's: the top of the loop says which
            except OSError as e:
                raise ChannelClosed(f"channel to guest failed: {e}") from None
            if not data:
                self.decoder.eof()
                raise ChannelClosed("guest channel closed (VM gone)")
            for payload in self.decoder.feed(data):
                self.pending.append(codec.decode(payload, messages.GUEST_TO_HOST))
            self.clock.update(self.decoder, time.monotonic())
        message = self.pending.pop(0)
        if type(message) not in allowed:
            raise UnexpectedMessage(
                f"guest sent {type(message).__name__} where only "
                f"{', '.join(sorted(c.__name__ for c in allowed))} may come")
        return message

    def guest_frame_read(self) -> None:
        """IOGuard read one more guest frame off this link's socket (a
        GuestSaid): the link counts it too, so decoder.expected_seq stays the
        sequence of the guest's next frame, which a session's save records."""
        self.decoder.rebase((self.decoder.expected_seq + 1) & 0xFFFFFFFF)

    # --- conversations, each with its own allow-list ---------------------------

    def wait_hello(self, deadline: float) -> messages.Hello:
        return self.receive(frozenset({messages.Hello}), deadline)

    def resume(self, deadline: float) -> messages.ResumeDone:
        """Set a restored agent's clock to ours, give its CRNG fresh entropy and
        move both directions to random sequence bases, so no frame recorded
        on one clone of a snapshot passes on another. Only while
        no exec runs in the guest (else the agent refuses, with an Error raised
        here as UnexpectedMessage). Returns the ResumeDone."""
        self.send_resume()
        message = self.receive(frozenset({messages.ResumeDone, messages.Error}), deadline)
        if isinstance(message, messages.Error):
            raise UnexpectedMessage(f"guest refused the Resume: {message.code}: {message.message}")
        return message

    def send_resume(self) -> None:
        """resume's first half, for an owner that reads the answer elsewhere (a
        Supervisor hands the channel to IOGuard with Watch(first_seq=
        decoder.expected_seq)): send the Resume and rebase both directions."""
        if self.pending or self.decoder.in_frame:
            raise UnexpectedMessage("guest sent a frame before the Resume")
        host_seq, guest_seq = secrets.randbits(32), secrets.randbits(32)
        self.send(messages.Resume(time_ns=time.time_ns(), entropy=secrets.token_bytes(RESUME_ENTROPY_LEN),
                                  host_seq=host_seq, guest_seq=guest_seq))
        self.encoder.rebase(host_seq)
        self.decoder.rebase(guest_seq)

    def run(self, argv: list[bytes], deadline: float, *, env: dict[bytes, bytes] | None = None,
            cwd: bytes = b"", stdin: bytes = b"", timeout_ms: int = 0,
            output_cap: int = 1 << 20, as_root: bool = False,
            capabilities: int = ALL_SOFT_BITS) -> ExecResult:
        """Run one command to completion. Output past `output_cap` per stream is
        dropped and flagged here too: the host does not trust the guest to truncate.
        `capabilities`: soft capability bits; by default all of them, the task
        rights the guest gave before capabilities were enforced. A missing one
        that argv[0] needs raises UnexpectedMessage (the agent's Error)."""
        exec_id = next(self.ids)
        self.send(messages.Exec(
            exec_id=exec_id, argv=tuple(argv), env=tuple((env or {}).items()), cwd=cwd,
            stdin=stdin, timeout_ms=timeout_ms, output_cap=output_cap, as_root=as_root,
            capabilities=capabilities))
        allowed = frozenset({messages.Output, messages.Exit, messages.Error})
        output = CappedOutput(output_cap)
        while True:
            message = self.receive(allowed, deadline)
            if isinstance(message, messages.Error):
                raise UnexpectedMessage(f"guest error during exec: {message.code}: {message.message}")
            if message.exec_id != exec_id:
                raise WrongExec(f"message for exec {message.exec_id}, expected {exec_id}")
            if isinstance(message, messages.Exit):
                return ExecResult(stdout=output.stdout(), stderr=output.stderr(),
                                  exit=output.flag(message))
            output.add(message.stream, message.offset, message.data)

    def reset(self, deadline: float) -> messages.ResetDone:
        reset_id = next(self.ids)
        self.send(messages.Reset(reset_id=reset_id))
        # Output and Exit of an exec the reset killed may still arrive first.
        allowed = frozenset({messages.ResetDone, messages.Output, messages.Exit})
        while True:
            message = self.receive(allowed, deadline)
            if isinstance(message, messages.ResetDone):
                if message.reset_id != reset_id:
                    raise UnexpectedMessage(f"reset done for {message.reset_id}, expected {reset_id}")
                return message


@contextmanager
def booted_vm(hypervisor, boot_timeout_s: float, **create_args):
    """A fresh VM whose agent has said Hello, driven synchronously (checks,
    benchmarks, tests; corrald's pool uses Supervisors instead). Yields
    (handle, link, hello); the VM is destroyed on the way out."""
    handle = hypervisor.create(**create_args)
    link = GuestLink(handle.socket)
    try:
        deadline = time.monotonic() + boot_timeout_s
        link.connect(deadline)
        yield handle, link, link.wait_hello(deadline)
    finally:
        link.close()
        hypervisor.destroy(handle)
