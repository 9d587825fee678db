"""The guest channel's vocabulary: every message the host and the guest
agent say to each other, and which side may send which.

Each is a frozen, slotted message class whose fields declare their wire type
and bound (``name: type = field(wire type)``); protocol/channel/codec.py
encodes and decodes them, and protocol/channel/constants.py holds the bounds.
Type ids 1-31 are the guest channel's; the caller's and the operator's
protocols (protocol/wire/) use ids from 32 up, so neither side of one
protocol can speak another.
"""

from __future__ import annotations

from protocol.channel.codec import (BOOL, I32, I64, U8, U16, U32, U64, Bytes, BytesList, Message, Pairs, Str, field,
                                    max_payload_size, message)
from protocol.channel.constants import (MAX_AGENT_VERSION_LEN, MAX_ARG_LEN, MAX_ARGV_ITEMS, MAX_BOOT_ID_LEN,
                                        MAX_CWD_LEN, MAX_ENV_ITEMS, MAX_ENV_KEY_LEN, MAX_ENV_VALUE_LEN,
                                        MAX_ERROR_CODE_LEN, MAX_ERROR_MESSAGE_LEN, MAX_FILE_ERROR_LEN,
                                        MAX_FILE_IN, MAX_FILES, MAX_KERNEL_LEN, MAX_OUTPUT_CHUNK, MAX_PATH_LEN,
                                        MAX_RESET_DETAIL_LEN, MAX_STDIN, MAX_STDIN_CHUNK, RESUME_ENTROPY_LEN, STDERR, STDOUT)

_HOST = "host"
_GUEST = "guest"


@message(1, _GUEST)
class Hello(Message):
    """Guest agent is up and ready for work."""

    agent_version: str = field(Str(MAX_AGENT_VERSION_LEN))
    boot_id: str = field(Str(MAX_BOOT_ID_LEN))
    kernel: str = field(Str(MAX_KERNEL_LEN))


@message(2, _HOST)
class Exec(Message):
    """Run one command in the guest as the unprivileged task user."""

    exec_id: int = field(U32)
    argv: tuple[bytes, ...] = field(BytesList(MAX_ARGV_ITEMS, MAX_ARG_LEN, min_count=1))
    env: tuple[tuple[bytes, bytes], ...] = field(Pairs(MAX_ENV_ITEMS, MAX_ENV_KEY_LEN, MAX_ENV_VALUE_LEN))
    cwd: bytes = field(Bytes(MAX_CWD_LEN))
    stdin: bytes = field(Bytes(MAX_STDIN))
    timeout_ms: int = field(U32)
    output_cap: int = field(U32)  # bytes kept per stream; the rest is dropped and flagged
    as_root: bool = field(BOOL)  # host-internal diagnostics only; never settable by clients
    capabilities: int = field(U16)  # soft capability bits (protocol/channel/capabilities.py)
    # More stdin follows in Stdin messages, ended by one with eof; False: `stdin` is all of it.
    stdin_open: bool = field(BOOL, default=False)


@message(3, _GUEST)
class Output(Message):
    """A chunk of a running command's stdout or stderr."""

    exec_id: int = field(U32)
    stream: int = field(U8.one_of(STDOUT, STDERR))
    # Bytes of this stream sent before this chunk: the host refuses a gap or an
    # overlap (a chunk out of order) as a protocol violation.
    offset: int = field(U64)
    data: bytes = field(Bytes(MAX_OUTPUT_CHUNK))


@message(4, _GUEST)
class Exit(Message):
    """A command finished: status, truncation flags and resource use."""

    exec_id: int = field(U32)
    exit_code: int = field(I32)  # -1 when killed by a signal
    signal: int = field(U8)  # 0 if none
    timed_out: bool = field(BOOL)
    stdout_truncated: bool = field(BOOL)
    stderr_truncated: bool = field(BOOL)
    wall_ms: int = field(U32)
    user_cpu_ms: int = field(U32)
    sys_cpu_ms: int = field(U32)
    max_rss_kib: int = field(U32)
    # The kernel's OOM killer killed a process during the run (/proc/vmstat oom_kill rose).
    oom_killed: bool = field(BOOL, default=False)


@message(5, _HOST)
class Reset(Message):
    """Kill every task process, wipe /tmp and the task user's home."""

    reset_id: int = field(U32)


