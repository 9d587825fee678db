"""Files in and out of the guest, written and read as the task user.

Runs inside the agent (PID 1, root, single-threaded), so each operation takes
the task user's effective ids for its duration: the kernel then checks every
path step as it would for the task itself, and files are created owned by
the task user. Real and saved ids stay root's, so the agent gets root back
(and no task process can signal or ptrace it meanwhile: those checks use the
target's real and saved ids).

Paths must be absolute, without '.', '..' or empty components, and lie below
one of the places a task may write (and Reset wipes). The path is walked one
directory at a time with O_NOFOLLOW, so a symlink planted anywhere in it (by
an earlier step of the same task, say) is refused instead of followed out of
those places. Standard library only: shipped on the agent ISO.
"""

from __future__ import annotations

import os
import stat

WRITABLE_ROOTS = (b"/tmp", b"/var/tmp", b"/dev/shm")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class FileRefused(Exception):
    """This file cannot be put or collected; the message says why (no path prefix)."""


class IdsNotRestored(BaseException):
    """The agent could not take root's ids back: it must not go on (PID 1 powers off)."""


class as_user:
    """``with as_user(account):`` the task user's effective ids, root's again after.
    (A class, not contextlib.contextmanager: contextlib and the functools and
    collections it imports cost the guest's boot under TCG.)"""

    def __init__(self, account) -> None:
        self.account = account

    def __enter__(self) -> None:
        os.setresgid(-1, self.account.pw_gid, -1)
        try:
            os.setresuid(-1, self.account.pw_uid, -1)
        except BaseException:
            os.setresgid(-1, 0, -1)
            raise

    def __exit__(self, *exc_info) -> None:
        try:
            os.setresuid(-1, 0, -1)
            os.setresgid(-1, 0, -1)
        except OSError as e:
            raise IdsNotRestored(f"cannot restore root ids: {e!r}") from None


def _parts(path: bytes, home: bytes) -> list[bytes]:
    if not path.startswith(b"/"):
        raise FileRefused("not an absolute path")
    parts = path[1:].split(b"/")
    if any(p in (b"", b".", b"..") for p in parts) or b"\0" in path:
        raise FileRefused("empty, '.' or '..' component")
    for root in WRITABLE_ROOTS + (home,):
        depth = root.count(b"/")
        if parts[:depth] == root[1:].split(b"/") and len(parts) > depth:
            return parts
    roots = ", ".join(r.decode() for r in WRITABLE_ROOTS + (home,))
    raise FileRefused(f"outside the places a task may write ({roots})")


def _open_parent(parts: list[bytes], make_dirs: bool) -> int:
    """An fd of the directory holding the last part, walked without following symlinks."""
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not make_dirs:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except (NotADirectoryError, OSError) as e:
                if e.errno in (40, 20):  # ELOOP, ENOTDIR: a symlink or a file on the way
                    raise FileRefused(f"{part.decode(errors='replace')!r} on the path is a symlink "
                                      "or not a directory") from None
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def put_file(account, path: bytes, mode: int, data: bytes) -> None:
    """Create `path` (a new file, parent directories made) with `data` and `mode`."""
    parts = _parts(path, account.pw_dir.encode())
    if mode & ~0o777:
        raise FileRefused(f"mode {mode:o} has bits beyond 0777")
    with as_user(account):
        parent = _open_parent(parts, make_dirs=True)
        try:
            fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def read_file(account, path: bytes, limit: int) -> bytes:
    """The contents of regular file `path`, if at most `limit` bytes."""
    parts = _parts(path, account.pw_dir.encode())
    with as_user(account):
        parent = _open_parent(parts, make_dirs=False)
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=parent)
        except OSError as e:
            if e.errno == 40:  # ELOOP
                raise FileRefused("is a symlink") from None
            raise
        finally:
            os.close(parent)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused("not a regular file")
        if info.st_size > limit:
            raise FileRefused(f"{info.st_size} bytes, over the collect cap ({limit} bytes left)")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileRefused(f"grew over the collect cap ({limit} bytes left) while read")
        return b"".join(chunks)
    finally:
        os.close(fd)
