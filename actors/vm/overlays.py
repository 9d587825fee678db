"""A VM's files on the host and who owns them: the qcow2 overlay each VM
writes to (on the read-only gold image), their removal, and the shared
image files kept root's so that QEMU's user can only read them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from actors.vm.errors import HypervisorError

log = logging.getLogger("corral.hypervisor")


def create_overlay(gold: Path, overlay: Path) -> None:
    """A qcow2 overlay on the gold image with an explicit backing format:
    every write lands here, never in the gold image."""
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(gold), "-F", "qcow2", str(overlay)],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise HypervisorError(f"cannot create overlay {overlay}: {result.stderr.strip()}")


def overlay_data_bytes(overlay: Path) -> int:
    """Bytes of guest data held in the overlay itself (not read through from the
    gold image). -U: no lock needed, so it also reads a running VM's overlay."""
    result = subprocess.run(["qemu-img", "map", "-U", "--output=json", str(overlay)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise HypervisorError(f"cannot map overlay {overlay}: {result.stderr.strip()}")
    return sum(extent["length"] for extent in json.loads(result.stdout)
               if extent.get("depth") == 0 and extent.get("data"))


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def give_back_to_root(paths) -> None:
    """Shared image files every VM reads (kernel, initrd, gold image, agent ISO)
    made root:root again where they are not (an older corrald let libvirt chown
    them to QEMU's user, who could then have made them writable)."""
    for path in paths:
        st = path.stat()
        if (st.st_uid, st.st_gid) != (0, 0):
            os.chown(path, 0, 0)
            log.warning("gave %s back to root (it belonged to uid %d): QEMU only reads it", path, st.st_uid)
