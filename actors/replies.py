"""The answer a task gets once its command has run: built from what the VM
reported (its Exit, the output the host kept, the files collected) and the
task's own times. Plain functions, no actor: the Supervisor
(actors/supervisor.py) calls them; tests call them with made-up reports.

Answers for tasks that did not run, or whose VM failed under them, are
protocol.wire.tasks.error_reply.
"""

from __future__ import annotations

from actors.artifacts.files import files_out
from actors.artifacts.signing import Signer
from actors.messages import Task
from protocol.channel import codec, messages as guest
from protocol.wire import outcomes
from protocol.wire.tasks import ErrorCode, TaskReply


def whole_ms(seconds: float) -> int:
    """`seconds` in whole milliseconds, never below 0."""
    return max(0, int(seconds * 1000))


def exit_reply(task: Task, exit_message: guest.Exit, stdout: bytes, stderr: bytes,
               assigned_at: float, acquired_at: float) -> TaskReply:
    """The reply to `task`, whose command ran to `exit_message` (its truncation
    flags already set where the host cut the output too). `assigned_at` and
    `acquired_at` are monotonic times: a VM was given the task, the VM answered."""
    request = task.request
    timed_out = exit_message.timed_out
    outcome = outcomes.classify(
        timed_out=timed_out, oom_killed=exit_message.oom_killed, signal=exit_message.signal,
        exit_code=exit_message.exit_code,
        truncated=exit_message.stdout_truncated or exit_message.stderr_truncated)
    return TaskReply(
        task_id=request.task_id,
        error_code=ErrorCode.TIMEOUT if timed_out else "",
        error_message=f"the command ran past its timeout of {request.timeout_ms / 1000:g} s "
                      "and was killed" if timed_out else "",
        exit_code=exit_message.exit_code, signal=exit_message.signal, timed_out=timed_out,
        stdout=stdout, stderr=stderr,
        stdout_truncated=exit_message.stdout_truncated,
        stderr_truncated=exit_message.stderr_truncated,
        queued_ms=whole_ms(assigned_at - task.accepted_at),
        acquire_ms=whole_ms(acquired_at - assigned_at),
        run_ms=exit_message.wall_ms, user_cpu_ms=exit_message.user_cpu_ms,
        sys_cpu_ms=exit_message.sys_cpu_ms, max_rss_kib=exit_message.max_rss_kib,
        retry_after_ms=0, outcome=outcome)


def with_files(reply: TaskReply, task: Task, results: list[tuple[bytes, str, bytes]],
               signer: Signer | None) -> TaskReply:
    """`reply` with the files collected for `task`: (path, error, data) in
    request order, each file signed (a receipt) unless it has an error."""
    request = task.request
    return codec.replace(reply, files_out=files_out(
        results, signer, request.task_id, request.argv, reply.outcome, reply.exit_code, reply.signal))
