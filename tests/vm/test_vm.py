"""End to end against a real VM: the gold image booted under libvirt (TCG here,
KVM where the host has it), the real agent from its read-only ISO, the real
channel. Each module's VM is shared by its tests; destruction gets its own VM."""

import json
import time
from pathlib import Path

import pytest

from tests.support.vm import BootedVm


def test_agent_says_hello_with_its_kernel(booted_vm):
    assert booted_vm.hello.agent_version
    assert booted_vm.hello.kernel.endswith("-amd64")
    assert len(booted_vm.hello.boot_id) == 36


def test_echo(booted_vm):
    result = booted_vm.run("echo", "hello")
    assert (result.stdout, result.stderr, result.exit.exit_code) == (b"hello\n", b"", 0)


def test_python(booted_vm):
    result = booted_vm.run("python3", "-c", "print(6*7)")
    assert (result.stdout, result.exit.exit_code) == (b"42\n", 0)


def test_failing_command_keeps_its_code_and_stderr(booted_vm):
    result = booted_vm.run("sh", "-c", "echo out; echo oops >&2; exit 3")
    assert result.stdout == b"out\n"
    assert result.stderr == b"oops\n"
    assert result.exit.exit_code == 3 and result.exit.signal == 0


def test_missing_command_is_127_with_a_message(booted_vm):
    result = booted_vm.run("no-such-command")
    assert result.exit.exit_code == 127
    assert b"no-such-command" in result.stderr


def test_killed_by_signal(booted_vm):
    result = booted_vm.run("sh", "-c", "kill -KILL $$")
    assert (result.exit.exit_code, result.exit.signal) == (-1, 9)


def test_timeout_kills_the_process_group(booted_vm):
    started = time.monotonic()
    result = booted_vm.run("sh", "-c", "sleep 30 & sleep 30", timeout_ms=500)
    assert result.exit.timed_out and result.exit.signal == 9
    assert time.monotonic() - started < 5
    leftovers = booted_vm.run("ps", "-u", "task", "-o", "stat=,comm=").stdout.decode().splitlines()
    assert [p for p in leftovers if "sleep" in p and not p.startswith("Z")] == []


def test_stdin_env_and_cwd_reach_the_task(booted_vm):
    result = booted_vm.run("sh", "-c", 'cat; echo "$GREETING"; pwd', stdin=b"from stdin\n",
                           env={b"GREETING": b"hi"}, cwd=b"/tmp")
    assert result.stdout == b"from stdin\nhi\n/tmp\n"


def test_tasks_run_unprivileged(booted_vm):
    result = booted_vm.run("id", "-u")
    assert result.stdout == b"1000\n"


def test_resource_use_is_reported(booted_vm):
    result = booted_vm.run("python3", "-c", "x = bytearray(64 << 20); print(len(x))")
    assert result.exit.exit_code == 0
    assert result.exit.max_rss_kib > 64 * 1024
    assert result.exit.wall_ms > 0 and result.exit.user_cpu_ms + result.exit.sys_cpu_ms > 0


def test_output_is_capped_in_the_guest(booted_vm):
    result = booted_vm.run("sh", "-c", "head -c 100000 /dev/zero", output_cap=1000)
    assert len(result.stdout) == 1000 and result.exit.stdout_truncated


