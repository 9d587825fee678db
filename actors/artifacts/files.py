"""Files out of a task, host side: collecting them under the cap, and signing
what came out.

The guest streams each collected file as Collected chunks, file by file in
request order (guest/agent.py, guest/files.py). The host trusts none of it:
chunks for the wrong file are a protocol violation, and bytes past the task's
collect cap are dropped and the file reported as over the cap, so one task
never makes the host hold more than `artifacts.max_collect_bytes` of files
(plus its output caps). Each file collected whole gets a receipt signed by
the host key (actors/artifacts/signing.py, format in protocol/wire/receipts.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from actors.artifacts.signing import Signer
from protocol.channel import messages as guest
from protocol.wire import receipts

log = logging.getLogger("corral.artifacts")


@dataclass(frozen=True)
class FileSettings:
    max_put_bytes: int
    max_collect_bytes: int
    collect_timeout_s: float
    signer: Signer | None  # None: files come back unsigned (receipt empty)


class Collection:
    """The files of one task's collect request as they arrive."""

    def __init__(self, collect_id: int, paths: tuple[bytes, ...], cap: int):
        self.collect_id = collect_id
        self.paths = paths
        self.cap = cap
        self.held = 0  # bytes of files complete so far
        self.buffer = bytearray()  # the file being received
        self.over_cap = False
        self.results: list[tuple[bytes, str, bytes]] = []  # (path, error, data)

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.paths)

    def add(self, message: guest.Collected) -> str:
        """Take one chunk; a non-empty return names a protocol violation."""
        index = len(self.results)
        if message.collect_id != self.collect_id or message.index != index or self.done:
            return f"collected chunk for file {message.index} of collect {message.collect_id}, " \
                   f"expected file {index} of collect {self.collect_id}"
        if message.error:
            if message.data or self.buffer:
                return "collected chunk with both data and an error"
            if not message.last:
                return "collected error chunk that does not end its file"
            return self._close(message.error)
        if len(message.data) > self.cap - self.held - len(self.buffer):
            self.over_cap = True
            self.buffer = bytearray()  # what is dropped is not held
        elif not self.over_cap:
            self.buffer += message.data
        if message.last:
            self._close(f"over the collect cap of {self.cap} bytes for this task" if self.over_cap else "")
        return ""

    def _close(self, error: str) -> str:
        data = b"" if error else bytes(self.buffer)
        self.held += len(data)
        self.results.append((self.paths[len(self.results)], error, data))
        self.buffer = bytearray()
        self.over_cap = False
        return ""

    def give_up(self, reason: str) -> None:
        """Whatever has not arrived is reported with `reason`."""
        self.buffer = bytearray()
        while not self.done:
            self.results.append((self.paths[len(self.results)], reason, b""))


def files_out(results, signer: Signer | None, task_id: str, argv: tuple[bytes, ...],
              outcome: str, exit_code: int, signal: int) -> tuple[tuple[bytes, str, bytes, bytes], ...]:
    """The reply's files: (path, error, data, receipt) in request order."""
    out = []
    for path, error, data in results:
        receipt = b""
        if not error and signer is not None:
            body = receipts.body_for(task_id, argv, outcome, exit_code, signal, path, data)
            try:
                receipt = signer.receipt(body)
            except ValueError as e:  # the receipt would be too large (a huge command line)
                log.warning("task %s: file %r left unsigned: %s", task_id, path, e)
                error, data = f"cannot be signed: {e}", b""
        out.append((path, error, data, receipt))
    return tuple(out)


def check_paths(what: str, paths) -> None:
    """Paths of files in or out: absolute, no NUL, no '.', '..' or empty parts,
    no repeats. ValueError naming the first bad one. (The agent also checks
    they lie in the places a task may write, which only it knows.)"""
    seen = set()
    for i, path in enumerate(paths):
        name = f"{what}[{i}] {path.decode(errors='replace')!r}"
        if not path.startswith(b"/") or b"\0" in path:
            raise ValueError(f"{name}: must be an absolute path without NUL")
        if any(part in (b"", b".", b"..") for part in path[1:].split(b"/")):
            raise ValueError(f"{name}: has an empty, '.' or '..' component")
        if path in seen:
            raise ValueError(f"{name}: named twice")
        seen.add(path)


def check_files_in(files_in, max_put_bytes: int) -> None:
    """Modes and the total size of files to put; ValueError naming the first bad file."""
    check_paths("files_in", [path for path, _, _ in files_in])
    total = 0
    for i, (path, mode, data) in enumerate(files_in):
        name = f"files_in[{i}] {path.decode(errors='replace')!r}"
        if mode & ~0o777:
            raise ValueError(f"{name}: mode {mode:o} has bits beyond 0777 (no setuid, setgid or sticky)")
        total += len(data)
        if total > max_put_bytes:
            raise OverflowError(f"{name}: {len(data)} bytes bring the files to put to {total} bytes, "
                                f"over the cap of {max_put_bytes} bytes per task")
