"""The caller protocol: what clients and corrald say over ZeroMQ: tasks,
their live output and stdin (streams), status, and sessions.

Same bounded, non-recursive binary encoding as the guest channel (one codec in
protocol.channel.codec), other type ids (32 and up) and other senders, so a guest
can never speak it and a client can never speak the guest's. A ZeroMQ message
from a client is [empty delimiter, PROTOCOL_TAG, payload] (protocol.wire.envelope);
corrald answers the same way on the same DEALER identity.

Semantic checks (known capabilities, caps within config, non-empty argv) are
Intake's job; this module only bounds sizes and types.
"""

from __future__ import annotations

from enum import StrEnum

from protocol.channel.codec import (BOOL, I32, U8, U16, U32, U64, Bytes, BytesList, Message, Pairs, Records, Str, field,
                                    message)
from protocol.channel.constants import (MAX_ARG_LEN, MAX_ARGV_ITEMS, MAX_CWD_LEN, MAX_ENV_ITEMS, MAX_ENV_KEY_LEN,
                                        MAX_ENV_VALUE_LEN, MAX_FILE_ERROR_LEN, MAX_FILE_IN, MAX_FILES, MAX_PATH_LEN,
                                        MAX_STDIN, MAX_STDIN_CHUNK, STDERR, STDOUT)

PROTOCOL_TAG = b"corral/1"
CLIENT = "client"
DAEMON = "daemon"

MAX_TASK_ID_LEN = 64
MAX_CAPABILITIES = 16
MAX_CAPABILITY_LEN = 32
MAX_REPLY_OUTPUT = 16 * 1024 * 1024
MAX_ERROR_TEXT = 4096
MAX_COLLECTED = 16 * 1024 * 1024  # all collected files of one reply (config caps it lower)
MAX_RECEIPT = 8192
MAX_STREAM_CHUNK = 1024 * 1024  # one TaskOutput's data
MAX_EGRESS_RULES = 64
MAX_EGRESS_RULE_LEN = 256
MAX_SESSION_ID_LEN = 64
MAX_LABELS = 16
MAX_LABEL_KEY_LEN = 64
MAX_LABEL_VALUE_LEN = 256
MAX_SESSIONS_LISTED = 1024
MAX_FORKS = 8  # new sessions one SessionFork makes (the session limits bound them too)

CRITICAL, HIGH, NORMAL, LOW = 0, 1, 2, 3
PRIORITY_NAMES = {"critical": CRITICAL, "high": HIGH, "normal": NORMAL, "low": LOW}


class ErrorCode(StrEnum):
    """Every error code a task can be answered with: TaskReply.error_code is
    one of these, or "" when the command ran to an exit status. The values are
    the wire strings; README.md lists them for callers (a test keeps the two
    in step)."""

    # Refused at once, before the task is accepted (Intake, the identity's grants and budget).
    INVALID_REQUEST = "invalid_request"  # bad framing, payload, argv, env, cwd, timeout or cap
    DUPLICATE_TASK = "duplicate_task"  # this connection has a task with this id in flight
    UNKNOWN_CAPABILITY = "unknown_capability"
    DUPLICATE_CAPABILITY = "duplicate_capability"
    CAPABILITY_UNAVAILABLE = "capability_unavailable"  # known, but not offered on this host
    CAPABILITY_DENIED = "capability_denied"  # not granted to the caller's identity
    COST_OVER_CAPACITY = "cost_over_capacity"  # more than the identity's whole budget
    BUDGET_EXHAUSTED = "budget_exhausted"  # retry_after_ms: when the budget will cover it
    FILES_TOO_LARGE = "files_too_large"
    UNAUTHENTICATED = "unauthenticated"  # a connection with no known identity: a bug if ever seen
    # corrald's mode refuses new tasks.
    SHUTTING_DOWN = "shutting_down"
    DRAINING = "draining"
    SAFE_MODE = "safe_mode"  # an operator's SCRAM holds
    # Accepted, never run.
    BUSY = "busy"  # the queue is full; retry_after_ms says when to try again
    UNAVAILABLE = "unavailable"  # no VM in time, or the scheduler was restarting
    CANCELLED = "cancelled"  # corrald stopped first
    CANCELLED_SCRAM = "cancelled_scram"  # queued when an operator's SCRAM came
    # Refused in the guest before the command started; the VM lives on.
    PUT_FAILED = "put_failed"
    MISSING_CAPABILITY = "missing_capability"  # argv[0] needs a soft capability the task lacks
    # After the command started.
    TIMEOUT = "timeout"  # ran past its timeout (partial output comes along)
    VM_LOST = "vm_lost"
    PROTOCOL_VIOLATION = "protocol_violation"  # the VM broke the channel protocol
    GUEST_ERROR = "guest_error"
    # Set by the client library alone: the connection dropped with the task in flight.
    CONNECTION_LOST = "connection_lost"
    # A TaskAttach or TaskStdin for a task this identity has not in flight (or
    # another identity's: the same answer, so that ids of others leak nothing).
    UNKNOWN_TASK = "unknown_task"
    # Sessions (a VM kept across execs). An exec or close for a session this
    # identity has not open (or another identity's: the same answer).
    SESSION_NOT_FOUND = "session_not_found"
    SESSION_LIMIT = "session_limit"  # sessions.max_per_identity or sessions.max_total reached
    # The session ended under the exec (its agent stopped answering, its VM died,
    # corrald restarted, an operator or a drain closed it): the VM is destroyed.
    SESSION_LOST = "session_lost"
    # A pause or fork while an exec runs in the session (or while it is being
    # paused, resumed or forked already): retry once the exec is answered.
    SESSION_BUSY = "session_busy"
    SESSION_PAUSED = "session_paused"  # an exec in a paused session: resume it first