ISO_ATTACK = r'''
import errno, fcntl, hashlib, json, os, subprocess
AGENT = "/opt/corral/guest/agent.py"
digest = lambda: hashlib.sha256(open(AGENT, "rb").read()).hexdigest()
before = digest()
device = next("/dev/" + d for d in os.listdir("/sys/block")
              if open(f"/sys/block/{d}/serial").read().strip() == "corral-agent")
out = {"uid": os.getuid()}
def attempt(name, action):
    try:
        action()
        out[name] = "succeeded"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
attempt("append_to_agent", lambda: open(AGENT, "a").write("#"))
attempt("create_file", lambda: open("/opt/corral/new", "w"))
attempt("chmod_agent", lambda: os.chmod(AGENT, 0o777))
out["remount_rw"] = subprocess.run(["mount", "-o", "remount,rw", "/opt/corral"],
                                   capture_output=True).returncode
def write_device():
    fd = os.open(device, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0x125D, b"\0\0\0\0")  # BLKROSET 0: ask the guest kernel for rw
    finally:
        os.close(fd)
    fd = os.open(device, os.O_WRONLY)
    try:
        os.write(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
attempt("write_block_device", write_device)
out["sysfs_ro"] = open(f"/sys/block/{device[5:]}/ro").read().strip()
os.system("echo 3 > /proc/sys/vm/drop_caches")
out["unchanged"] = digest() == before
print(json.dumps(out))
'''


def test_agent_iso_cannot_be_modified_even_by_root(booted_vm):
    result = booted_vm.run("python3", "-", stdin=ISO_ATTACK.encode(), as_root=True)
    assert result.exit.exit_code == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == 0
    assert seen["append_to_agent"] == "EROFS"
    assert seen["create_file"] == "EROFS"
    assert seen["chmod_agent"] == "EROFS"
    assert seen["remount_rw"] != 0
    assert seen["write_block_device"] in ("EROFS", "EPERM", "EACCES", "EIO")
    assert seen["sysfs_ro"] == "1"
    assert seen["unchanged"] is True


def test_destroy_removes_domain_overlay_and_socket(hypervisor, cfg):
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
    assert vm.run("true").exit.exit_code == 0
    handle = vm.handle
    assert hypervisor.domain_exists(handle.name)
    assert handle.overlay.is_file() and Path(handle.socket).exists()
    vm.destroy()
    assert not hypervisor.domain_exists(handle.name)
    assert not handle.overlay.exists()
    assert not Path(handle.socket).exists()


def test_missing_working_directory_is_named(booted_vm):
    result = booted_vm.run("true", cwd=b"/no/such/dir")
    assert result.exit.exit_code == 127
    assert b"/no/such/dir" in result.stderr


def test_reset_leaves_no_task_process_file_or_ipc_object(booted_vm):
    setup = booted_vm.run("python3", "-c", """
import os, subprocess, sys
open('/tmp/left-behind', 'w').write('x')
open(os.path.expanduser('~/in-home'), 'w').write('x')
subprocess.run(['sh', '-c', 'ipcmk -M 4096 >/dev/null'], check=True)
subprocess.Popen(['setsid', 'sleep', '600'])
""")
    assert setup.exit.exit_code == 0, setup.stderr
    done = booted_vm.link.reset(time.monotonic() + 30)
    assert done.ok, done.detail
    check = booted_vm.run("python3", "-c", """
import os
mine = str(os.getpid())
others = [p for p in os.listdir('/proc') if p.isdigit() and p != mine
          and os.stat('/proc/' + p).st_uid == os.getuid()]
print(os.listdir('/tmp'), os.listdir(os.path.expanduser('~')), others,
      open('/proc/sysvipc/shm').read().count(chr(10)) - 1)
""")
    assert check.stdout == b"[] [] [] 0\n", check.stdout


def test_shared_image_files_stay_roots_while_vms_run(booted_vm, hypervisor):
    """libvirt relabels none of the files every VM shares: a QEMU escape (running as
    QEMU's user) cannot chmod the gold image, agent ISO, kernel or initrd writable."""
    if hypervisor.qemu_owner is None:  # QEMU runs as root here, or another driver labels
        pytest.fail("this host's libvirt runs QEMU as root or confined: the test expects DAC")
    image = hypervisor.image
    for path in (image.kernel, image.initrd, image.disk, image.agent_iso):
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o444), path
    overlay = next(hypervisor.overlay_dir.glob(booted_vm.handle.name + ".*"))
    assert overlay.stat().st_uid == hypervisor.qemu_owner[0]  # the VM's own file is QEMU's
    assert booted_vm.run("true").exit.exit_code == 0  # and the VM works without relabelling
