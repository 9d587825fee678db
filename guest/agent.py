"""corral guest agent: PID 1 of every guest VM.

Runs from the read-only agent ISO (standard library only). It speaks the
SecureChannel protocol to the host over one virtio-serial port: says Hello,
then runs Exec requests as the unprivileged task user, streams Output as the
command writes it (each chunk stamped with its stream's offset), feeds it the
Stdin that follows an Exec with stdin_open, reports Exit with resource use,
answers Heartbeat, and on Reset kills every process of
the task user and removes whatever it left: files anywhere in the root overlay,
message queues, SysV IPC objects, keys. Restored from a snapshot (a refill's
template, or a session's VM saved between its execs), it takes a Resume
whenever no exec runs: the host's clock, fresh entropy, new sequence bases
(no corral VM has a NIC). On a net:egress VM it starts the egress relay (guest/egress_relay.py).

The host is the authority: the agent trusts what the host sends, and the host
trusts nothing the agent sends. A host frame the agent cannot decode ends the
VM (the host then replaces it) rather than guessing where the stream resumes.

Several execs may run at once, each keyed by its exec_id with its own pipes,
timeout, process group, stdin and Exit (a session's VM runs the execs its
caller sends together; the host gives a one-shot VM one at a time). Messages
about one exec carry its id, an Error too.

Built for speed under TCG, where every imported module, every thread and every
page a fork copies costs milliseconds: one thread around one poll() loop, only
C modules imported besides the protocol, and tasks started with posix_spawn
(a vfork: nothing of this process is copied) instead of subprocess, which has
to fork the whole interpreter to change the uid. The image build ships this
file and the protocol precompiled, and the initramfs imports it as a module so
that bytecode is used (a script named on python3's command line is always
compiled anew).
"""

from __future__ import annotations

import os
import pwd
import select
import stat
import sys
import time
import zlib

# The C module behind `signal`: the same calls, without building signal.py's
# enum classes at every boot.
import _signal

if __package__ in (None, ""):  # run as a script from the ISO: make `protocol` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from protocol.channel import capabilities, codec, constants, egress, messages
from guest import files
from protocol.channel.errors import ProtocolError, UnexpectedMessage
from protocol.channel.frame import FrameDecoder, FrameEncoder

AGENT_VERSION = "0.2"
PORT_NAME = "org.corral.agent.0"
TASK_USER = "task"
READ_CHUNK = 64 * 1024
OUTPUT_CHUNK = 64 * 1024
STDIN_CHUNK = 64 * 1024
# After the task's main process exits, how long its pipes may stay open (held by
# a background child) before the rest of its process group is killed.
DRAIN_GRACE_S = 0.05
# Orphans re-parented to PID 1 are reaped at least this often.
REAP_INTERVAL_S = 1.0
RELAY_START_WAIT_S = 5.0  # a restarted egress relay listens within this, or the Resume is answered anyway
TCP_LISTEN = "0A"  # /proc/net/tcp's state of a listening socket
# While no host is connected, read() on the port gives EOF at once: look again this late.
NO_HOST_RETRY_S = 0.005
# The root overlay's layers, moved by the initramfs where only root reaches them
# (guest/image/init). Everything written to the root file system since boot is in
# the upper layer; Reset removes what the task added there (Agent.sweep_overlay).
OVERLAY_UPPER = "/run/corral/rw/upper"
OVERLAY_LOWER = "/run/corral/lower"
# Writable places outside the root overlay that Reset empties: POSIX message
# queues (mounted by the initramfs), and /dev/shm if the guest has one.
WIPE_DIRS = ("/dev/shm", "/dev/mqueue")
# Kernel key quotas of non-root users. 1 is the least the kernel accepts, and any
# key or named keyring costs at least 2 bytes (its description and a NUL), so the
# task user can create none: not even its user keyring, which it could otherwise
# lock (KEYCTL_SETPERM 0) so that no later clear reaches the keys in it.
KEY_QUOTA_FILES = ("/proc/sys/kernel/keys/maxkeys", "/proc/sys/kernel/keys/maxbytes")
KEY_USERS = "/proc/key-users"
# How long Reset waits for the kernel's key garbage collector to free the task
# user's last keys (released by its dead processes or invalidated) before failing.
KEY_GC_WAIT_S = 1.0
DEFAULT_PATH = b"/usr/local/bin:/usr/bin:/bin"
SIGKILL = _signal.SIGKILL
# Python starts with these ignored; a task gets them back at their defaults, as
# subprocess's restore_signals did.
RESTORED_SIGNALS = (_signal.SIGPIPE, _signal.SIGXFSZ)
PTRACE_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
SYS_KEYCTL = 250  # x86_64
KEYCTL_INVALIDATE = 21
KEYCTL_GET_PERSISTENT = 22
KEY_SPEC_THREAD_KEYRING = -1
POLLIN = select.POLLIN
POLLOUT = select.POLLOUT
# Resume: mix the host's bytes into the kernel's CRNG and credit them
# (RNDADDENTROPY = _IOW('R', 0x03, int[2]), its argument a struct rand_pool_info:
# int entropy_count in bits, int buf_size in bytes, then the bytes), then make
# the CRNG reseed from its pool now (RNDRESEEDCRNG = _IO('R', 0x07)). Both need
# CAP_SYS_ADMIN, which PID 1 has.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


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
        import ctypes  # only on this last path: ctypes is slow to import under TCG
        ctypes.CDLL(None).reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
    finally:
        os._exit(1)


