"""QEMU's own monitor (QMP) for one VM: pause and resume without libvirtd.

Why: a warm acquire is one resume, and libvirt's resume() costs ~5 ms on the
build machines (RPC, job, status XML written to disk) where QEMU's `cont`
costs ~2 ms. Each VM gets a second QMP socket (`-qmp`, added by the
hypervisor layer), which its Supervisor connects to right after the domain
starts and then unlinks, so no other process can connect to it after us.
libvirt still owns the domain: it learns of our `stop`/`cont` from QEMU's
STOP/RESUME events and reports the state as usual.

Layering as in qemu.qmp: newline-delimited JSON messages; a command carries
an id and the reply with the same id answers it; anything else (events)
is read and dropped. Every wait has a deadline on the monotonic clock. A
QEMU that breaks the protocol, errs (QmpError), or does not answer in time
(QmpTimeout) is a HypervisorError, which ends the VM like any failed libvirt
call.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from actors.vm.errors import HypervisorError, QmpError, QmpTimeout

MAX_MESSAGE_BYTES = 1 << 20  # QEMU's replies to our commands are tiny; more is a broken monitor


class QmpMonitor:
    def __init__(self, path: Path, timeout_s: float):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self._buffer = bytearray()
        self._next_id = 0

    def connect(self) -> None:
        """Connect and unlink the socket's path at once (from here on this
        connection is the only way in), then take the greeting and leave
        negotiation mode, all within one timeout."""
        deadline = time.monotonic() + self.timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(self.timeout_s)
            self.sock.connect(str(self.path))
        except OSError as e:
            self.close()
            raise HypervisorError(f"cannot connect to QEMU's monitor at {self.path}: {e}") from None
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        try:
            if "QMP" not in self._read_message(deadline):
                raise HypervisorError("QEMU's monitor did not greet with QMP")
            self.execute("qmp_capabilities", deadline=deadline)
        except HypervisorError:
            self.close()
            raise

    def pause(self) -> None:
        self.execute("stop")

    def resume(self) -> None:
        self.execute("cont")

    def execute(self, command: str, arguments: dict | None = None, deadline: float | None = None) -> dict:
        """Run one command; its `return` value, or QmpError (QEMU refused it),
        QmpTimeout (no answer by the deadline) or HypervisorError."""
        if self.sock is None:
            raise HypervisorError(f"QEMU's monitor is closed ({command})")
        if deadline is None:
            deadline = time.monotonic() + self.timeout_s
        self._next_id += 1
        request = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
        except OSError as e:
            raise HypervisorError(f"QEMU's monitor is gone ({command}: {e})") from None
        while True:
            message = self._read_message(deadline)
            if message.get("id") != self._next_id:
                continue  # an event (or a late answer to nothing of ours)
            if "error" in message:
                error = message["error"]
                detail = error.get("desc", error) if isinstance(error, dict) else error
                error_class = error.get("class", "") if isinstance(error, dict) else ""
                raise QmpError(f"QEMU refused {command}: {detail}", str(error_class))
            if "return" not in message:
                raise HypervisorError(f"QEMU answered {command} with neither return nor error")
            return message["return"]

    def _read_message(self, deadline: float) -> dict:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError:
                    raise HypervisorError("QEMU's monitor sent something that is not JSON") from None
                if not isinstance(message, dict):
                    raise HypervisorError("QEMU's monitor sent a JSON value that is not an object")
                return message
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise HypervisorError(f"QEMU's monitor sent a message over {MAX_MESSAGE_BYTES} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeout(f"QEMU's monitor did not answer within {self.timeout_s:g} s")
            try:
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue  # the deadline check above ends it
            except OSError as e:
                raise HypervisorError(f"QEMU's monitor failed: {e}") from None
            if not chunk:
                raise HypervisorError("QEMU's monitor closed (QEMU exited?)")
            self._buffer += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