@message(32, CLIENT)
class TaskRequest(Message):
    """Run one command in a fresh sandbox VM."""

    task_id: str = field(Str(MAX_TASK_ID_LEN))  # chosen by the client, echoed in the reply
    priority: int = field(U8.one_of(CRITICAL, HIGH, NORMAL, LOW))
    argv: tuple[bytes, ...] = field(BytesList(MAX_ARGV_ITEMS, MAX_ARG_LEN, min_count=1))
    env: tuple[tuple[bytes, bytes], ...] = field(Pairs(MAX_ENV_ITEMS, MAX_ENV_KEY_LEN, MAX_ENV_VALUE_LEN))
    cwd: bytes = field(Bytes(MAX_CWD_LEN))
    stdin: bytes = field(Bytes(MAX_STDIN))
    timeout_ms: int = field(U32)  # 0: the configured default
    output_cap: int = field(U32)  # bytes per stream; 0: the configured default
    capabilities: tuple[bytes, ...] = field(BytesList(MAX_CAPABILITIES, MAX_CAPABILITY_LEN))
    # (path, mode, data) written as the task user before the run; totals capped in config.
    files_in: tuple[tuple[bytes, int, bytes], ...] = field(
        Records(MAX_FILES, Bytes(MAX_PATH_LEN), U16, Bytes(MAX_FILE_IN)), default=())
    collect: tuple[bytes, ...] = field(BytesList(MAX_FILES, MAX_PATH_LEN), default=())  # read after the run
    # Send the output as TaskOutput frames while the command runs; the reply
    # then carries no stdout or stderr (only their flags).
    stream: bool = field(BOOL, default=False)
    # More stdin follows in TaskStdin frames, ended by one with eof.
    stdin_open: bool = field(BOOL, default=False)
    # With net:egress: where the task may connect (domain names with *. wildcards;
    # CIDR:port or CIDR:port-port). Empty: config [egress] default_allow.
    egress_allow: tuple[bytes, ...] = field(BytesList(MAX_EGRESS_RULES, MAX_EGRESS_RULE_LEN), default=())
    # An exec in this open session (its capabilities are the session's; this
    # request's must be empty). "": a one-shot task on a fresh VM.
    session_id: str = field(Str(MAX_SESSION_ID_LEN), default="")


