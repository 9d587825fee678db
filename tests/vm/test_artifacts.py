"""Files in, files out, signed receipts and outcome classes end to end: the
real corrald (pool of 1 to spare the CPU), real VMs, real ZeroMQ, the real
client and `corral` CLI. docs/artifacts.md walks through the same workflow."""

import hashlib
import os
import subprocess
import sys
import threading

import pytest

from protocol.wire import receipts
from protocol.client.api import Client
from tests.support.service import kill_qemu_when_busy, running_service, service_config
from tests.support.waiting import wait_until

MiB = 1 << 20
COLLECT_CAP = 3 * MiB


def pool_ready(service) -> bool:
    state = service.directory.get("pool").proxy().state.get(timeout=5)
    return any(vm.state == "ready" for vm in list(state.vms.values()))


@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory):
    base = tmp_path_factory.mktemp("artifacts")
    cfg = service_config(base, pool={"size": 1},
                         artifacts={"max_put_bytes": 2 * MiB, "max_collect_bytes": COLLECT_CAP,
                                    "key_file": str(base / "keys" / "receipt.key")})
    with running_service(cfg, hypervisor) as svc:
        yield svc


@pytest.fixture
def client(service):
    wait_until(lambda: pool_ready(service), 120, "a ready VM")  # each test starts from a healed pool
    with Client(service.cfg.daemon.endpoint) as c:
        yield c


@pytest.fixture(scope="module")
def public_key(service):
    return receipts.load_public_key(service.signer.public_key_file)


def corral_cli(service, *args):
    return subprocess.run([sys.executable, "-m", "protocol.client", *args[:1],
                           "--endpoint", service.cfg.daemon.endpoint, *args[1:]],
                          capture_output=True, timeout=180)


# --- outcome classes, each triggered in a real VM -----------------------------------

def test_outcome_completed(client):
    reply = client.run(["true"])
    assert (reply.outcome, reply.error_code, reply.exit_code) == ("completed", "", 0)


def test_outcome_exited_nonzero(client):
    reply = client.run(["sh", "-c", "exit 3"])
    assert (reply.outcome, reply.exit_code) == ("exited_nonzero", 3)


def test_outcome_killed_by_signal(client):
    reply = client.run(["sh", "-c", "kill -SEGV $$"])
    assert (reply.outcome, reply.signal, reply.exit_code) == ("killed_by_signal", 11, -1)


def test_outcome_output_truncated(client):
    reply = client.run(["head", "-c", "5000", "/dev/zero"], output_cap=1000)
    assert (reply.outcome, reply.exit_code, len(reply.stdout), reply.stdout_truncated) == \
        ("output_truncated", 0, 1000, True)


def test_outcome_oom_killed(client):
    # tail keeps its whole input while looking for a last line: /dev/zero has
    # none, so it grows until the guest kernel's OOM killer takes it.
    reply = client.run(["tail", "/dev/zero"], timeout_s=120)
    assert (reply.outcome, reply.signal) == ("oom_killed", 9), reply
    # The VM was reset, not lost: the next task runs normally.
    assert client.run(["true"]).outcome == "completed"


def test_outcome_timed_out_and_its_files_still_come_back_signed_as_such(client, public_key):
    reply = client.run(["sh", "-c", "echo partial > /tmp/log; exec sleep 600"], timeout_s=2,
                       collect=["/tmp/log"])
    assert (reply.outcome, reply.error_code, reply.timed_out) == ("timed_out", "timeout", True)
    _, error, data, receipt = reply.files_out[0]
    assert (error, data) == ("", b"partial\n")
    facts = receipts.verify(data, receipt, public_key)
    assert (facts.outcome, facts.signal) == ("timed_out", 9)


def test_outcome_counts_reach_prometheus(service, client):
    before = service.metrics.outcomes.labels("exited_nonzero")._value.get()
    assert client.run(["false"]).outcome == "exited_nonzero"
    assert service.metrics.outcomes.labels("exited_nonzero")._value.get() == before + 1


def test_outcome_vm_crashed(service, client):
    future = client.submit(["sleep", "60"], timeout_s=90)
    kill_qemu_when_busy(service)
    reply = future.result(timeout=60)
    assert (reply.outcome, reply.error_code) == ("vm_crashed", "vm_lost"), reply


def test_cli_shows_the_outcome_of_a_crashed_vm(service):
    wait_until(lambda: pool_ready(service), 120, "a ready VM")
    killer = threading.Thread(target=kill_qemu_when_busy, args=(service,))
    killer.start()
    done = corral_cli(service, "run", "--timeout", "90", "--", "sleep", "60")
    killer.join()
    assert done.returncode == 125
    assert b"error vm_lost" in done.stderr and b"(outcome vm_crashed)" in done.stderr, done.stderr