def prepare_process() -> None:
    """Leave nothing in PID 1 that a task could inherit through posix_spawn."""
    os.closerange(3, 1 << 20)  # whatever the initramfs left open
    for fd in (0, 1, 2):  # keep 0-2 taken, so that no pipe end lands there
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open("/dev/null", os.O_RDWR), fd)
    # With no handler installed, the kernel drops every signal a task sends PID 1.
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    os.setgroups([])  # tasks inherit no supplementary groups
    os.umask(0o022)
    os.chdir("/")


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


def sysv_ipc_in_use() -> bool:
    """Any SysV shared memory segment, message queue or semaphore set? (Each
    /proc/sysvipc file is a header line plus one line per object.)"""
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                if len(f.read().splitlines()) > 1:
                    return True
        except OSError:
            return True  # cannot tell: clean up to be safe
    return False


def remove_contents(dir_fd: int) -> None:
    """Delete everything below the open directory `dir_fd`, never following a
    symlink (the tree was writable by the task)."""
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            fd = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                remove_contents(fd)
            finally:
                os.close(fd)
            os.rmdir(entry.name, dir_fd=dir_fd)
        else:
            os.unlink(entry.name, dir_fd=dir_fd)


def empty_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        remove_contents(fd)
    finally:
        os.close(fd)


def open_directory(name: str, dir_fd: int | None = None) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def remove_entry(name: str, dir_fd: int) -> None:
    """Remove `name` (a whole tree if a directory) from the open directory, never
    following a symlink; gone already is fine."""
    try:
        if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
            fd = open_directory(name, dir_fd)
            try:
                remove_contents(fd)
            finally:
                os.close(fd)
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def upper_paths(upper: str = OVERLAY_UPPER) -> frozenset[str]:
    """Every path (as '/a/b') the overlay's upper layer holds now."""
    found = set()

    def walk(fd: int, prefix: str) -> None:
        with os.scandir(fd) as it:
            entries = list(it)
        for entry in entries:
            path = f"{prefix}/{entry.name}"
            found.add(path)
            if entry.is_dir(follow_symlinks=False):
                child = open_directory(entry.name, fd)
                try:
                    walk(child, path)
                finally:
                    os.close(child)

    top = open_directory(upper)
    try:
        walk(top, "")
    finally:
        os.close(top)
    return frozenset(found)


def is_whiteout(st: os.stat_result) -> bool:
    """overlayfs marks a deleted lower entry with a 0/0 character device in the upper layer."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def task_has_keys(uid: int) -> bool:
    """Does the kernel hold any key or keyring of `uid`? (/proc/key-users: one
    line per user with keys, the uid first.)"""
    with open(KEY_USERS, "rb") as f:
        return any(line.split(b":", 1)[0].strip() == b"%d" % uid for line in f)


def invalidate_persistent_keyring(uid: int) -> None:
    """The persistent keyring of `uid` (KEYCTL_GET_PERSISTENT; kept by the kernel
    for days, outside any quota) is the one place a task can anchor keyrings so
    that they outlive its processes. Invalidated, the kernel frees it and all that
    hangs from it; a task that asks again gets a new, empty one. ctypes is
    imported only here: slow to import under TCG, and needed only after a task
    used keys."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def keyctl(*args: int) -> int:
        result = libc.syscall(ctypes.c_long(SYS_KEYCTL), *(ctypes.c_long(a) for a in args))
        if result < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"keyctl {args[0]}: {os.strerror(error)}")
        return result

    # Linked into PID 1's own thread keyring, which makes root its possessor.
    keyring = keyctl(KEYCTL_GET_PERSISTENT, uid, KEY_SPEC_THREAD_KEYRING)
    keyctl(KEYCTL_INVALIDATE, keyring)


def oom_kills() -> int:
    """How many processes the kernel's OOM killer has killed since boot."""
    with open("/proc/vmstat", "rb") as f:
        for line in f:
            if line.startswith(b"oom_kill "):
                return int(line.split()[1])
    return 0


def missing_capability(candidates: list[bytes], bits: int) -> str | None:
    """The soft capability the first existing candidate needs and `bits` lacks.
    Only a courtesy (an early, named refusal): the kernel enforces the same rule
    through the file's group and mode, whoever runs the file."""
    for path in candidates:
        try:
            gid = os.stat(path).st_gid
        except OSError:
            continue
        name = capabilities.capability_of_gid(gid)
        if name is not None and not bits & capabilities.SOFT[name][0]:
            return name
        return None
    return None


def executable_candidates(name: bytes, env: dict[bytes, bytes]) -> list[bytes]:
    """Where execvpe would look for `name`, in order (the task's PATH, as subprocess did)."""
    if b"/" in name:
        return [name]
    path = env.get(b"PATH", os.defpath.encode())
    return [os.path.join(directory, name) for directory in path.split(b":")]


