"""The ``corral`` command line: run, session, exec, cp, status, admin,
keygen, verify.

Both the ``corral`` console script (setup.cfg) and ``python -m protocol.client``
call ``main()``. run, session, exec, cp and status talk to corrald through the
client library (protocol/client/api.py), admin through corrald's control
socket (protocol/client/admin.py); keygen and verify need no corrald at all.

`corral run` writes the command's stdout and stderr as raw bytes while it
runs (the task streams: protocol.client.api.TaskStream) and exits with its
exit status; corral's own notices go to stderr, each starting with
``corral: ``, and its own failures exit with the codes below. It reads its own
stdin only when asked: ``-i`` forwards it as it comes, ``--stdin-file -``
sends it whole with the request. `corral exec ID` is the same in session ID
(one code path: _run_task); `corral session open|ls|close|pause|resume|fork`
and `corral cp` manage sessions and copy files in and out of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

import zmq

from protocol.channel.constants import MAX_STDIN, MAX_STDIN_CHUNK, STDOUT
from protocol.client.api import (RUN_WAIT_DEFAULT_S, RUN_WAIT_MARGIN_S, Client, ClientClosedError, HandshakeError,
                                 Session, SessionError, SessionFileError, StreamBroken, TaskStream, keygen)
from protocol.client.reach import Unreachable
from protocol.wire.tasks import MAX_FORKS, PRIORITY_NAMES, ErrorCode, TaskReply

# Exit codes of `corral run` that are not the command's own.
EXIT_USAGE = 2
EXIT_TIMED_OUT = 124  # as timeout(1)
EXIT_CORRAL_ERROR = 125  # corral itself failed or refused, as `docker run`
EXIT_SIGNAL_BASE = 128  # killed by signal N -> 128 + N, as a shell
EXIT_INTERRUPTED = 130
EXIT_FILE_ERROR = 1  # `corral cp`: a file that cannot be read or written, here or in the session's VM


def _printable(text: str | bytes) -> str:
    """Text from the daemon, safe to print to a terminal (no control sequences)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _notice(message: str) -> None:
    sys.stderr.flush()
    print(f"corral: {message}", file=sys.stderr, flush=True)


def _write_raw(stream, data: bytes) -> None:
    if not data:
        return
    stream.flush()  # keep order with text already written
    raw = getattr(stream, "buffer", None)
    if raw is None:  # a text-only stream (some embedding replaced sys.stdout)
        stream.write(data.decode("utf-8", errors="surrogateescape"))
        stream.flush()
        return
    raw.write(data)
    raw.flush()


def _signal_name(number: int) -> str:
    try:
        return f" ({signal.Signals(number).name})"
    except ValueError:
        return ""


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.1f} s"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of seconds, got {text}")
    return value


def _fork_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_FORKS:
        raise argparse.ArgumentTypeError(f"a fork makes 1 to {MAX_FORKS} new sessions, not {text}")
    return count


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _allow_argument(parser: argparse.ArgumentParser, whose: str) -> None:
    parser.add_argument("--allow", action="append", default=[], metavar="RULE", dest="egress_allow",
                        help=f"with --cap net:egress: where the {whose} may connect, repeatable: a domain "
                             "(pypi.org, '*.pythonhosted.org': HTTP and HTTPS) or CIDR:PORT[-PORT] "
                             "(10.1.2.0/24:5432: TCP); none: corrald's egress.default_allow")


