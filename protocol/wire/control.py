"""The operator protocol: what `corral admin` and corrald's control socket say.

Same bounded codec as the caller protocol (protocol.channel.codec), its own type
ids (40 and up) and its own tag, on its own socket: a caller's message is
never taken for an operator's, nor the reverse. A ZeroMQ message is
[empty delimiter, CONTROL_TAG, payload] both ways (protocol.wire.envelope).

Commands (AdminRequest.command, arguments as text in `args`):
    status                  mode, queue depth, pool, counters
    scram [REASON]          pause every VM, flush the queue, refuse new work
    resume                  leave safe mode (or draining) and serve again
    drain                   refuse new work, let queued and running tasks finish
    pool-size N             keep N warm VMs
    sessions                every session: owner, state, age, idle time, VM, execs, labels
    session-close ID        end a session whoever owns it (its VM is destroyed)
    fault KIND [TARGET]     inject a fault (only when control.faults is true)
"""

from __future__ import annotations


from protocol.channel.codec import BOOL, BytesList, Message, Pairs, Str, field, message

CONTROL_TAG = b"corral-admin/1"
OPERATOR = "operator"
DAEMON = "daemon"

MAX_REQUEST_ID_LEN = 64
MAX_COMMAND_LEN = 32
MAX_ARGS = 8
MAX_ARG_LEN = 256
MAX_MESSAGE_LEN = 4096
MAX_FIELDS = 256
MAX_FIELD_NAME_LEN = 64
MAX_FIELD_VALUE_LEN = 1024

COMMANDS = ("status", "scram", "resume", "drain", "pool-size", "sessions", "session-close", "fault")


@message(40, OPERATOR)
class AdminRequest(Message):
    request_id: str = field(Str(MAX_REQUEST_ID_LEN))
    command: str = field(Str(MAX_COMMAND_LEN))
    args: tuple[bytes, ...] = field(BytesList(MAX_ARGS, MAX_ARG_LEN))


@message(41, DAEMON)
class AdminReply(Message):
    """`ok` false: `error_code` says why (unknown_command, invalid_argument,
    faults_disabled, ...). `fields` are ordered name/value pairs for display."""

    request_id: str = field(Str(MAX_REQUEST_ID_LEN))
    ok: bool = field(BOOL)
    error_code: str = field(Str(64))
    message: str = field(Str(MAX_MESSAGE_LEN))
    fields: tuple[tuple[bytes, bytes], ...] = field(
        Pairs(MAX_FIELDS, MAX_FIELD_NAME_LEN, MAX_FIELD_VALUE_LEN))


OPERATOR_TO_DAEMON = frozenset({AdminRequest})
DAEMON_TO_OPERATOR = frozenset({AdminReply})


def admin_reply(request_id: str, text: str, fields: dict | None = None,
                error_code: str = "") -> AdminReply:
    """A reply with `fields` rendered as text, cut to the wire bounds."""
    pairs = tuple((str(k).encode()[:MAX_FIELD_NAME_LEN], str(v).encode()[:MAX_FIELD_VALUE_LEN])
                  for k, v in (fields or {}).items())[:MAX_FIELDS]
    return AdminReply(request_id=request_id, ok=not error_code, error_code=error_code,
                      message=text.encode()[:MAX_MESSAGE_LEN].decode(errors="ignore"), fields=pairs)