def spawn(argv: list[bytes], env: dict[bytes, bytes], cwd: bytes,
          account: pwd.struct_passwd | None, groups: list[int] = ()) -> tuple[int, int, int, int]:
    """Start `argv` in a new session, with fresh pipes as its stdin, stdout and
    stderr, as `account` (None: as root). Returns (pid, stdin, stdout, stderr),
    the agent's ends of the pipes. OSError if it cannot start.

    posix_spawn cannot set ids, but its resetids makes the child's effective
    uid/gid its real ones before the exec, and the exec copies them to the saved
    ids. So the agent's real ids are the task's just around the call (its
    effective ids, and so its capabilities, stay root's): the task then runs
    with uid, euid and suid of the task user (gid likewise), the supplementary
    `groups` of its soft capabilities (PID 1 holds them just around the call
    too, otherwise none) and no capabilities, as setuid() in a forked child
    gave. The agent has no signal handlers, so the kernel keeps refusing task
    signals to PID 1 during that window too.
    """
    ours, theirs = [], []  # the agent's pipe ends; the task's ends, in fd order 0, 1, 2
    try:
        stdin_r, stdin_w = os.pipe()  # close-on-exec: only the dup2'd copies reach the task
        ours.append(stdin_w)
        theirs.append(stdin_r)
        for _ in ("stdout", "stderr"):
            r, w = os.pipe()
            ours.append(r)
            theirs.append(w)
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(theirs)]
        candidates = executable_candidates(argv[0], env)
        os.chdir(cwd)  # as root, like subprocess's child did; the task inherits it
        try:
            pid = _spawn_first(candidates, argv, env, actions, account, groups)
        except OSError as e:  # name the command as given, not the PATH entry tried last
            raise OSError(e.errno, e.strerror, argv[0]) from None
        finally:
            os.chdir("/")
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    return pid, ours[0], ours[1], ours[2]


def _spawn_first(candidates: list[bytes], argv: list[bytes], env: dict[bytes, bytes],
                 actions: list, account: pwd.struct_passwd | None, groups: list[int]) -> int:
    """Spawn the first candidate that execs; report the first error that is not
    'not found', like execvpe (and subprocess) do."""
    first_error = last_error = None
    for path in candidates:
        try:
            os.stat(path)  # a vfork per missing PATH entry is not free under TCG
        except (FileNotFoundError, NotADirectoryError) as e:
            last_error = e
            continue
        except OSError:
            pass  # let the exec itself say what is wrong, as the task user
        try:
            if account is not None:
                os.setgroups(groups)
                os.setresgid(account.pw_gid, 0, 0)
                os.setresuid(account.pw_uid, 0, 0)
            return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True,
                                  resetids=account is not None, setsigdef=RESTORED_SIGNALS)
        except (FileNotFoundError, NotADirectoryError) as e:
            last_error = e
        except OSError as e:
            last_error = e
            first_error = first_error or e
        finally:
            if account is not None:
                _back_to_root()
    raise first_error or last_error


def _back_to_root() -> None:
    try:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)
        os.setgroups([])
    except OSError as e:  # never carry on with a task's ids
        log(f"cannot restore root ids: {e!r}; powering off")
        power_off()


class Channel:
    """The agent's end of the SecureChannel: framing and sequence ids.

    The port is non-blocking. While a send waits for the host to read (the
    host's backpressure: its buckets, or a streaming task's caller that is
    behind), the agent goes on reading the host's frames into `inbox`, so the
    host is never stuck sending to an agent stuck sending to it (stdin for
    the running command, say). The main loop handles them in order."""

    def __init__(self, fd: int):
        self.fd = fd
        os.set_blocking(fd, False)
        self.encoder = FrameEncoder(zlib.crc32)
        self.decoder = FrameDecoder(zlib.crc32)
        self.inbox: list = []  # host messages read while a send waited, not yet handled

    def rebase(self, host_seq: int, guest_seq: int) -> None:
        """Continue from a Resume's sequence bases (read() made sure no host
        frame follows the Resume yet)."""
        self.decoder.rebase(host_seq)
        self.encoder.rebase(guest_seq)

    def send(self, message) -> None:
        data = memoryview(self.encoder.encode(codec.encode(message)))
        while data:
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:  # the host does not read: that is the backpressure
                self._wait_writable()
                continue
            data = data[written:]

    def _wait_writable(self) -> None:
        """Until the port may take more, or the host sent something (kept in
        `inbox`). No host connected (after a restore, before the first
        connection): the port says so at once, so look again a little later."""
        poller = select.poll()
        poller.register(self.fd, POLLIN | POLLOUT)
        for _, events in poller.poll():
            if events & POLLOUT:
                return
            received = self.read() if events & POLLIN else None
            if received is None:
                time.sleep(NO_HOST_RETRY_S)
            else:
                self.inbox += received

    def take_inbox(self) -> list:
        taken, self.inbox = self.inbox, []
        return taken

    def read(self) -> list | None:
        """The host messages that the bytes available now complete; None while
        no host is connected (read() gives EOF then)."""
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:  # woken for nothing after all
            return []
        if not data:
            return None
        received = [codec.decode(payload, messages.HOST_TO_GUEST) for payload in self.decoder.feed(data)]
        # After a Resume the host sends nothing until it has the answer: a byte
        # after one was counted on the old sequence base, which the Resume ends.
        if any(isinstance(message, messages.Resume) for message in received[:-1]) or (
                received and isinstance(received[-1], messages.Resume) and self.decoder.in_frame):
            raise UnexpectedMessage("host frame after a Resume, before its ResumeDone")
        return received