# --- files in and out --------------------------------------------------------------

def test_files_are_put_as_the_task_user_and_collected_with_receipts(client, public_key):
    reply = client.run(
        ["sh", "-c", "stat -c '%U %a' /tmp/in/data.txt /home/task/run.sh && /home/task/run.sh "
                     "&& head -c 1500000 /dev/urandom > /tmp/out.bin"],
        files_in=[("/tmp/in/data.txt", b"hello\n", 0o640), ("/home/task/run.sh", b"#!/bin/sh\ncat /tmp/in/data.txt\n", 0o755)],
        collect=["/tmp/out.bin", "/tmp/in/data.txt", "/tmp/missing"])
    assert (reply.outcome, reply.stdout) == ("completed", b"task 640\ntask 755\nhello\n"), reply.stderr
    (p1, e1, d1, r1), (p2, e2, d2, r2), (p3, e3, d3, r3) = reply.files_out
    assert (p1, e1, len(d1)) == (b"/tmp/out.bin", "", 1500000)  # two 1 MiB chunks through IOGuard
    assert (p2, e2, d2) == (b"/tmp/in/data.txt", "", b"hello\n")
    assert (p3, e3, d3, r3) == (b"/tmp/missing", "No such file or directory", b"", b"")
    body = receipts.verify(d1, r1, public_key)
    assert (body.task_id, body.path, body.outcome, body.exit_code) == (reply.task_id, p1, "completed", 0)
    receipts.verify(d2, r2, public_key)


def test_files_up_to_the_put_cap_arrive_whole(client):
    data = os.urandom(2 * MiB - 100)
    reply = client.run(["sh", "-c", "sha256sum < /tmp/blob; wc -c < /home/task/tiny"],
                       files_in=[("/tmp/blob", data, 0o600), ("/home/task/tiny", b"x" * 100, 0o600)])
    assert reply.stdout == f"{hashlib.sha256(data).hexdigest()}  -\n100\n".encode(), reply.stderr


def test_oversized_put_is_refused_naming_the_file(client):
    reply = client.run(["true"], files_in=[("/tmp/a", b"a" * MiB, 0o644), ("/tmp/b", b"b" * (MiB + 1), 0o644)])
    assert reply.error_code == "files_too_large"
    assert "files_in[1] '/tmp/b'" in reply.error_message and "over the cap of 2097152" in reply.error_message


def test_collect_over_the_cap_is_a_per_file_error_not_a_task_failure(client, public_key):
    reply = client.run(["sh", "-c", "head -c 4000000 /dev/zero > /tmp/big; echo small > /tmp/small"],
                       collect=["/tmp/big", "/tmp/small"])
    assert (reply.outcome, reply.error_code) == ("completed", "")
    (p1, e1, d1, r1), (p2, e2, d2, r2) = reply.files_out
    assert (p1, d1, r1) == (b"/tmp/big", b"", b"")
    assert e1 == f"4000000 bytes, over the collect cap ({COLLECT_CAP} bytes left)"
    assert (p2, e2, d2) == (b"/tmp/small", "", b"small\n")
    receipts.verify(d2, r2, public_key)


def test_symlinks_and_places_outside_the_task_are_refused(client):
    reply = client.run(["sh", "-c", "ln -s /etc /tmp/etc; ln -s /etc/hostname /tmp/host"],
                       collect=["/tmp/etc/hostname", "/tmp/host", "/etc/hostname", "/tmp"])
    assert reply.outcome == "completed"
    errors = [(path, error) for path, error, _, _ in reply.files_out]
    assert errors == [
        (b"/tmp/etc/hostname", "'etc' on the path is a symlink or not a directory"),
        (b"/tmp/host", "is a symlink"),
        (b"/etc/hostname", "outside the places a task may write (/tmp, /var/tmp, /dev/shm, /home/task)"),
        (b"/tmp", "outside the places a task may write (/tmp, /var/tmp, /dev/shm, /home/task)"),
    ]


def test_a_put_outside_the_task_places_is_refused_and_the_command_not_run(client):
    reply = client.run(["sh", "-c", "echo ran"], files_in=[("/etc/cron.d/evil", b"x", 0o644)])
    assert (reply.error_code, reply.outcome, reply.stdout) == ("put_failed", "not_run", b"")
    assert "/etc/cron.d/evil: outside the places a task may write" in reply.error_message
    assert client.run(["sh", "-c", "echo ran"]).stdout == b"ran\n"  # the VM was reset and serves on


# --- the worked example of docs/artifacts.md: compile -> verify -> accept ----------

