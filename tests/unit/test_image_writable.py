"""The image build's task-writable check (guest/image/build.py): the kernel's own
answer, from the host's real find run as the task user in a small chroot tree,
for places the reset does not wipe. Needs root (chroot, chown), as the build does."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from guest.image.build import BuildError, check_task_writable

TMP_GID = 1104  # fs:write_tmp's group (protocol/channel/capabilities.py)


def copy_in(root: Path, path: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, target)  # follows symlinks: the library itself under the name ld.so asks for


@pytest.fixture
def rootfs(tmp_path) -> Path:
    """A tree shaped like the image where it matters: find and its libraries,
    the task user, the shared tmp directories, a home, Debian's /run/lock."""
    root = tmp_path / "rootfs"
    root.mkdir()
    root.chmod(0o755)
    find = shutil.which("find")
    copy_in(root, find)
    libraries = subprocess.run(["ldd", find], capture_output=True, text=True, check=True).stdout
    for line in libraries.splitlines():
        path = next((word for word in line.split() if word.startswith("/")), None)
        if path:
            copy_in(root, path)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\ntask:x:1000:1000::/home/task:/bin/sh\n")
    for directory in ("tmp", "var/tmp"):
        (root / directory).mkdir(parents=True)
        os.chown(root / directory, 0, TMP_GID)
        (root / directory).chmod(0o1775)
    (root / "home/task").mkdir(parents=True)
    (root / "home/task/.profile").write_text("")
    for path in (root / "home/task", root / "home/task/.profile"):
        os.chown(path, 1000, 1000)
    (root / "run/lock").mkdir(parents=True)
    (root / "run/lock").chmod(0o1777)
    (root / "var/lock").symlink_to("/run/lock")
    return root


def test_a_world_writable_directory_no_reset_covers_fails_the_build(rootfs):
    with pytest.raises(BuildError, match="/run/lock") as refused:
        check_task_writable(rootfs, "task", 1000)
    assert "1 path(s)" in str(refused.value)  # not the covered places, not the /var/lock symlink
    (rootfs / "run/lock").chmod(0o755)
    check_task_writable(rootfs, "task", 1000)


@pytest.mark.parametrize("make", [
    lambda root: (root / "etc/motd").write_text("") or (root / "etc/motd").chmod(0o666),  # anyone may write
    lambda root: (root / "etc/motd").write_text("") or os.chown(root / "etc/motd", 1000, 0),  # the task owns it
    lambda root: (root / "etc").chmod(0o775) or os.chown(root / "etc", 0, TMP_GID),  # a group the task can hold
], ids=["mode 0666", "owned by the task", "group of a soft capability"])
def test_any_way_the_task_could_write_outside_the_covered_places_fails_the_build(rootfs, make):
    (rootfs / "run/lock").chmod(0o755)
    make(rootfs)
    with pytest.raises(BuildError, match="/etc"):
        check_task_writable(rootfs, "task", 1000)
