"""Which accelerator VMs run under (KVM or TCG), and whether QEMU's user can
open /dev/kvm: read from the host's CPU flags and device files."""

from __future__ import annotations

import grp
import logging
import os
import pwd

from actors.vm.errors import HypervisorError

log = logging.getLogger("corral.hypervisor")


def cpu_has_hardware_virtualization(cpuinfo: str) -> bool:
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"vmx", "svm"})


def detect_accelerator(choice: str = "auto", cpuinfo_path: str = "/proc/cpuinfo",
                       kvm_path: str = "/dev/kvm") -> str:
    """'kvm' only with vmx/svm in the CPU flags and a /dev/kvm that opens; else 'tcg'.

    A /dev/kvm without vmx/svm (kvm_pvm on the build machines) hangs stock
    kernels, so the device alone proves nothing.
    """
    if choice == "tcg":
        return "tcg"
    with open(cpuinfo_path) as f:
        hardware = cpu_has_hardware_virtualization(f.read())
    try:
        os.close(os.open(kvm_path, os.O_RDWR))
        usable = True
    except OSError:
        usable = False
    if choice == "kvm":
        if not (hardware and usable):
            raise HypervisorError(
                f"vm.accelerator = 'kvm' but this host has {'no vmx/svm CPU flag' if not hardware else 'no usable ' + kvm_path}; "
                "set vm.accelerator = 'auto' or 'tcg'")
        return "kvm"
    return "kvm" if hardware and usable else "tcg"


def qemu_user_can_open(path: str, uid: int, gid: int) -> bool:
    """Whether a process of uid (group gid, plus the groups libvirt gives that
    user: its passwd group and its supplementary groups) may open `path`
    read-write, by its owner, group and mode."""
    st = os.stat(path)
    if uid == 0:
        return True
    try:
        user = pwd.getpwuid(uid)
        # Debian's libvirt-qemu has kvm as its passwd group, which /etc/group does not list.
        groups = {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem} | {gid, user.pw_gid}
    except KeyError:  # no such user in the passwd database: its primary group only
        groups = {gid}
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid in groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & 0o6 == 0o6


def warn_if_kvm_closed_to_qemu(owner: tuple[int, int] | None, kvm_path: str = "/dev/kvm") -> bool:
    """One warning when /dev/kvm exists but QEMU's user cannot open it: libvirtd
    then re-probes QEMU at every domain start (GUEST-NOTES.md). True if warned."""
    if owner is None or not os.path.exists(kvm_path) or qemu_user_can_open(kvm_path, *owner):
        return False
    st = os.stat(kvm_path)
    log.warning("%s is %s:%s %o and QEMU's user (uid %d) cannot open it: libvirtd then re-probes "
                "QEMU at every domain start (2-4 s each, also under TCG). Fix it as udev would: "
                "chgrp kvm %s; chmod 0660 %s (scripts/setup-host does this)",
                kvm_path, _user_name(st.st_uid), _group_name(st.st_gid), st.st_mode & 0o7777,
                owner[0], kvm_path, kvm_path)
    return True


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