SOURCE = b"""int sum_ints(const int *v, int n) { int s = 0; for (int i = 0; i < n; i++) s += v[i]; return s; }
"""
BROKEN_SOURCE = b"int not_what_was_asked(void) { return 0; }\n"
VERIFIER = b"""#!/bin/sh
# verify.sh OBJECT SYMBOL: an x86-64 ELF shared object that defines SYMBOL.
set -u
obj=$1 sym=$2
magic=$(od -An -tx1 -N4 "$obj" | tr -d ' ')
etype=$(od -An -tu2 -j16 -N2 "$obj" | tr -d ' ')
digest=$(sha256sum "$obj" | cut -d' ' -f1)
if [ "$magic" != 7f454c46 ] || [ "$etype" != 3 ]; then
    echo "FAIL $digest not an ELF shared object" > /tmp/verdict; exit 1
fi
if ! grep -q "$sym" "$obj"; then
    echo "FAIL $digest no symbol $sym" > /tmp/verdict; exit 1
fi
echo "PASS $digest" > /tmp/verdict
"""


def build_and_verify(client, public_key, source: bytes, accepted_dir, tamper=None):
    """The caller of docs/artifacts.md: returns the accepted object's path or None."""
    build = client.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", "/tmp/build/libsum.so", "/tmp/build/sum.c"],
        capabilities=["dev:compiler", "fs:write_tmp"], timeout_s=120,
        files_in=[("/tmp/build/sum.c", source, 0o644)], collect=["/tmp/build/libsum.so"])
    if build.outcome != "completed":
        return None
    _, error, obj, obj_receipt = build.files_out[0]
    if error:
        return None
    if tamper:
        obj = tamper(obj)
    try:
        receipts.verify(obj, obj_receipt, public_key)
    except receipts.ReceiptInvalid:
        return None
    check = client.run(
        ["/tmp/verify.sh", "/tmp/in/libsum.so", "sum_ints"], capabilities=["base:execute"], timeout_s=60,
        files_in=[("/tmp/verify.sh", VERIFIER, 0o755), ("/tmp/in/libsum.so", obj, 0o644)],
        collect=["/tmp/verdict"])
    _, error, verdict, verdict_receipt = check.files_out[0]
    if check.outcome != "completed" or check.exit_code != 0 or error:
        return None
    try:
        facts = receipts.verify(verdict, verdict_receipt, public_key)
    except receipts.ReceiptInvalid:
        return None
    if facts.exit_code != 0 or verdict != f"PASS {hashlib.sha256(obj).hexdigest()}\n".encode():
        return None  # the verdict must be a pass over exactly this object
    target = accepted_dir / "libsum.so"
    target.write_bytes(obj)
    (accepted_dir / "libsum.so.receipt").write_bytes(obj_receipt)
    return target


def test_workflow_accepts_a_verified_build(client, public_key, tmp_path):
    accepted = build_and_verify(client, public_key, SOURCE, tmp_path)
    assert accepted is not None and accepted.read_bytes()[:4] == b"\x7fELF"


def test_workflow_verifier_failure_leaves_nothing_accepted(client, public_key, tmp_path):
    assert build_and_verify(client, public_key, BROKEN_SOURCE, tmp_path) is None
    assert os.listdir(tmp_path) == []


def test_workflow_tampered_artifact_is_rejected(client, public_key, tmp_path):
    flip = lambda obj: obj[:100] + bytes([obj[100] ^ 1]) + obj[101:]
    assert build_and_verify(client, public_key, SOURCE, tmp_path, tamper=flip) is None
    assert os.listdir(tmp_path) == []


def test_cli_collects_and_corral_verify_rejects_a_tampered_copy(service, tmp_path):
    source = tmp_path / "sum.c"
    source.write_bytes(SOURCE)
    out = tmp_path / "out"
    out.mkdir()
    done = corral_cli(service, "run", "--cap", "dev:compiler", "--cap", "fs:write_tmp", "--timeout", "120",
                      "--put", f"{source}:/tmp/build/sum.c", "--collect", "/tmp/build/libsum.so",
                      "--out", str(out), "--", "gcc", "-shared", "-fPIC", "-o", "/tmp/build/libsum.so",
                      "/tmp/build/sum.c")
    assert done.returncode == 0, done.stderr
    key = str(service.signer.public_key_file)
    ok = corral_cli(service, "verify", "--host-key", key, "--expect-exit", "0", str(out / "libsum.so"))
    assert ok.returncode == 0, ok.stderr
    assert b"outcome completed, exit 0" in ok.stdout
    data = bytearray((out / "libsum.so").read_bytes())
    data[200] ^= 0xFF
    (out / "libsum.so").write_bytes(data)
    bad = corral_cli(service, "verify", "--host-key", key, str(out / "libsum.so"))
    assert bad.returncode == 1
    assert b"REJECTED" in bad.stderr and b"does not match the receipt" in bad.stderr
