"""The capability table: the one place that says what each capability is and
how it is enforced. Standard library only and free of imports: the guest agent
loads it at every boot, the image build reads it to set groups and file modes,
and the host reads it to pick a VM tier and the Exec's capability bits.

Soft capabilities are enforced inside the guest by its kernel. The task runs as
the unprivileged user `task`; a capability with a group is held by giving the
task that supplementary group. The image build makes every executable file of
the capability's Debian packages `root:<group>` mode 0750 (o-rwx: others can
neither run it nor read it to copy it), so a task without the group gets EACCES
from execve however it tries: directly, from a shell, or from a python3 that
runs gcc. `fs:write_tmp` is a group too (/tmp, /var/tmp and /dev/shm are
root:corral-tmp 1775: listable by all, writable by the group). `sys:ptrace` is a
sysctl: kernel.yama.ptrace_scope is 2 (ptrace needs CAP_SYS_PTRACE, which tasks
never have) unless the task holds it, then 0 for that task alone.

Hard capabilities are applied by the hypervisor before the VM runs the task:
`net:egress` and `res:large_mem` choose the VM's tier (a NIC, 4 GiB of memory:
fixed when a VM boots, so each tier has its own VMs), `res:high_cpu` sets the
VM's CPU shares and quota live before it is resumed. `dev:gpu` is never offered.
"""

# --- soft: enforced by the guest kernel -------------------------------------------

BASE_EXECUTE = "base:execute"
DEV_COMPILER = "dev:compiler"
DEV_PYTHON = "dev:python"
FS_WRITE_TMP = "fs:write_tmp"
SYS_PTRACE = "sys:ptrace"

# name -> (bit in Exec.capabilities, group, gid, Debian packages whose executables
# only that group may run). Changing a group, gid or package list changes the gold
# image: this file is part of the image recipe's hash (guest/image/build.py).
SOFT = {
    BASE_EXECUTE: (0x01, "corral-exec", 1101, ("coreutils",)),
    DEV_COMPILER: (0x02, "corral-cc", 1102, (
        # The drivers (gcc, g++, cpp, c89/c99), the real compilers (cc1, cc1plus,
        # lto1), collect2 and lto-wrapper, the assembler and linkers, make and cmake.
        "gcc-12", "g++-12", "cpp-12", "gcc", "g++", "cpp", "binutils",
        "binutils-x86-64-linux-gnu", "make", "cmake")),
    DEV_PYTHON: (0x04, "corral-py", 1103, (
        "python3.11-minimal", "python3.11", "python3-minimal", "python3")),
    FS_WRITE_TMP: (0x08, "corral-tmp", 1104, ()),
    SYS_PTRACE: (0x10, None, None, ()),
}
# Directories every task may list and only fs:write_tmp tasks may write (mode 1775).
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
SHARED_TMP_MODE = 0o1775
# kernel.yama.ptrace_scope without and with sys:ptrace. Not 3: that one is sticky
# until reboot, so it could not be lowered again for the next task.
PTRACE_SCOPE_DENIED = 2
PTRACE_SCOPE_ALLOWED = 0

# --- hard: applied by the hypervisor ------------------------------------------------

NET_EGRESS = "net:egress"
RES_HIGH_CPU = "res:high_cpu"
RES_LARGE_MEM = "res:large_mem"
DEV_GPU = "dev:gpu"
HARD = (NET_EGRESS, RES_HIGH_CPU, RES_LARGE_MEM, DEV_GPU)

ALL = tuple(SOFT) + HARD


def soft_bits(names) -> int:
    """Exec.capabilities for these capability names (hard and unknown ones add nothing)."""
    bits = 0
    for name in names:
        entry = SOFT.get(name.decode() if isinstance(name, bytes) else name)
        if entry is not None:
            bits |= entry[0]
    return bits


def groups_for(bits: int) -> list[int]:
    """The supplementary group ids a task with these bits runs with."""
    return [gid for bit, _, gid, _ in SOFT.values() if gid is not None and bits & bit]


def capability_of_gid(gid: int) -> str | None:
    """The capability whose group owns files with this gid (None: an ordinary file)."""
    for name, (_, _, group_gid, _) in SOFT.items():
        if group_gid == gid:
            return name
    return None


ALL_SOFT_BITS = soft_bits(SOFT)
