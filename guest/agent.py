"""corral guest agent: PID 1 of every guest VM.

Runs from the read-only agent ISO (standard library only). It speaks the
SecureChannel protocol to the host over one virtio-serial port: says Hello,
then runs Exec requests as the unprivileged task user, streams Output, reports
Exit with resource use, answers Heartbeat, and on Reset kills every process of
the task user and wipes its writable places.

The host is the authority: the agent trusts what the host sends, and the host
trusts nothing the agent sends. A host frame the agent cannot decode ends the
VM (the host then replaces it) rather than guessing where the stream resumes.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib

if __package__ in (None, ""):  # run as a script from the ISO: make `protocol` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocol import messages
from protocol.errors import ProtocolError
from protocol.frame import FrameDecoder, FrameEncoder

AGENT_VERSION = "0.1"
PORT_NAME = "org.corral.agent.0"
TASK_USER = "task"
READ_CHUNK = 64 * 1024
OUTPUT_CHUNK = 64 * 1024
# After the task's main process exits, how long its pipes may stay open (held by
# a background child) before the rest of its process group is killed.
DRAIN_GRACE_S = 0.05
# Places a task may have written to that Reset wipes.
WIPE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
DEFAULT_PATH = b"/usr/local/bin:/usr/bin:/bin"


def log(message: str) -> None:
    """Best-effort diagnostics to the guest kernel log (there is no console)."""
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write(f"corral-agent: {message}\n")
    except OSError:
        pass


def find_port(name: str = PORT_NAME, wait_s: float = 5.0) -> str:
    """No udev in the guest: find /dev/vportNpM by the port name in sysfs."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            for entry in os.listdir("/sys/class/virtio-ports"):
                with open(f"/sys/class/virtio-ports/{entry}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{entry}"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial port {name} not found")
        time.sleep(0.01)


def power_off() -> None:
    os.sync()
    try:
        ctypes.CDLL(None).reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    finally:
        os._exit(1)


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def reap_orphans(keep: set[int]) -> None:
    """As PID 1 the agent inherits every orphan; reap the zombies among them
    without touching the task process the exec thread waits for."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in keep:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] == "Z" and fields[1] == "1":
                os.waitpid(int(entry), os.WNOHANG)
        except (OSError, IndexError, ChildProcessError):
            pass


class Channel:
    """The agent's end of the SecureChannel: framing, sequence ids, one writer at a time."""

    def __init__(self, fd: int):
        self.fd = fd
        self.encoder = FrameEncoder(zlib.crc32)
        self.decoder = FrameDecoder(zlib.crc32)
        self.write_lock = threading.Lock()

    def send(self, message) -> None:
        payload = messages.encode(message)
        with self.write_lock:  # sequence ids must go out in the order they are given
            data = memoryview(self.encoder.encode(payload))
            while data:
                # Blocks while the host does not read: that is the backpressure.
                written = os.write(self.fd, data)
                data = data[written:]

    def receive(self):
        """Yield host messages forever; while no host is connected read() gives EOF."""
        while True:
            data = os.read(self.fd, READ_CHUNK)
            if not data:
                time.sleep(0.005)
                continue
            for payload in self.decoder.feed(data):
                yield messages.decode(payload, messages.HOST_TO_GUEST)


class ExecRun(threading.Thread):
    """One task process: spawn as the task user, stream its output, enforce its timeout."""

    def __init__(self, agent: "Agent", request: messages.Exec):
        super().__init__(name=f"exec-{request.exec_id}", daemon=True)
        self.agent = agent
        self.request = request
        self.proc: subprocess.Popen | None = None

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _environment(self, home: bytes, user: bytes) -> dict[bytes, bytes]:
        env = {b"PATH": DEFAULT_PATH, b"HOME": home, b"USER": user, b"LOGNAME": user,
               b"LANG": b"C.UTF-8"}
        env.update(dict(self.request.env))
        return env

    def run(self) -> None:
        request = self.request
        try:
            exit_message = self._run()
        except Exception as e:  # the host must always get an answer for an Exec
            log(f"exec {request.exec_id} failed: {e!r}")
            detail = str(e).encode()[:messages.MAX_ERROR_MESSAGE_LEN].decode(errors="ignore")
            exit_message = messages.Error(code="exec_failed", message=detail)
        self.agent.exec_finished(self, exit_message)

    def _run(self):
        request = self.request
        account = pwd.getpwuid(0) if request.as_root else pwd.getpwnam(TASK_USER)
        home = account.pw_dir.encode()
        started = time.monotonic()
        # Under the spawn lock until tracked: the reaper must not take this
        # child for an orphan (every child of PID 1 has PPid 1).
        spawn_error = None
        with self.agent.spawn_lock:
            try:
                self.proc = subprocess.Popen(
                    list(request.argv),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=request.cwd or home,
                    env=self._environment(home, account.pw_name.encode()),
                    user=account.pw_uid, group=account.pw_gid, extra_groups=[],
                    start_new_session=True, close_fds=True, umask=0o022,
                )
                self.agent.track(self.proc.pid)
            except OSError as e:
                spawn_error = e
        if spawn_error is not None:
            # Like a shell: command not found is 127, not executable 126.
            code = 127 if isinstance(spawn_error, FileNotFoundError) else 126
            # The missing file may be the command or the working directory.
            name = os.fsdecode(spawn_error.filename or request.argv[0])
            self.agent.channel.send(messages.Output(
                exec_id=request.exec_id, stream=2,
                data=f"corral-agent: {name}: {spawn_error.strerror}\n".encode(errors="surrogateescape")))
            return messages.Exit(exec_id=request.exec_id, exit_code=code, signal=0, timed_out=False,
                                 stdout_truncated=False, stderr_truncated=False,
                                 wall_ms=int((time.monotonic() - started) * 1000),
                                 user_cpu_ms=0, sys_cpu_ms=0, max_rss_kib=0)
        threading.Thread(target=self._feed_stdin, daemon=True).start()
        deadline = started + request.timeout_ms / 1000 if request.timeout_ms else None
        timed_out, truncated = self._pump_output(deadline)
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        self.agent.untrack(self.proc.pid)
        self.agent.reap()  # the killed group's orphans, now
        wall_ms = int((time.monotonic() - started) * 1000)
        signalled = os.WIFSIGNALED(status)
        return messages.Exit(
            exec_id=request.exec_id,
            exit_code=-1 if signalled else os.WEXITSTATUS(status),
            signal=os.WTERMSIG(status) if signalled else 0,
            timed_out=timed_out,
            stdout_truncated=truncated[1], stderr_truncated=truncated[2],
            wall_ms=wall_ms,
            user_cpu_ms=int(usage.ru_utime * 1000), sys_cpu_ms=int(usage.ru_stime * 1000),
            max_rss_kib=usage.ru_maxrss,
        )

    def _feed_stdin(self) -> None:
        try:
            if self.request.stdin:
                self.proc.stdin.write(self.request.stdin)
        except OSError:
            pass  # the task closed its stdin early: its choice
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _pump_output(self, deadline: float | None) -> tuple[bool, dict[int, bool]]:
        """Forward stdout (1) and stderr (2) until both close; past the cap, drain and drop."""
        cap = self.request.output_cap
        sent = {1: 0, 2: 0}
        truncated = {1: False, 2: False}
        timed_out = False
        exited_at = None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ, 1)
        selector.register(self.proc.stderr, selectors.EVENT_READ, 2)
        # Readable when the process exits: no polling on the latency-critical path.
        pidfd = os.pidfd_open(self.proc.pid)
        selector.register(pidfd, selectors.EVENT_READ, 0)
        open_streams = 2
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline and not timed_out:
                timed_out = True
                self.kill()
            if exited_at is not None:
                if not open_streams:
                    break
                if now - exited_at > DRAIN_GRACE_S:
                    self.kill()  # leftovers of its process group holding the pipes open
                if now - exited_at > DRAIN_GRACE_S + 1:
                    break  # a leftover that left the group: stop listening to it
                wait = DRAIN_GRACE_S
            else:
                wait = None if deadline is None or timed_out else max(0.0, deadline - now)
            for key, _ in selector.select(wait):
                stream = key.data
                if stream == 0:
                    exited_at = time.monotonic()
                    selector.unregister(pidfd)
                    continue
                chunk = os.read(key.fd, OUTPUT_CHUNK)
                if not chunk:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                room = cap - sent[stream]
                if len(chunk) > room:
                    truncated[stream] = True
                    chunk = chunk[:max(room, 0)]
                if chunk:
                    sent[stream] += len(chunk)
                    self.agent.channel.send(
                        messages.Output(exec_id=self.request.exec_id, stream=stream, data=chunk))
        os.close(pidfd)
        selector.close()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return timed_out, truncated