@message(33, DAEMON)
class TaskReply(Message):
    """The one answer to a TaskRequest: a result, or an error code and message."""

    task_id: str = field(Str(MAX_TASK_ID_LEN))
    error_code: str = field(Str(64))  # an ErrorCode, or "" when the command ran (whatever its exit status)
    error_message: str = field(Str(MAX_ERROR_TEXT))
    exit_code: int = field(I32)  # -1 when killed by a signal or not run
    signal: int = field(U8)
    timed_out: bool = field(BOOL)
    stdout: bytes = field(Bytes(MAX_REPLY_OUTPUT))
    stderr: bytes = field(Bytes(MAX_REPLY_OUTPUT))
    stdout_truncated: bool = field(BOOL)
    stderr_truncated: bool = field(BOOL)
    queued_ms: int = field(U32)  # accepted until a VM was assigned
    acquire_ms: int = field(U32)  # assigned until the VM answered (resume + agent)
    run_ms: int = field(U32)  # the command's wall time in the guest
    user_cpu_ms: int = field(U32)
    sys_cpu_ms: int = field(U32)
    max_rss_kib: int = field(U32)
    retry_after_ms: int = field(U32)  # with busy-like errors: when to try again
    outcome: str = field(Str(32), default="not_run")  # protocol.wire.outcomes: one word for what happened
    # One per collect path, in order: (path, error, data, receipt); error "" when collected.
    files_out: tuple[tuple[bytes, str, bytes, bytes], ...] = field(
        Records(MAX_FILES, Bytes(MAX_PATH_LEN), Str(MAX_FILE_ERROR_LEN), Bytes(MAX_COLLECTED), Bytes(MAX_RECEIPT)),
        default=())


@message(34, CLIENT)
class StatusRequest(Message):
    """Ask for queue depth and pool states."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))


@message(35, DAEMON)
class StatusReply(Message):
    """Queue depth per priority (critical, high, normal, low) and VMs per pool state."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))
    queue_depth: tuple[tuple[bytes, bytes], ...] = field(Pairs(8, 16, 16))
    pool: tuple[tuple[bytes, bytes], ...] = field(Pairs(16, 32, 16))
    accepted: int = field(U32)
    answered: int = field(U32)


@message(36, DAEMON)
class TaskOutput(Message):
    """A chunk of a streaming task's stdout (1) or stderr (2), in order; the
    task's one TaskReply comes after its last chunk."""

    task_id: str = field(Str(MAX_TASK_ID_LEN))
    stream: int = field(U8.one_of(STDOUT, STDERR))
    offset: int = field(U64)  # bytes of this stream before this chunk
    data: bytes = field(Bytes(MAX_STREAM_CHUNK))


@message(37, CLIENT)
class TaskStdin(Message):
    """More stdin for a task submitted with stdin_open (same identity);
    `eof` closes the command's stdin. Unknown task: a TaskReply unknown_task."""

    task_id: str = field(Str(MAX_TASK_ID_LEN))
    data: bytes = field(Bytes(MAX_STDIN_CHUNK))
    eof: bool = field(BOOL)


@message(38, CLIENT)
class StreamAck(Message):
    """The caller consumed a streaming task's output up to these offsets:
    corrald sends at most tasks.stream_window_bytes beyond them."""

    task_id: str = field(Str(MAX_TASK_ID_LEN))
    stdout_offset: int = field(U64)
    stderr_offset: int = field(U64)


@message(39, CLIENT)
class TaskAttach(Message):
    """After a lost connection, on a new one (same identity): send this task's
    output again from these offsets, as far as corrald still holds it, then
    its reply. Unknown task (or another identity's): a TaskReply unknown_task."""

    task_id: str = field(Str(MAX_TASK_ID_LEN))
    stdout_offset: int = field(U64)
    stderr_offset: int = field(U64)


# --- sessions: a VM that lives across execs (TaskRequest.session_id) ----------------

@message(42, CLIENT)
class SessionOpen(Message):
    """Open a session: a VM of these capabilities (fixed for its life) that
    keeps its files and processes between execs."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))
    capabilities: tuple[bytes, ...] = field(BytesList(MAX_CAPABILITIES, MAX_CAPABILITY_LEN))
    idle_s: int = field(U32)  # closed after this long without an exec; 0: sessions.default_idle_s
    max_life_s: int = field(U32)  # closed this long after it opened; 0: sessions.default_life_s
    labels: tuple[tuple[bytes, bytes], ...] = field(Pairs(MAX_LABELS, MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN))
    egress_allow: tuple[bytes, ...] = field(BytesList(MAX_EGRESS_RULES, MAX_EGRESS_RULE_LEN), default=())


@message(43, CLIENT)
class SessionClose(Message):
    """Close one of this identity's sessions; its VM is destroyed."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))
    session_id: str = field(Str(MAX_SESSION_ID_LEN))