class Task:
    """One running command: its pipes, its timeout, its exit status."""

    def __init__(self, agent: Agent, request: messages.Exec, started: float,
                 pid: int, stdin_fd: int, stdout_fd: int, stderr_fd: int):
        self.agent = agent
        self.request = request
        self.started = started
        self.pid = pid
        self.deadline = started + request.timeout_ms / 1000 if request.timeout_ms else None
        self.streams = {stdout_fd: 1, stderr_fd: 2}
        self.sent = {1: 0, 2: 0}
        self.truncated = {1: False, 2: False}
        # Stdin not yet written to the command: Exec.stdin, then each Stdin's
        # data (stdin_open). The pipe closes once it is written and the eof came.
        self.stdin = bytearray(request.stdin)
        self.stdin_taken = len(request.stdin)  # all of it so far, at most MAX_STDIN
        self.stdin_eof = not request.stdin_open
        self.stdin_fd: int | None = stdin_fd
        os.set_blocking(stdin_fd, False)
        self._close_stdin_when_done()
        # Readable when the process exits: no polling on the latency-critical path.
        self.pidfd: int | None = os.pidfd_open(pid)
        self.timed_out = False
        self.exited_at: float | None = None
        self.status: tuple[int, object] | None = None  # (wait status, rusage) once reaped
        self.oom_kills_before = oom_kills()

    def poll_fds(self) -> list[tuple[int, int]]:
        fds = [(fd, POLLIN) for fd in self.streams]
        if self.pidfd is not None:
            fds.append((self.pidfd, POLLIN))
        if self.stdin_fd is not None:
            # POLLOUT only with something to write (an empty pipe is always
            # writable); registered anyway, to see the task close its end (POLLERR).
            fds.append((self.stdin_fd, POLLOUT if self.stdin else 0))
        return fds

    def wait_s(self, now: float) -> float | None:
        """How long the loop may sleep before this task needs a look."""
        if self.exited_at is not None:
            return DRAIN_GRACE_S
        if self.deadline is not None and not self.timed_out:
            return max(0.0, self.deadline - now)
        return None

    def kill(self) -> None:
        try:
            os.killpg(self.pid, SIGKILL)
        except ProcessLookupError:
            pass

    def on_event(self, fd: int) -> None:
        if fd == self.pidfd:
            os.close(self.pidfd)
            self.pidfd = None
            self.agent.reap()  # collects this task's status too
        elif fd == self.stdin_fd:
            self._feed_stdin()
        elif fd in self.streams:
            self._forward(fd)

    def reaped(self, status: int, usage) -> None:
        self.status = (status, usage)
        if self.exited_at is None:
            self.exited_at = time.monotonic()

    def check(self, now: float) -> bool:
        """Enforce the timeout and the drain grace; True once the task is over."""
        if self.deadline is not None and now >= self.deadline and not self.timed_out:
            self.timed_out = True
            self.kill()
        if self.exited_at is None:
            return False
        if not self.streams:
            return True
        if now - self.exited_at > DRAIN_GRACE_S:
            self.kill()  # leftovers of its process group holding the pipes open
        return now - self.exited_at > DRAIN_GRACE_S + 1  # a leftover that left the group

    def _forward(self, fd: int) -> None:
        """Forward a chunk of stdout (1) or stderr (2); past the cap, drain and drop."""
        chunk = os.read(fd, OUTPUT_CHUNK)
        if not chunk:
            del self.streams[fd]
            os.close(fd)
            return
        stream = self.streams[fd]
        room = self.request.output_cap - self.sent[stream]
        if len(chunk) > room:
            self.truncated[stream] = True
            chunk = chunk[:max(room, 0)]
        if chunk:
            self.agent.channel.send(messages.Output(
                exec_id=self.request.exec_id, stream=stream, offset=self.sent[stream], data=chunk))
            self.sent[stream] += len(chunk)

    def add_stdin(self, data: bytes, eof: bool) -> None:
        """More stdin from the host (a Stdin message for this exec)."""
        if self.stdin_eof:
            return  # after the eof, or the task closed its stdin: nobody reads it
        room = constants.MAX_STDIN - self.stdin_taken
        if len(data) > room:  # the host refuses past its cap first: a host bug; the command gets EOF
            log(f"exec {self.request.exec_id}: stdin over {constants.MAX_STDIN} bytes; closed")
            data, eof = data[:room], True
        self.stdin += data
        self.stdin_taken += len(data)
        self.stdin_eof = eof
        self._close_stdin_when_done()

    def _feed_stdin(self) -> None:
        if not self.stdin:  # an error with nothing to write: the task closed its end
            self._close_stdin()
            return
        try:
            written = os.write(self.stdin_fd, self.stdin[:STDIN_CHUNK])
        except BlockingIOError:
            return
        except OSError:
            self._close_stdin()  # the task closed its stdin early: its choice
            return
        del self.stdin[:written]
        self._close_stdin_when_done()

    def _close_stdin_when_done(self) -> None:
        if self.stdin_eof and not self.stdin:
            self._close_stdin()

    def _close_stdin(self) -> None:
        """No more stdin for the command: what is pending is dropped."""
        if self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None
        self.stdin = bytearray()
        self.stdin_eof = True

    def close(self) -> None:
        for fd in self.streams:
            os.close(fd)
        self.streams = {}
        self._close_stdin()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def exit_message(self) -> messages.Exit:
        status, usage = self.status
        signalled = os.WIFSIGNALED(status)
        return messages.Exit(
            exec_id=self.request.exec_id,
            exit_code=-1 if signalled else os.WEXITSTATUS(status),
            signal=os.WTERMSIG(status) if signalled else 0,
            timed_out=self.timed_out,
            stdout_truncated=self.truncated[1], stderr_truncated=self.truncated[2],
            wall_ms=int((time.monotonic() - self.started) * 1000),
            user_cpu_ms=int(usage.ru_utime * 1000), sys_cpu_ms=int(usage.ru_stime * 1000),
            max_rss_kib=usage.ru_maxrss,
            oom_killed=oom_kills() > self.oom_kills_before,
        )


