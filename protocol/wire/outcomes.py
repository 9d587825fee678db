"""Outcome classes: one word in every TaskReply saying what became of the
command, so a harness tells a crash from a hang from memory exhaustion
without parsing text.

When several apply, the first in PRECEDENCE wins: the command's fate first
(the VM died, it ran out of time, the kernel killed it for memory, a signal,
a non-zero exit), then whether the caller saw all of its output. The
truncation flags and exit fields stay in the reply either way.
"""

from __future__ import annotations

from protocol.wire.tasks import ErrorCode

VM_CRASHED = "vm_crashed"  # the VM died or broke the protocol under a running command
TIMED_OUT = "timed_out"  # killed at its timeout (by the agent, or the dead-man's switch)
OOM_KILLED = "oom_killed"  # the guest kernel's OOM killer killed a process of the run
KILLED_BY_SIGNAL = "killed_by_signal"
EXITED_NONZERO = "exited_nonzero"
OUTPUT_TRUNCATED = "output_truncated"  # exited 0, but stdout or stderr went over the cap
COMPLETED = "completed"
NOT_RUN = "not_run"  # refused, cancelled, or no result: the command never produced one
UNKNOWN = "unknown"  # set by the client library alone: the connection dropped before the answer

PRECEDENCE = (VM_CRASHED, TIMED_OUT, OOM_KILLED, KILLED_BY_SIGNAL, EXITED_NONZERO,
              OUTPUT_TRUNCATED, COMPLETED)
ALL = PRECEDENCE + (NOT_RUN, UNKNOWN)

# Errors answered after the command started, by outcome (others are NOT_RUN).
_ERROR_OUTCOMES = {ErrorCode.VM_LOST: VM_CRASHED, ErrorCode.PROTOCOL_VIOLATION: VM_CRASHED,
                   ErrorCode.GUEST_ERROR: VM_CRASHED, ErrorCode.TIMEOUT: TIMED_OUT}


def classify(*, timed_out: bool, oom_killed: bool, signal: int, exit_code: int,
             truncated: bool) -> str:
    """The outcome of a command that ran to an exit status."""
    if timed_out:
        return TIMED_OUT
    if oom_killed:
        return OOM_KILLED
    if signal:
        return KILLED_BY_SIGNAL
    if exit_code != 0:
        return EXITED_NONZERO
    if truncated:
        return OUTPUT_TRUNCATED
    return COMPLETED


def for_error(code: ErrorCode, command_started: bool) -> str:
    """The outcome of a task answered with error `code` and no exit status."""
    return _ERROR_OUTCOMES.get(code, NOT_RUN) if command_started else NOT_RUN