@message(6, _GUEST)
class ResetDone(Message):
    """Outcome of a Reset; ok=False means the VM must be destroyed."""

    reset_id: int = field(U32)
    ok: bool = field(BOOL)
    detail: str = field(Str(MAX_RESET_DETAIL_LEN))


@message(7, _HOST)
class Heartbeat(Message):
    """Liveness probe; the guest echoes the nonce."""

    nonce: int = field(U64)


@message(8, _GUEST)
class HeartbeatAck(Message):
    """Answer to a Heartbeat, same nonce."""

    nonce: int = field(U64)


@message(9, _HOST, _GUEST)
class Error(Message):
    """A failure report with a machine-readable code (either direction)."""

    code: str = field(Str(MAX_ERROR_CODE_LEN))
    message: str = field(Str(MAX_ERROR_MESSAGE_LEN))
    # The exec it refuses or ends (the agent runs several at once in a
    # session); 0: about no exec.
    exec_id: int = field(U32, default=0)


@message(10, _HOST)
class PutFile(Message):
    """Before an Exec: write a file as the task user (new file, parents made).
    A failure is reported as Error put_failed in answer to the next Exec."""

    path: bytes = field(Bytes(MAX_PATH_LEN))
    mode: int = field(U16)  # permission bits, at most 0o777
    data: bytes = field(Bytes(MAX_FILE_IN))


@message(11, _HOST)
class Collect(Message):
    """After an Exit: read these files as the task user, at most `max_bytes` in
    all; answered by Collected chunks, file by file in order."""

    collect_id: int = field(U32)
    paths: tuple[bytes, ...] = field(BytesList(MAX_FILES, MAX_PATH_LEN, min_count=1))
    max_bytes: int = field(U32)


@message(12, _GUEST)
class Collected(Message):
    """A chunk of collected file `index`; `last` ends that file. A file that
    cannot be collected is one Collected with `error` set, no data, last."""

    collect_id: int = field(U32)
    index: int = field(U16)
    data: bytes = field(Bytes(MAX_OUTPUT_CHUNK))
    last: bool = field(BOOL)
    error: str = field(Str(MAX_FILE_ERROR_LEN))


@message(13, _HOST)
class Resume(Message):
    """To an agent restored from a snapshot, before any Exec: set the clock to
    the host's, mix fresh entropy into the kernel's CRNG, continue both
    directions' sequence ids from new random bases. Answered by ResumeDone."""

    time_ns: int = field(U64)  # the host's CLOCK_REALTIME, ns since the epoch
    entropy: bytes = field(Bytes(RESUME_ENTROPY_LEN, min_len=RESUME_ENTROPY_LEN))
    host_seq: int = field(U32)  # sequence id of the host's next frame after this one
    guest_seq: int = field(U32)  # sequence id of the guest's next frame (its ResumeDone)


@message(14, _GUEST)
class ResumeDone(Message):
    """A Resume is done: clock set, CRNG reseeded, sequences rebased."""

    clock_step_ns: int = field(I64)  # how far the guest's clock moved (new - old)


@message(15, _HOST)
class Stdin(Message):
    """More stdin for the running exec that was started with stdin_open; `eof`
    closes the command's stdin once everything before it was written. Stdin of
    one exec, Exec.stdin included, is at most MAX_STDIN bytes in all."""

    exec_id: int = field(U32)
    data: bytes = field(Bytes(MAX_STDIN_CHUNK))
    eof: bool = field(BOOL)


ALL_MESSAGES: frozenset[type[Message]] = frozenset({
    Hello, Exec, Output, Exit, Reset, ResetDone, Heartbeat, HeartbeatAck, Error, PutFile, Collect, Collected,
    Resume, ResumeDone, Stdin})
HOST_TO_GUEST: frozenset[type[Message]] = frozenset(c for c in ALL_MESSAGES if _HOST in c.SENDERS)
GUEST_TO_HOST: frozenset[type[Message]] = frozenset(c for c in ALL_MESSAGES if _GUEST in c.SENDERS)

# The host can size its frame decoder to this instead of the 16 MiB frame cap,
# so a guest can make it hold at most ~1 MiB per channel.
GUEST_TO_HOST_MAX_PAYLOAD: int = max_payload_size(GUEST_TO_HOST)
