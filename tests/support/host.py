"""This host as tests use it: where corral's state lives, the instance names
that keep concurrent test runs apart, another local user, free ports, and what
a process holds."""

import os
import socket
from pathlib import Path

STATE_DIR = Path(os.environ.get("CORRAL_STATE_DIR", "/var/lib/corral"))
# Concurrent test runs (e.g. in several worktrees) each need their own instance,
# or one run's start-up reaping destroys the other's VMs.
TEST_INSTANCE = os.environ.get("CORRAL_TEST_INSTANCE", "test")
# A second service running beside a module's needs its own instance (and so
# its own Hypervisor), or each watchdog reaps the other's VMs as zombies.
OTHER_INSTANCE = (TEST_INSTANCE + "b")[:16]
NOBODY = 65534  # another local user: not corrald's


def as_user(uid: int, check, *args) -> str:
    """Run `check(*args)` in a child process running as `uid`; what it raised,
    or the text it returned ("no error" for None)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(uid)
            os.setuid(uid)
            result = check(*args)
            os.write(write_end, b"no error" if result is None else result.encode())
        except BaseException as e:
            os.write(write_end, str(e).encode()[:4000])
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as f:
        return f.read().decode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