def _parser() -> argparse.ArgumentParser:
    # SUPPRESS: the options work before or after the subcommand without one
    # position's default overwriting the other's value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--endpoint", default=argparse.SUPPRESS,
                        help="corrald's ZeroMQ endpoint (default: daemon.endpoint from the config)")
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="site config (TOML) over config/corral.toml")
    common.add_argument("--server-key", default=argparse.SUPPRESS, metavar="FILE",
                        help="corrald's public key (its .key file, or the Z85 key): connect with CurveZMQ")
    common.add_argument("--key", default=argparse.SUPPRESS, metavar="FILE",
                        help="this client's secret key file (NAME.key_secret from corral keygen)")
    # What a command takes in `corral run` and `corral exec` alike.
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--timeout", type=_positive_float, metavar="S", help="task timeout (default: corrald's)")
    task.add_argument("--output-cap", type=_non_negative_int, default=0, metavar="BYTES",
                      help="bytes kept per output stream (default: corrald's)")
    task.add_argument("--env", type=_key_value, action="append", default=[], metavar="K=V",
                      help="environment variable for the command (repeatable)")
    task.add_argument("--cwd", default="", metavar="DIR", help="working directory in the VM")
    task.add_argument("--stdin-file", metavar="F", help="file to feed to the command's stdin ('-': our stdin, "
                                                        "read whole first); without it or -i the command's stdin "
                                                        "is empty")
    task.add_argument("-i", "--interactive", action="store_true",
                      help=f"forward our stdin to the command as it comes, EOF included, up to {MAX_STDIN} "
                           "bytes (without -i, corral never reads its stdin)")
    task.add_argument("--wait", type=_positive_float, metavar="S",
                      help=f"give up without an answer after S seconds (default: timeout + "
                           f"{RUN_WAIT_MARGIN_S:g} s, or {RUN_WAIT_DEFAULT_S:g} s)")
    task.add_argument("--put", type=_put_item, action="append", default=[], metavar="LOCAL:GUEST[:MODE]",
                      help="copy file LOCAL into the VM at GUEST (octal MODE, default 644) before the run "
                           "(repeatable)")
    task.add_argument("--collect", action="append", default=[], metavar="GUEST",
                      help="bring file GUEST back after the run (repeatable), saved in --out with a signed "
                           "receipt beside it (NAME.receipt)")
    task.add_argument("--out", default=".", metavar="DIR", help="where collected files go (default: .)")
    parser = argparse.ArgumentParser(prog="corral", parents=[common],
                                     description="Run commands in disposable corral sandbox VMs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    exits = (f"corral exits with its exit status (128+N if killed by signal N, {EXIT_TIMED_OUT} if it "
             f"timed out, {EXIT_CORRAL_ERROR} if corral or corrald failed or refused it)")
    run = sub.add_parser(
        "run", parents=[common, task], help="run a command in a sandbox VM",
        usage="%(prog)s [options] -- CMD [ARGS...]",
        description=f"Run CMD in a fresh sandbox VM. Its stdout and stderr are written as raw bytes and {exits}.")
    run.add_argument("--priority", choices=list(PRIORITY_NAMES), default="normal")
    run.add_argument("--cap", action="append", default=[], metavar="CAP", dest="capabilities",
                     help="capability to ask for, e.g. net:egress (repeatable)")
    _allow_argument(run, "task")
    run.add_argument("command_argv", nargs=argparse.REMAINDER, metavar="CMD")
    session = sub.add_parser("session", parents=[common], help="open, list, close, pause, resume or fork "
                                                               "sessions: VMs kept across execs (corral exec, "
                                                               "corral cp)")
    session_sub = session.add_subparsers(dest="session_command", metavar="open|ls|close|pause|resume|fork",
                                         required=True)
    session_open = session_sub.add_parser(
        "open", parents=[common], help="open a session and print its id",
        description="Open a session: a sandbox VM kept for you across `corral exec`s, its files and "
                    "background processes with it, until you close it, it is idle for its idle time or its "
                    "lifetime is over. Prints the session's id alone on the last line.")
    session_open.add_argument("--cap", action="append", default=[], metavar="CAP", dest="capabilities",
                              help="capability the session's VM has, fixed for its life (repeatable)")
    _allow_argument(session_open, "session's execs")
    session_open.add_argument("--idle", type=_positive_int, metavar="S",
                              help="close it after S seconds without an exec (default: corrald's)")
    session_open.add_argument("--life", type=_positive_int, metavar="S",
                              help="close it S seconds after it opened (default: corrald's)")
    session_open.add_argument("--label", type=_key_value, action="append", default=[], metavar="K=V",
                              help="a label its listings show (repeatable)")
    session_sub.add_parser("ls", parents=[common],
                           help="your sessions: id, age, idle time, execs, state (open, paused, ...), labels")
    session_close = session_sub.add_parser("close", parents=[common], help="close a session (its VM is destroyed)")
    session_close.add_argument("session_id", metavar="ID")
    session_pause = session_sub.add_parser(
        "pause", parents=[common], help="pause a session to disk (its VM freed, files and processes kept)",
        description="Pause session ID to disk: its VM's memory, files and processes with it, is saved and the "
                    "VM freed. Execs in it are refused (session_paused) until `corral session resume ID`; its "
                    "idle time stops, its lifetime does not. Refused session_busy while an exec runs in it.")
    session_pause.add_argument("session_id", metavar="ID")
    session_resume = session_sub.add_parser(
        "resume", parents=[common], help="resume a paused session",
        description="Resume paused session ID in a VM restored from what its pause saved; answered once execs "
                    "can run in it again.")
    session_resume.add_argument("session_id", metavar="ID")
    session_fork = session_sub.add_parser(
        "fork", parents=[common], help="fork a session into N new ones and print their ids",
        description="Fork open or paused session ID into N new sessions, each starting from its files and "
                    "processes now, with randomness, clock and VM of its own (the same capabilities, labels, "
                    "idle time and lifetime). All or none. Prints each new session's id alone on its own line.")
    session_fork.add_argument("session_id", metavar="ID")
    session_fork.add_argument("-n", type=_fork_count, default=1, metavar="N", dest="count",
                              help=f"how many new sessions (1 to {MAX_FORKS}; default 1)")
    exec_ = sub.add_parser(
        "exec", parents=[common, task], help="run a command in a session",
        usage="%(prog)s ID [options] -- CMD [ARGS...]",
        description="Run CMD in session ID's VM, where files and processes of earlier execs still are. "
                    f"As `corral run`: its output is written as it comes and {exits}; a session that is not "
                    f"open exits {EXIT_CORRAL_ERROR} with `corral: error session_not_found: ...`.")
    exec_.add_argument("session_id", metavar="ID")
    # Not REMAINDER: options may follow ID; the command is what follows `--` (_parse_args).
    exec_.add_argument("command_argv", nargs="*", metavar="CMD")
    cp = sub.add_parser(
        "cp", parents=[common], help="copy a file into or out of a session",
        usage="%(prog)s [options] LOCAL ID:/PATH | ID:/PATH LOCAL",
        description="Copy file LOCAL into session ID's VM at /PATH (with LOCAL's permission bits), or /PATH "
                    "out of it to LOCAL (a directory: the file keeps its name). LOCAL '-' is our stdin or "
                    f"stdout. Exits 0 when copied, {EXIT_FILE_ERROR} when a file cannot be read or written "
                    f"(here or in the VM), {EXIT_CORRAL_ERROR} when corral or corrald failed or refused "
                    "(session_not_found: the session is not open). A local path with a ':' before its "
                    "first '/' is written ./PATH.")
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("destination", metavar="DST")
    cp.add_argument("--timeout", type=_positive_float, metavar="S", help="timeout of the copy in the VM")
    sub.add_parser("status", parents=[common], help="queue depth, pool VMs and task counts")
    admin = sub.add_parser(
        "admin", parents=[common],
        help="operators: status, scram, resume, drain, pool-size, sessions, session-close, fault",
        usage="%(prog)s [--control EP] COMMAND [ARGS...]",
        description="Drive corrald's control socket (operators only: corrald's own user).")
    admin.add_argument("--control", metavar="EP", help="control endpoint (default: control.endpoint)")
    admin.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S")
    admin.add_argument("admin_argv", nargs=argparse.REMAINDER, metavar="COMMAND")
    keygen = sub.add_parser("keygen", help="write a CurveZMQ key pair: NAME.key (public) and "
                                           "NAME.key_secret (secret, mode 0600)")
    keygen.add_argument("name", metavar="NAME", help="the identity's name (corrald's own: corrald)")
    keygen.add_argument("--dir", default=".", metavar="D", help="where to write the files (default: .)")
    verify = sub.add_parser(
        "verify", parents=[common], help="check a collected file against its signed receipt, offline",
        description="Check that RECEIPT (default ARTIFACT.receipt) is a valid signature by corrald's host "
                    "key over ARTIFACT. Exits 0 when it is, 1 when it is not (the reason on stderr).")
    verify.add_argument("artifact", metavar="ARTIFACT")
    verify.add_argument("receipt", nargs="?", metavar="RECEIPT")
    verify.add_argument("--host-key", metavar="PUB", help="corrald's receipt-signing public key (PEM; "
                                                          "default: <artifacts key_file>.pub from the config)")
    verify.add_argument("--expect-exit", type=int, metavar="N",
                        help="also reject unless the task exited with status N")
    return parser


def _cmd_keygen(args: argparse.Namespace) -> int:
    try:
        public_path, secret_path = keygen(args.name, args.dir)
    except (ValueError, OSError) as exc:
        _notice(f"keygen: {exc}")
        return EXIT_CORRAL_ERROR
    print(f"public key: {public_path}\nsecret key: {secret_path} (mode 0600: keep it to its owner)")
    return 0


def _put_item(text: str) -> tuple[str, str, int]:
    local, sep, rest = text.partition(":")
    guest, _, mode = rest.partition(":")
    if not (sep and local and guest):
        raise argparse.ArgumentTypeError(f"expected LOCAL:GUEST[:MODE], got {text!r}")
    try:
        return local, guest, int(mode or "644", 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"mode {mode!r} is not octal") from None


def _read_stdin_file(name: str) -> bytes:
    # One byte over the limit is enough to know it does not fit.
    if name == "-":
        return sys.stdin.buffer.read(MAX_STDIN + 1)
    with open(name, "rb") as f:
        return f.read(MAX_STDIN + 1)


def _report_task(reply: TaskReply, requested_timeout_s: float | None, streamed: bool = False) -> int:
    """Write what output the reply holds and the notices; return corral's
    exit code. ``streamed``: output already came as chunks."""
    ran = reply.error_code == ""
    timed_out_with_result = reply.error_code == ErrorCode.TIMEOUT and (
        reply.timed_out or reply.stdout or reply.stderr or reply.signal or streamed)
    if not (ran or timed_out_with_result):
        retry = f"; retry after {reply.retry_after_ms / 1000:g} s" if reply.retry_after_ms > 0 else ""
        outcome = f" (outcome {_printable(reply.outcome)})" if reply.outcome != "not_run" else ""
        _notice(f"error {_printable(reply.error_code)}: {_printable(reply.error_message)}{retry}{outcome}")
        return EXIT_CORRAL_ERROR
    if reply.outcome == "oom_killed":
        _notice("outcome oom_killed: the guest kernel's out-of-memory killer killed a process of the command")
    _write_raw(sys.stdout, reply.stdout)
    _write_raw(sys.stderr, reply.stderr)
    for stream, truncated in (("stdout", reply.stdout_truncated), ("stderr", reply.stderr_truncated)):
        if truncated:
            _notice(f"output truncated ({stream})")
    if reply.timed_out or timed_out_with_result:
        if reply.run_ms:
            _notice(f"timed out after {_seconds(reply.run_ms)}")
        elif requested_timeout_s is not None:
            _notice(f"timed out after {requested_timeout_s:.1f} s")
        else:
            _notice("timed out")
        return EXIT_TIMED_OUT
    if reply.signal:
        _notice(f"command killed by signal {reply.signal}{_signal_name(reply.signal)}")
        return EXIT_SIGNAL_BASE + reply.signal
    if 0 <= reply.exit_code <= 255:
        return reply.exit_code
    _notice(f"corrald reported an impossible exit status {reply.exit_code}")
    return EXIT_CORRAL_ERROR


def _save_collected(reply: TaskReply, out_dir: str) -> None:
    """Each collected file as OUT/<name> with OUT/<name>.receipt; errors as notices."""
    used = set()
    for path, error, data, receipt in reply.files_out:
        shown = _printable(path)
        if error:
            _notice(f"collect {shown}: {_printable(error)}")
            continue
        name = os.path.basename(os.fsdecode(path))
        if name in ("", ".", ".."):  # never from a valid request: do not write outside --out
            name = "file"
        base, n = name, 1
        while name in used:
            n += 1
            name = f"{base}.{n}"
        used.add(name)
        target = os.path.join(out_dir, name)
        with open(target, "wb") as f:
            f.write(data)
        if receipt:
            with open(target + ".receipt", "wb") as f:
                f.write(receipt)
        _notice(f"collected {shown} -> {target}{' (+ .receipt)' if receipt else ' (unsigned)'}")


def _silence_stdout() -> None:
    """Our stdout to /dev/null: Python's flush at exit would fail on the broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (embedded): nothing to flush there
        pass


def _stdin_reader():
    """read(n) on our stdin returning what is there now (up to n bytes, b""
    at EOF), or None without a stdin. The file descriptor itself where there
    is one: a read blocked in sys.stdin's buffer holds its lock, and Python
    aborts at exit when a daemon thread holds it."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):  # None, closed, or not a file (embedded)
        source = getattr(sys.stdin, "buffer", None)
        return None if source is None else getattr(source, "read1", source.read)
    return lambda size: os.read(fd, size)


def _forward_stdin(task: TaskStream) -> None:
    """-i, on its own thread: our stdin to the command's as it comes, in
    chunks of at most 64 KiB, then EOF; past MAX_STDIN in all, a notice and
    EOF there. Ends with the task too (a write after its end is dropped)."""
    try:
        read = _stdin_reader()
        if read is not None:
            while not task.done():
                data = read(MAX_STDIN_CHUNK)
                if not data:
                    break
                room = MAX_STDIN - task.stdin_sent
                if len(data) > room:
                    task.write(data[:room])
                    _notice(f"stdin is over the limit of {MAX_STDIN} bytes per task: the command's stdin "
                            "was closed there")
                    break
                task.write(data)
    except (OSError, ValueError) as exc:  # our stdin failed (or was closed under us)
        _notice(f"cannot read stdin: {exc}; the command's stdin was closed")
    finally:
        task.close_stdin()


def _stream_output(task: TaskStream, wait_s: float) -> bool:
    """Write the task's output as it comes, stdout to ours and stderr to
    ours, byte for byte; True if any came. TimeoutError after wait_s."""
    streamed = False
    try:
        for chunk in task.chunks(wait_s):
            _write_raw(sys.stdout if chunk.stream == STDOUT else sys.stderr, chunk.data)
            streamed = True
    except TimeoutError:
        task.abandon()
        raise
    return streamed


def _cmd_run(client: Client, args: argparse.Namespace) -> int:
    return _run_task(client, args, "corral run [options] -- CMD [ARGS...]", priority=args.priority,
                     capabilities=args.capabilities, egress_allow=args.egress_allow)


def _cmd_exec(client: Client, args: argparse.Namespace) -> int:
    return _run_task(client, args, "corral exec ID [options] -- CMD [ARGS...]", session_id=args.session_id)


def _run_task(client: Client, args: argparse.Namespace, usage: str, **where) -> int:
    """`corral run` and `corral exec`: send the command (`where`: a fresh
    VM's priority and capabilities, or the session it runs in), write its
    output as it comes, save what it collected; the exit code to return."""
    command = args.command_argv  # what followed `--` (_parse_args)
    if not command:
        _notice(f"{args.command} needs a command: {usage}")
        return EXIT_USAGE
    if args.interactive and args.stdin_file is not None:
        _notice("-i and --stdin-file both give the command's stdin: use one")
        return EXIT_USAGE
    stdin = b""
    if args.stdin_file is not None:
        try:
            stdin = _read_stdin_file(args.stdin_file)
        except OSError as exc:
            _notice(f"cannot read --stdin-file {args.stdin_file}: {exc.strerror}")
            return EXIT_CORRAL_ERROR
        if len(stdin) > MAX_STDIN:
            _notice(f"stdin is over the limit of {MAX_STDIN} bytes")
            return EXIT_CORRAL_ERROR
    files_in = []
    for local, guest, mode in args.put:
        try:
            with open(local, "rb") as f:
                files_in.append((guest, f.read(), mode))
        except OSError as exc:
            _notice(f"cannot read --put file {local}: {exc.strerror}")
            return EXIT_CORRAL_ERROR
    if args.collect and not os.path.isdir(args.out):
        _notice(f"--out {args.out} is not a directory")
        return EXIT_CORRAL_ERROR
    try:
        task = client.stream(command, env=args.env, cwd=args.cwd, stdin=stdin, stdin_open=args.interactive,
                             timeout_s=args.timeout, output_cap=args.output_cap, files_in=files_in,
                             collect=args.collect, **where)
    except (TypeError, ValueError) as exc:  # the protocol cannot carry it (e.g. too long)
        _notice(f"cannot send this task: {exc}")
        return EXIT_CORRAL_ERROR
    if args.interactive:
        # A daemon thread: a read blocked on a terminal must not keep corral
        # alive once the command has ended.
        threading.Thread(target=_forward_stdin, args=(task,), name="corral stdin", daemon=True).start()
    wait_s = args.wait
    if wait_s is None:
        wait_s = RUN_WAIT_DEFAULT_S if args.timeout is None else args.timeout + RUN_WAIT_MARGIN_S
    try:
        streamed = _stream_output(task, wait_s)
    except StreamBroken as exc:
        task.abandon()
        _notice(f"error stream_broken: {exc}")
        return EXIT_CORRAL_ERROR
    except BrokenPipeError:  # our reader went away (`corral run -- yes | head`): end as a shell would
        task.abandon()
        _silence_stdout()
        return EXIT_SIGNAL_BASE + signal.SIGPIPE
    reply = task.reply()  # the iteration ended: it is there (or the reason it never came is)
    code = _report_task(reply, args.timeout, streamed)
    try:
        _save_collected(reply, args.out)
    except OSError as exc:
        _notice(f"cannot save a collected file: {exc}")
        return EXIT_CORRAL_ERROR
    return code


def _session_failed(exc: SessionError) -> int:
    retry = f"; retry after {exc.retry_after_ms / 1000:g} s" if exc.retry_after_ms > 0 else ""
    _notice(f"error {_printable(str(exc))}{retry}")
    return EXIT_CORRAL_ERROR


def _cmd_session(client: Client, args: argparse.Namespace) -> int:
    if args.session_command == "open":
        session = client.session(args.capabilities, idle_s=args.idle, life_s=args.life, labels=args.label,
                                 egress_allow=args.egress_allow)
        print(session.session_id)
        return 0
    if args.session_command == "close":
        client.close_session(args.session_id)
        return 0
    if args.session_command == "pause":
        client.pause_session(args.session_id)
        return 0
    if args.session_command == "resume":
        client.resume_session(args.session_id)
        return 0
    if args.session_command == "fork":
        for session_id in client.fork_session(args.session_id, args.count):
            print(session_id)
        return 0
    sessions = client.sessions()
    if not sessions:
        print("no sessions")
        return 0
    rows = [("ID", "AGE", "IDLE", "EXECS", "STATE", "LABELS")]
    rows += [(s.session_id, f"{s.age_s:.0f}s", f"{s.idle_s:.0f}s", str(s.execs), _printable(s.state),
              _printable(",".join(f"{k}={v}" for k, v in s.labels.items())))
             for s in sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def _in_session(arg: str) -> tuple[str, str] | None:
    """(session id, guest path) for ID:/PATH, or None for a local path."""
    head, sep, tail = arg.partition(":")
    if sep and head and "/" not in head and tail.startswith("/"):
        return head, tail
    return None


def _cmd_cp(client: Client, args: argparse.Namespace) -> int:
    source, destination = _in_session(args.source), _in_session(args.destination)
    if (source is None) == (destination is None):
        _notice("cp copies between here and a session: corral cp LOCAL ID:/PATH or corral cp ID:/PATH LOCAL")
        return EXIT_USAGE
    if destination is not None:
        session_id, path = destination
        try:
            if args.source == "-":
                data, mode = sys.stdin.buffer.read(), 0o644
            else:
                with open(args.source, "rb") as f:
                    data, mode = f.read(), os.fstat(f.fileno()).st_mode & 0o777
        except OSError as exc:
            _notice(f"cannot read {args.source}: {exc.strerror}")
            return EXIT_FILE_ERROR
        try:
            Session(client, session_id).put(path, data, mode, timeout_s=args.timeout)
        except (TypeError, ValueError) as exc:  # the protocol cannot carry it (e.g. too large)
            _notice(f"cannot send {args.source}: {exc}")
            return EXIT_CORRAL_ERROR
        return 0
    session_id, path = source
    try:
        data = Session(client, session_id).get(path, timeout_s=args.timeout)
    except SessionFileError as exc:
        _notice(_printable(str(exc)))
        return EXIT_FILE_ERROR
    target = args.destination
    try:
        if target == "-":
            _write_raw(sys.stdout, data)
            return 0
        if os.path.isdir(target):
            target = os.path.join(target, os.path.basename(path.rstrip("/")) or "file")
        with open(target, "wb") as f:
            f.write(data)
    except OSError as exc:
        _notice(f"cannot write {target}: {exc.strerror}")
        return EXIT_FILE_ERROR
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """Offline: no corrald needed, only the host's public key."""
    from protocol.wire import receipts  # cryptography only for this command

    key_path = args.host_key
    if key_path is None:
        import config

        cfg = config.load(getattr(args, "config", None))
        key_path = str(cfg.artifacts.key_path(cfg.state_dir)) + ".pub"
    receipt_path = args.receipt or args.artifact + ".receipt"
    try:
        with open(args.artifact, "rb") as f:
            artifact = f.read()
        with open(receipt_path, "rb") as f:
            receipt = f.read(receipts.MAX_RECEIPT + 1)
        body = receipts.verify(artifact, receipt, receipts.load_public_key(key_path))
        if args.expect_exit is not None and (body.signal or body.exit_code != args.expect_exit):
            raise receipts.ReceiptInvalid(
                f"the task's exit status was {body.exit_code} (signal {body.signal}, outcome {body.outcome}), "
                f"not {args.expect_exit}")
    except OSError as exc:
        _notice(f"REJECTED {args.artifact}: cannot read {exc.filename}: {exc.strerror}")
        return 1
    except receipts.ReceiptInvalid as exc:
        _notice(f"REJECTED {args.artifact}: {exc}")
        return 1
    command = " ".join(_printable(a) for a in body.command)
    print(f"verified {args.artifact}: {_printable(body.path)} from task {_printable(body.task_id)} "
          f"({command}), outcome {body.outcome}, exit {body.exit_code}, signal {body.signal}, "
          f"sha256 {body.sha256.hex()}")
    return 0


def _cmd_status(client: Client) -> int:
    reply = client.status()
    queue = [(_printable(name), _printable(depth)) for name, depth in reply.queue_depth]
    pool = [(_printable(state), _printable(count)) for state, count in reply.pool]
    rows = [("queue", "tasks"), *(("  " + n, v) for n, v in queue),
            ("pool", "VMs"), *(("  " + n, v) for n, v in pool)]
    width = max(len(name) for name, _ in rows) + 2
    value_width = max(len(value) for _, value in rows)
    lines = [f"corrald at {client.endpoint}"]
    lines += [f"{name:<{width}}{value:>{value_width}}" for name, value in rows]
    lines.append(f"tasks accepted {reply.accepted}, answered {reply.answered}")
    print("\n".join(lines))
    return 0


def _cmd_admin(args: argparse.Namespace) -> int:
    import config
    from protocol.client.admin import admin_main

    endpoint = args.control
    if endpoint is None:
        try:
            endpoint = config.load(getattr(args, "config", None)).control.endpoint
        except config.ConfigError as exc:
            _notice(str(exc))
            return EXIT_USAGE
    return admin_main(endpoint, args.admin_argv, args.timeout)


def _parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """argv parsed; for run and exec everything after the first `--` is the
    command, whatever it looks like (argparse would take options of its own
    out of it, or for exec, with options after ID, the options into it)."""
    if "--" in argv:
        split = argv.index("--")
        if {"run", "exec"} & set(argv[:split]):
            args = parser.parse_args(argv[:split])
            if hasattr(args, "command_argv"):
                before = list(args.command_argv)  # `corral run ls -- x`: the command is `ls -- x`
                args.command_argv = before + ["--"] + argv[split + 1:] if before else argv[split + 1:]
                return args
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`corral COMMAND ...`; returns the process exit code."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        args = _parse_args(parser, argv)
    except SystemExit as exc:  # argparse already printed why
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    import config

    if args.command == "keygen":
        return _cmd_keygen(args)
    if args.command == "verify":
        try:
            return _cmd_verify(args)
        except config.ConfigError as exc:
            _notice(str(exc))
            return EXIT_USAGE
    # Warnings from the client (e.g. a malformed reply) read as corral notices.
    logging.basicConfig(level=logging.WARNING, format="corral: %(message)s")
    if args.command == "admin":
        return _cmd_admin(args)
    endpoint = getattr(args, "endpoint", None)
    try:
        client = Client(endpoint, config_path=getattr(args, "config", None),
                        server_key=getattr(args, "server_key", None), client_key=getattr(args, "key", None))
    except (config.ConfigError, ValueError) as exc:  # each names the key or argument and what is allowed
        _notice(str(exc))
        return EXIT_USAGE
    except zmq.ZMQError as exc:
        _notice(f"cannot use endpoint {endpoint}: {exc}")
        return EXIT_CORRAL_ERROR
    try:
        with client:
            if args.command == "run":
                return _cmd_run(client, args)
            if args.command == "exec":
                return _cmd_exec(client, args)
            if args.command == "session":
                return _cmd_session(client, args)
            if args.command == "cp":
                return _cmd_cp(client, args)
            return _cmd_status(client)
    except SessionError as exc:
        return _session_failed(exc)
    except (TimeoutError, ClientClosedError) as exc:
        _notice(str(exc))
        return EXIT_CORRAL_ERROR
    except (HandshakeError, Unreachable) as exc:
        _notice(f"error {exc.code}: {exc}")
        return EXIT_CORRAL_ERROR
    except KeyboardInterrupt:
        _notice("interrupted")
        return EXIT_INTERRUPTED