@message(44, CLIENT)
class SessionList(Message):
    """List this identity's open sessions."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))


@message(45, DAEMON)
class SessionReply(Message):
    """The one answer to a SessionOpen, SessionClose, SessionList,
    SessionPause, SessionResume or SessionFork (same request_id): error_code
    "" on success, else an ErrorCode."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))
    error_code: str = field(Str(64))
    error_message: str = field(Str(MAX_ERROR_TEXT))
    session_id: str = field(Str(MAX_SESSION_ID_LEN))  # opened, closed, paused, resumed, forked; "" for a list
    # A list's sessions, or a fork's new ones: (id, labels as k=v lines, age ms, idle ms, execs run, state).
    sessions: tuple[tuple[str, bytes, int, int, int, str], ...] = field(
        Records(MAX_SESSIONS_LISTED, Str(MAX_SESSION_ID_LEN),
                Bytes(MAX_LABELS * (MAX_LABEL_KEY_LEN + MAX_LABEL_VALUE_LEN + 2)), U64, U64, U32, Str(32)),
        default=())
    retry_after_ms: int = field(U32, default=0)


@message(46, CLIENT)
class SessionPause(Message):
    """Pause one of this identity's sessions to disk: its VM's memory (files,
    processes, all of it) is saved and the VM freed. It stays this identity's,
    paused, until SessionResume (or SessionClose, or its lifetime). Refused
    session_busy while an exec runs in it."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))
    session_id: str = field(Str(MAX_SESSION_ID_LEN))


@message(47, CLIENT)
class SessionResume(Message):
    """Resume a paused session: a VM restored from its saved state, with the
    clock set anew. Answered once execs can run in it again."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))
    session_id: str = field(Str(MAX_SESSION_ID_LEN))


# (48 is a receipt's, never sent: protocol/wire/receipts.py)
@message(49, CLIENT)
class SessionFork(Message):
    """Fork an open or paused session into `count` new sessions (1..MAX_FORKS),
    each starting from the state it has now (files, processes) with randomness,
    clock and VM identity of its own; the same owner, capabilities, egress
    rules, labels, idle time and lifetime. An open session goes on as it was.
    The reply lists the new sessions (SessionReply.sessions); all of them or
    none: a fork that fails leaves no new session behind."""

    request_id: str = field(Str(MAX_TASK_ID_LEN))
    session_id: str = field(Str(MAX_SESSION_ID_LEN))
    count: int = field(U8)


CLIENT_TO_DAEMON = frozenset({TaskRequest, StatusRequest, TaskStdin, StreamAck, TaskAttach,
                              SessionOpen, SessionClose, SessionList, SessionPause, SessionResume, SessionFork})
DAEMON_TO_CLIENT = frozenset({TaskReply, StatusReply, TaskOutput, SessionReply})


def error_reply(task_id: str, code: ErrorCode, text: str, retry_after_ms: int = 0,
                outcome: str = "not_run") -> TaskReply:
    """A reply for a task that did not run (or whose VM failed under it)."""
    return TaskReply(task_id=task_id, error_code=code,
                     error_message=text.encode()[:MAX_ERROR_TEXT].decode(errors="ignore"),
                     exit_code=-1, signal=0, timed_out=False, stdout=b"", stderr=b"",
                     stdout_truncated=False, stderr_truncated=False, queued_ms=0, acquire_ms=0,
                     run_ms=0, user_cpu_ms=0, sys_cpu_ms=0, max_rss_kib=0,
                     retry_after_ms=retry_after_ms, outcome=outcome)


def session_reply(request_id: str, *, session_id: str = "", error_code: str = "", error_message: str = "",
                  sessions: tuple = (), retry_after_ms: int = 0) -> SessionReply:
    """The answer to a SessionOpen, SessionClose or SessionList: `error_code` ""
    on success (`session_id` opened or closed, `sessions` listed), else an
    ErrorCode and its text."""
    return SessionReply(request_id=request_id, error_code=error_code,
                        error_message=error_message.encode()[:MAX_ERROR_TEXT].decode(errors="ignore"),
                        session_id=session_id, sessions=sessions, retry_after_ms=retry_after_ms)