class Agent:
    def __init__(self, channel: Channel):
        self.channel = channel
        self.lock = threading.Lock()
        self.current: ExecRun | None = None
        self.tracked: set[int] = set()
        self.spawn_lock = threading.Lock()
        self.task_account = pwd.getpwnam(TASK_USER)

    def track(self, pid: int) -> None:
        with self.lock:
            self.tracked.add(pid)

    def untrack(self, pid: int) -> None:
        with self.lock:
            self.tracked.discard(pid)

    def tracked_pids(self) -> set[int]:
        with self.lock:
            return set(self.tracked)

    def hello(self) -> messages.Hello:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return messages.Hello(agent_version=AGENT_VERSION, boot_id=boot_id, kernel=os.uname().release)

    def exec_finished(self, run: ExecRun, result) -> None:
        self.channel.send(result)
        with self.lock:
            if self.current is run:
                self.current = None

    def handle(self, message) -> None:
        if isinstance(message, messages.Heartbeat):
            self.channel.send(messages.HeartbeatAck(nonce=message.nonce))
        elif isinstance(message, messages.Exec):
            with self.lock:
                busy = self.current is not None
                if not busy:
                    self.current = ExecRun(self, message)
                    self.current.start()
            if busy:
                self.channel.send(messages.Error(code="busy", message="an exec is already running"))
        elif isinstance(message, messages.Reset):
            ok, detail = self.reset()
            self.channel.send(messages.ResetDone(reset_id=message.reset_id, ok=ok, detail=detail))
        else:
            self.channel.send(messages.Error(code="unexpected", message=type(message).__name__))

    def reset(self) -> tuple[bool, str]:
        """Back to a clean slate: no task process alive, nothing the task wrote left."""
        with self.lock:
            run = self.current
        if run is not None:
            run.kill()
            run.join(5)
            if run.is_alive():
                return False, "exec thread did not finish"
        uid = self.task_account.pw_uid
        deadline = time.monotonic() + 2
        while pids := processes_of(uid):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.reap()
            if time.monotonic() > deadline:
                return False, f"task processes survive: {pids[:10]}"
            time.sleep(0.005)
        try:
            for top in WIPE_DIRS:
                if os.path.isdir(top):
                    for entry in os.listdir(top):
                        path = os.path.join(top, entry)
                        if os.path.isdir(path) and not os.path.islink(path):
                            shutil.rmtree(path)
                        else:
                            os.unlink(path)
            home = self.task_account.pw_dir
            shutil.rmtree(home, ignore_errors=True)
            os.mkdir(home, 0o750)
            os.chown(home, uid, self.task_account.pw_gid)
            # SysV shared memory, queues and semaphores outlive processes.
            subprocess.run(["ipcrm", "--all"], capture_output=True, timeout=5, check=True)
        except Exception as e:  # e.g. RecursionError on a deep tree: a failed reset, not a dead PID 1
            return False, f"wipe failed: {e!r}"[:messages.MAX_RESET_DETAIL_LEN]
        return True, ""

    def reap(self) -> None:
        with self.spawn_lock:
            reap_orphans(self.tracked_pids())

    def reaper(self) -> None:
        while True:
            time.sleep(1)
            self.reap()

    def serve(self) -> None:
        threading.Thread(target=self.reaper, name="reaper", daemon=True).start()
        self.channel.send(self.hello())
        for message in self.channel.receive():
            self.handle(message)


def main() -> None:
    try:
        fd = os.open(find_port(), os.O_RDWR)
        Agent(Channel(fd)).serve()
    except ProtocolError as e:
        log(f"host sent an undecodable frame ({e}); powering off")
    except BaseException as e:  # PID 1 must never just vanish silently
        log(f"fatal: {e!r}")
    power_off()


if __name__ == "__main__":
    main()
