"""Calls into libvirt: each under a deadline, each failure one of the VM layer's errors.

Every call that can block on libvirtd runs on a worker thread and is waited
for at most `timeout_s` (monotonic): a hung libvirtd (or a QEMU monitor that
never answers) becomes a LibvirtDeadline in the caller, which then gives its
VM up, instead of a thread stuck forever with a task nobody answers. The
stuck call stays on its worker (a daemon thread) until libvirt returns;
nothing waits for it.

A libvirt.libvirtError leaves `libvirt_errors` as a HypervisorError, or as the
subclass its error code names (NoSuchDomain for VIR_ERR_NO_DOMAIN).
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from contextlib import contextmanager

from actors.vm.errors import HypervisorError, LibvirtDeadline, NoSuchDomain


def libvirt_module():
    import libvirt  # imported late so a missing binding is a clear error, not an import crash
    return libvirt


def from_libvirt(error, what: str, hint: str = "") -> HypervisorError:
    """The VM layer's error for a libvirt.libvirtError raised while doing `what`:
    "<what>: <libvirt's message>[; <hint>]"."""
    message = f"{what}: {error.get_error_message()}" + (f"; {hint}" if hint else "")
    if error.get_error_code() == libvirt_module().VIR_ERR_NO_DOMAIN:
        return NoSuchDomain(message)
    return HypervisorError(message)


@contextmanager
def libvirt_errors(what: str, hint: str = ""):
    """Inside, a libvirt.libvirtError is raised as from_libvirt(error, what, hint)."""
    libvirt = libvirt_module()
    try:
        yield
    except libvirt.libvirtError as e:
        raise from_libvirt(e, what, hint) from None


class DeadlineCalls:
    """Runs blocking calls on daemon worker threads, waiting at most timeout_s each."""

    def __init__(self, timeout_s: float, workers: int = 16):
        self.timeout_s = timeout_s
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._inside = threading.local()
        for n in range(workers):
            threading.Thread(target=self._worker, name=f"hypervisor-call-{n}", daemon=True).start()

    def _worker(self) -> None:
        self._inside.active = True
        while True:
            future, fn, args, kwargs = self._work.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)

    def run(self, what: str, fn, *args, **kwargs):
        if getattr(self._inside, "active", False):  # nested: already under a deadline
            return fn(*args, **kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._work.put((future, fn, args, kwargs))
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            if future.cancel():  # it had not started: now it never will
                raise LibvirtDeadline(f"libvirt did not start {what} within {self.timeout_s:g} s "
                                      "(every call worker is busy: is libvirtd hung?)", started=False) from None
            raise LibvirtDeadline(f"libvirt did not finish {what} within {self.timeout_s:g} s "
                                  "(is libvirtd hung?)") from None


def with_deadline(method):
    """A method of an object with DeadlineCalls at `.calls` that talks to
    libvirtd: run it under the call deadline."""

    @functools.wraps(method)
    def under_deadline(self, *args, **kwargs):
        return self.calls.run(method.__name__, method, self, *args, **kwargs)

    return under_deadline
