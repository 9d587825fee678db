"""scripts/subreaper, which setup-host starts libvirtd under: an orphan of
its command (as each QEMU is of libvirtd, which double-forks it) is adopted
by the subreaper, not PID 1, and reaped the moment it exits, so libvirt's
kill(pid, 0) stops finding it at once."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.waiting import wait_until

SUBREAPER = Path(__file__).resolve().parents[2] / "scripts" / "subreaper"

# The command's child forks a grandchild and exits: the grandchild is an orphan,
# as a QEMU is once libvirtd's intermediate process exits. It writes its pid and
# lives until the file `go` appears; the command itself lives until `done` does.
COMMAND = """
import os, sys, time
here = sys.argv[1]
if os.fork() == 0:
    if os.fork() == 0:
        open(os.path.join(here, "orphan.pid"), "w").write(str(os.getpid()))
        while not os.path.exists(os.path.join(here, "go")):
            time.sleep(0.01)
        os._exit(0)
    os._exit(0)
while not os.path.exists(os.path.join(here, "done")):
    time.sleep(0.01)
"""


def status_field(pid: int, name: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        return None
    return None


def test_an_orphan_of_its_command_is_adopted_and_reaped_as_it_exits(tmp_path):
    log = tmp_path / "subreaper.log"
    subprocess.run([str(SUBREAPER), str(log), sys.executable, "-c", COMMAND, str(tmp_path)], check=True, timeout=10)
    try:
        wait_until(lambda: (tmp_path / "orphan.pid").exists() and (tmp_path / "orphan.pid").read_text(), 10,
                   "the orphan started")
        orphan = int((tmp_path / "orphan.pid").read_text())
        # Its intermediate parent exited at once: the subreaper adopted it, not PID 1.
        wait_until(lambda: status_field(orphan, "PPid") not in (None, str(os.getpid())) and
                   Path(f"/proc/{status_field(orphan, 'PPid')}/cmdline").read_bytes().split(b"\0")[1:2]
                   == [str(SUBREAPER).encode()], 5, "the orphan adopted by the subreaper")
        (tmp_path / "go").touch()
        exited = time.monotonic()
        wait_until(lambda: status_field(orphan, "State") is None, 5, "the orphan reaped")
        assert time.monotonic() - exited < 0.5  # reaped as it exited, not whenever PID 1 gets to it
    finally:
        (tmp_path / "done").touch()
    wait_until(lambda: "exited with status 0" in log.read_text(), 10, "the subreaper ended with its command")