class Agent:
    def __init__(self, channel: Channel, relay_pid: int | None = None):
        """`relay_pid`: the egress relay this agent started (net:egress VMs)."""
        self.channel = channel
        self.relay_pid = relay_pid
        self.executed = False  # an Exec came since Hello: a task may have used the egress relay
        self.tasks: dict[int, Task] = {}  # the running execs, by exec_id
        self.task_account = pwd.getpwnam(TASK_USER)
        if self.task_account.pw_uid == 0 or self.task_account.pw_gid == 0:
            raise RuntimeError(f"task user {TASK_USER} must not be root")
        self.root_account = pwd.getpwuid(0)
        self.put_error = ""  # the first failed PutFile since the last Exec or Reset
        self.ptrace_scope = -1  # as last written; -1: not yet
        self.set_ptrace_scope(capabilities.PTRACE_SCOPE_DENIED)
        self.share_tmp_dirs()
        for quota in KEY_QUOTA_FILES:
            with open(quota, "w") as f:
                f.write("1")
        # What the upper layer holds before any task ran: the initramfs's and the
        # agent's own changes to the image. Reset keeps these and removes the rest.
        self.overlay_baseline = upper_paths()

    def share_tmp_dirs(self) -> None:
        """The image sets /tmp and /var/tmp; /dev/shm is made at boot. Listable by
        every task, writable by fs:write_tmp tasks only (protocol/channel/capabilities.py)."""
        gid = capabilities.SOFT[capabilities.FS_WRITE_TMP][2]
        for directory in capabilities.SHARED_TMP_DIRS:
            if os.path.isdir(directory) and not os.path.islink(directory):
                os.chown(directory, 0, gid)
                os.chmod(directory, capabilities.SHARED_TMP_MODE)

    def set_ptrace_scope(self, scope: int) -> None:
        if scope != self.ptrace_scope:
            with open(PTRACE_SCOPE, "w") as f:
                f.write(str(scope))
            self.ptrace_scope = scope

    def hello(self) -> messages.Hello:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
        return messages.Hello(agent_version=AGENT_VERSION, boot_id=boot_id, kernel=os.uname().release)

    # --- the loop -------------------------------------------------------------

    # When the loop next reaps orphans, and until when it leaves a port with no host alone.
    next_reap = 0.0
    port_quiet_until = 0.0

    def serve(self) -> None:
        self.channel.send(self.hello())
        self.next_reap = time.monotonic() + REAP_INTERVAL_S
        while True:
            self.turn()

    def turn(self, max_wait_s: float | None = None) -> None:
        """One pass of the loop: wait (at most `max_wait_s`) for the tasks'
        pipes, the port or a deadline, then act on what is ready."""
        now = time.monotonic()
        timeout = self.next_reap - now
        if max_wait_s is not None:
            timeout = min(timeout, max_wait_s)
        port = None
        if now >= self.port_quiet_until:
            port = self.channel.fd
        else:
            timeout = min(timeout, self.port_quiet_until - now)
        if self.channel.inbox:  # read while a send waited: handle them now
            timeout = 0.0
        port_ready = self._poll_tasks(timeout, port)
        received = self.channel.take_inbox()  # older than what is read now
        if port_ready:
            more = self.channel.read()
            if more is None:
                self.port_quiet_until = time.monotonic() + NO_HOST_RETRY_S
            else:
                received += more
        for message in received:
            self.handle(message)
        if time.monotonic() >= self.next_reap:
            self.reap()
            self.next_reap = time.monotonic() + REAP_INTERVAL_S

    def _poll_tasks(self, timeout: float, port: int | None) -> bool:
        """Wait at most `timeout` s (less if a task's deadline comes first) for
        the running tasks' fds and the `port` if given, handle the tasks'
        events and end the tasks that are over; True if the port is readable."""
        poller = select.poll()
        if port is not None:
            poller.register(port, POLLIN)
        owners: dict[int, Task] = {}  # fd -> the task it was registered for
        now = time.monotonic()
        for task in self.tasks.values():
            for fd, events in task.poll_fds():
                poller.register(fd, events)
                owners[fd] = task
            wait = task.wait_s(now)
            if wait is not None:
                timeout = min(timeout, wait)
        port_ready = False
        for fd, _ in poller.poll(max(timeout, 0.0) * 1000):
            if fd == port:
                port_ready = True
                continue
            task = owners[fd]
            if self.tasks.get(task.request.exec_id) is task:  # not ended by an earlier event
                self._task_event(task, fd)
        self._check_tasks()
        return port_ready

    def _task_event(self, task: Task, fd: int) -> None:
        try:
            task.on_event(fd)
        except Exception as e:  # the host must always get an answer for an Exec
            exec_id = task.request.exec_id
            del self.tasks[exec_id]
            log(f"exec {exec_id} failed: {e!r}")
            task.kill()
            task.close()
            detail = str(e).encode()[:constants.MAX_ERROR_MESSAGE_LEN].decode(errors="ignore")
            self.channel.send(messages.Error(code="exec_failed", message=detail, exec_id=exec_id))

    def _check_tasks(self) -> None:
        now = time.monotonic()
        for task in list(self.tasks.values()):
            if task.check(now):
                del self.tasks[task.request.exec_id]
                task.close()
                self.reap()  # the killed group's orphans, now
                self.channel.send(task.exit_message())

    def reap(self) -> None:
        """As PID 1 the agent inherits every orphan: reap all zombies, keeping
        the status of each task's own process."""
        while True:
            try:
                pid, status, usage = os.wait3(os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for task in self.tasks.values():
                if pid == task.pid:
                    task.reaped(status, usage)
                    break

    # --- messages -------------------------------------------------------------

    def handle(self, message) -> None:
        if isinstance(message, messages.Heartbeat):
            self.channel.send(messages.HeartbeatAck(nonce=message.nonce))
            return
        if isinstance(message, messages.Resume):
            self.resume(message)
            return
        if isinstance(message, messages.Stdin):
            task = self.tasks.get(message.exec_id)
            # For no running exec: the command may have just ended while the
            # host sent it; not an error.
            if task is not None and task.request.stdin_open:
                task.add_stdin(message.data, message.eof)
            return
        if isinstance(message, messages.Exec):
            self.executed = True
            if message.exec_id in self.tasks:
                self.channel.send(messages.Error(code="busy", message=f"exec {message.exec_id} is already running",
                                                 exec_id=message.exec_id))
            else:
                self.start(message)
        elif isinstance(message, messages.PutFile):
            self.put(message)
        elif isinstance(message, messages.Collect):
            self.collect(message)
        elif isinstance(message, messages.Reset):
            self.put_error = ""
            ok, detail = self.reset()
            self.channel.send(messages.ResetDone(reset_id=message.reset_id, ok=ok, detail=detail))
        else:
            self.channel.send(messages.Error(code="unexpected", message=type(message).__name__))

    @property
    def resumable(self) -> bool:
        """No exec runs: the host saves a VM only then (a refill's template after
        its Hello, a session's VM between its execs), so only then may a Resume,
        a restored VM's first words, come. One while an exec runs is refused."""
        return not self.tasks

    def resume(self, request: messages.Resume) -> None:
        """A restored clone's first words from the host: rebase both sequences,
        then take the host's entropy and clock. The answer (ResumeDone, or an
        Error when refused) carries the new guest sequence either way, so the
        host can read it."""
        self.channel.rebase(request.host_seq, request.guest_seq)
        if not self.resumable:
            self.channel.send(messages.Error(
                code="resume_refused", message="Resume is only for an agent with no exec running"))
            return
        try:
            step_ns = self.reseed_and_set_clock(request.entropy, request.time_ns)
        except (OSError, ValueError, OverflowError) as e:
            log(f"resume failed: {e!r}")
            detail = str(e).encode()[:constants.MAX_ERROR_MESSAGE_LEN].decode(errors="ignore")
            self.channel.send(messages.Error(code="resume_failed", message=detail))
            return
        # The agent keeps no random state of its own to reseed: it draws no
        # random numbers, and tasks are new processes that seed themselves from
        # the kernel. (Its str hash seed, fixed at start-up, is the template's in
        # every clone; it hashes only what the host sends, and trusts the host.)
        if self.relay_pid is not None and self.executed:
            self.restart_relay()
        self.channel.send(messages.ResumeDone(clock_step_ns=step_ns))

    def restart_relay(self) -> None:
        """A saved session's VM restored: its egress relay's streams and frame
        sequences were the old host proxy's, and the new one starts afresh
        (it connects once this Resume is answered). A new relay, with
        nothing of the old one's, is the one the new proxy will meet; the
        tasks' connections through the old one end here, as their far ends
        did at the save. A refill clone's relay never carried a stream (no
        Exec before its template was saved) and is kept."""
        try:
            os.kill(self.relay_pid, SIGKILL)
            os.waitpid(self.relay_pid, 0)  # its port and its address are free once it is reaped
        except (ProcessLookupError, ChildProcessError):
            pass  # died and reaped already
        self.relay_pid = start_egress_relay()
        # The session's next exec may follow the answer at once: not before the
        # new relay listens (its Python takes a few hundred ms under TCG).
        if self.relay_pid is not None and not relay_listening(time.monotonic() + RELAY_START_WAIT_S):
            log(f"the new egress relay does not listen after {RELAY_START_WAIT_S:g} s; answering all the same")

    @staticmethod
    def reseed_and_set_clock(entropy: bytes, time_ns: int) -> int:
        """Mix `entropy` into the kernel's CRNG and reseed it, then set the wall
        clock to `time_ns`; return how far the clock stepped. fcntl only here:
        a cold-booted agent never needs it."""
        import fcntl
        import struct
        fd = os.open("/dev/urandom", os.O_WRONLY | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
        before = time.clock_gettime_ns(time.CLOCK_REALTIME)
        time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
        return time_ns - before

    def put(self, request: messages.PutFile) -> None:
        if self.put_error:
            return  # the Exec will not run anyway
        try:
            # The caller's input files may go to /tmp whatever the task may write
            # there itself: the put holds the fs:write_tmp group, the task only if granted.
            os.setgroups([capabilities.SOFT[capabilities.FS_WRITE_TMP][2]])
            try:
                files.put_file(self.task_account, request.path, request.mode, request.data)
            finally:
                os.setgroups([])
        except (files.FileRefused, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self.put_error = f"{os.fsdecode(request.path)}: {reason}"[:constants.MAX_ERROR_MESSAGE_LEN]

    def collect(self, request: messages.Collect) -> None:
        """Each path in order, as Collected chunks; a file that cannot be read is
        one Collected with its error. The host collects an exec's files after
        its Exit; other execs of a session may still run meanwhile."""
        budget = request.max_bytes
        for index, path in enumerate(request.paths):
            try:
                data = files.read_file(self.task_account, path, budget)
            except (files.FileRefused, OSError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                self.channel.send(messages.Collected(
                    collect_id=request.collect_id, index=index, data=b"", last=True,
                    error=reason.encode()[:constants.MAX_FILE_ERROR_LEN].decode(errors="ignore")))
                continue
            budget -= len(data)
            view = memoryview(data)
            while True:
                chunk, view = view[:constants.MAX_OUTPUT_CHUNK], view[constants.MAX_OUTPUT_CHUNK:]
                self.channel.send(messages.Collected(collect_id=request.collect_id, index=index,
                                                     data=bytes(chunk), last=not view, error=""))
                if not view:
                    break

    def start(self, request: messages.Exec) -> None:
        started = time.monotonic()
        if self.put_error:  # a file the command needs is missing: do not run it
            error, self.put_error = self.put_error, ""
            self.channel.send(messages.Error(code="put_failed", message=error, exec_id=request.exec_id))
            return
        try:
            account = self.root_account if request.as_root else self.task_account
            home = account.pw_dir.encode()
            user = account.pw_name.encode()
            env = {b"PATH": DEFAULT_PATH, b"HOME": home, b"USER": user, b"LOGNAME": user,
                   b"LANG": b"C.UTF-8"}
            bits = request.capabilities
            if not request.as_root and not bits & capabilities.SOFT[capabilities.FS_WRITE_TMP][0]:
                env[b"TMPDIR"] = home  # /tmp is read-only for this task; compilers need scratch
            env.update(request.env)
            if not request.as_root:
                needed = missing_capability(executable_candidates(request.argv[0], env), bits)
                if needed is not None:
                    self.channel.send(messages.Error(
                        code="missing_capability",
                        message=f"{os.fsdecode(request.argv[0])} needs capability {needed}, "
                                "which this task does not hold", exec_id=request.exec_id))
                    return
                # System-wide: execs running together are one session's, which
                # holds the same capabilities for all of them (the host's rule).
                self.set_ptrace_scope(capabilities.PTRACE_SCOPE_ALLOWED
                                      if bits & capabilities.SOFT[capabilities.SYS_PTRACE][0]
                                      else capabilities.PTRACE_SCOPE_DENIED)
            try:
                pid, stdin_fd, stdout_fd, stderr_fd = spawn(
                    list(request.argv), env, request.cwd or home,
                    None if request.as_root else account, capabilities.groups_for(bits))
            except OSError as e:
                self._spawn_failed(request, e, started)
                return
            self.tasks[request.exec_id] = Task(self, request, started, pid, stdin_fd, stdout_fd, stderr_fd)
        except Exception as e:  # the host must always get an answer for an Exec
            log(f"exec {request.exec_id} failed: {e!r}")
            detail = str(e).encode()[:constants.MAX_ERROR_MESSAGE_LEN].decode(errors="ignore")
            self.channel.send(messages.Error(code="exec_failed", message=detail, exec_id=request.exec_id))

    def _spawn_failed(self, request: messages.Exec, error: OSError, started: float) -> None:
        # Like a shell: command not found is 127, not executable 126.
        code = 127 if isinstance(error, FileNotFoundError) else 126
        # The missing file may be the command or the working directory.
        name = os.fsdecode(error.filename or request.argv[0])
        self.channel.send(messages.Output(
            exec_id=request.exec_id, stream=2, offset=0,
            data=f"corral-agent: {name}: {error.strerror}\n".encode(errors="surrogateescape")))
        self.channel.send(messages.Exit(
            exec_id=request.exec_id, exit_code=code, signal=0, timed_out=False,
            stdout_truncated=False, stderr_truncated=False,
            wall_ms=int((time.monotonic() - started) * 1000),
            user_cpu_ms=0, sys_cpu_ms=0, max_rss_kib=0))

    def _finish_killed_tasks(self, deadline: float) -> bool:
        """Run the loop for the (killed) tasks alone until they are over; their Exits go out first."""
        while self.tasks:
            now = time.monotonic()
            if now > deadline:
                return False
            self._poll_tasks(min(DRAIN_GRACE_S, deadline - now), None)
            self.reap()
            self._check_tasks()
        return True

    def reset(self) -> tuple[bool, str]:
        """Back to a clean slate: no task process alive, nothing a task wrote left."""
        if self.tasks:
            for task in self.tasks.values():
                task.kill()
            if not self._finish_killed_tasks(time.monotonic() + 5):
                return False, "exec did not finish"
        uid = self.task_account.pw_uid
        deadline = time.monotonic() + 2
        while pids := processes_of(uid):
            for pid in pids:
                try:
                    os.kill(pid, SIGKILL)
                except ProcessLookupError:
                    pass
            self.reap()
            if time.monotonic() > deadline:
                return False, f"task processes survive: {pids[:10]}"
            time.sleep(0.005)
        try:
            modified = self.sweep_overlay()
            if modified:  # an image file changed: the reset cannot put it back
                return False, f"image files modified: {', '.join(modified[:5])}"[:constants.MAX_RESET_DETAIL_LEN]
            for top in WIPE_DIRS:
                if os.path.isdir(top):
                    empty_directory(top)
            home = self.task_account.pw_dir
            if os.path.lexists(home):
                if os.path.isdir(home) and not os.path.islink(home):
                    empty_directory(home)
                    os.rmdir(home)
                else:
                    os.unlink(home)
            os.mkdir(home, 0o750)
            os.chown(home, uid, self.task_account.pw_gid)
            # SysV shared memory, queues and semaphores outlive processes.
            if sysv_ipc_in_use():  # rarely: spare every other reset a spawn
                self.run_as_root([b"ipcrm", b"--all"], timeout_s=5)
            if task_has_keys(uid) and not self.clear_keys(uid):
                return False, "keys of the task user survive"
        except Exception as e:  # e.g. RecursionError on a deep tree: a failed reset, not a dead PID 1
            return False, f"wipe failed: {e!r}"[:constants.MAX_RESET_DETAIL_LEN]
        return True, ""

    def sweep_overlay(self) -> list[str]:
        """Remove from the root file system every entry written since boot that
        was not there when the agent started, wherever the task found a place to
        write: a generic net under the named places. Walks the overlay's upper
        layer (small: only what changed) beside the merged tree, descending into
        directories of the image. The task's home is left to reset(), which
        rebuilds it. Returns the image files found changed (not removed: that
        would hide them; the task user can change none, build.py checks)."""
        home = self.task_account.pw_dir
        modified: list[str] = []

        def sweep(upper_fd: int, merged_fd: int, prefix: str) -> None:
            with os.scandir(upper_fd) as it:
                entries = list(it)
            for entry in entries:
                path = f"{prefix}/{entry.name}"
                if path == home:
                    continue
                is_dir = entry.is_dir(follow_symlinks=False)
                if path in self.overlay_baseline:
                    if is_dir:
                        descend(upper_fd, merged_fd, entry.name, path)
                    continue
                if is_whiteout(entry.stat(follow_symlinks=False)):  # a deletion: it holds no data
                    continue
                try:
                    lower_mode = os.lstat(OVERLAY_LOWER + path).st_mode
                except FileNotFoundError:
                    remove_entry(entry.name, merged_fd)  # new since boot
                    continue
                if is_dir and stat.S_ISDIR(lower_mode):
                    descend(upper_fd, merged_fd, entry.name, path)  # an image directory, copied up
                else:
                    modified.append(path)

        def descend(upper_fd: int, merged_fd: int, name: str, path: str) -> None:
            upper_child = open_directory(name, upper_fd)
            try:
                merged_child = open_directory(name, merged_fd)
                try:
                    sweep(upper_child, merged_child, path)
                finally:
                    os.close(merged_child)
            finally:
                os.close(upper_child)

        upper = open_directory(OVERLAY_UPPER)
        try:
            merged = open_directory("/")
            try:
                sweep(upper, merged, "")
            finally:
                os.close(merged)
        finally:
            os.close(upper)
        return modified

    def clear_keys(self, uid: int) -> bool:
        """Free every key of the task user; False if some survive. Its processes
        are dead, so only its persistent keyring can still hold keys (its user
        keyrings cannot exist under the key quota set at boot)."""
        invalidate_persistent_keyring(uid)
        deadline = time.monotonic() + KEY_GC_WAIT_S
        while task_has_keys(uid):  # freed by the kernel's key garbage collector, soon
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def run_as_root(self, argv: list[bytes], timeout_s: float) -> None:
        """Run a helper to completion, output discarded; RuntimeError unless it exits 0."""
        env = {b"PATH": DEFAULT_PATH, b"LANG": b"C.UTF-8"}
        pid, stdin_fd, stdout_fd, stderr_fd = spawn(argv, env, b"/", None)
        for fd in (stdin_fd, stdout_fd, stderr_fd):
            os.close(fd)  # it gets EOF on stdin and EPIPE on output
        deadline = time.monotonic() + timeout_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.killpg(pid, SIGKILL)
                os.waitpid(pid, 0)
                raise RuntimeError(f"{os.fsdecode(argv[0])} timed out")
            time.sleep(0.002)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise RuntimeError(f"{os.fsdecode(argv[0])} failed: wait status {status}")


def relay_listening(deadline: float) -> bool:
    """Wait until a socket listens on the proxy address (read from
    /proc/net/tcp: connecting would open a stream); False at the deadline."""
    address = "".join(f"{int(part):02X}" for part in reversed(egress.PROXY_HOST.split("."))) + \
        f":{egress.PROXY_PORT:04X}"
    while True:
        with open("/proc/net/tcp") as f:
            if any(fields[1] == address and fields[3] == TCP_LISTEN
                   for fields in (line.split() for line in f.readlines()[1:])):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def start_egress_relay() -> int | None:
    """On a net:egress VM (the host says so with corral.egress=1 on the kernel
    command line, and gives it the egress port), start guest/egress_relay.py in
    a session of its own; it drops to nobody once it holds the port. Its pid,
    or None where there is none."""
    with open("/proc/cmdline") as f:
        if "corral.egress=1" not in f.read().split():
            return None
    try:
        port = find_port(egress.PORT_NAME)  # the ports of one device appear one by one
    except RuntimeError as e:
        log(f"no egress port: {e}")
        return None
    code = 'import sys; sys.path.insert(0, "/opt/corral"); import guest.egress_relay as r; r.main(sys.argv[1])'
    try:
        return os.posix_spawn(sys.executable, [sys.executable, "-I", "-S", "-B", "-c", code, port], {}, setsid=True)
    except OSError as e:
        log(f"cannot start the egress relay: {e!r}")
        return None


def main() -> None:
    try:
        prepare_process()
        fd = os.open(find_port(), os.O_RDWR)
        relay_pid = start_egress_relay()  # after the agent's port: both ports are probed by then
        Agent(Channel(fd), relay_pid).serve()
    except ProtocolError as e:
        log(f"host sent an undecodable frame ({e}); powering off")
    except BaseException as e:  # PID 1 must never just vanish silently
        log(f"fatal: {e!r}")
    power_off()


if __name__ == "__main__":
    main()
