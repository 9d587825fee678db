"""Live output and stdin end to end: the real `corral` CLI (a process of its
own) and the client library against a real corrald (pool of 1) on real VMs.
The CLI writes the command's output while it runs, `-i` forwards its stdin
with EOF, and without `-i` it never reads its stdin."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.channel.constants import STDERR, STDOUT
from protocol.client.api import Client
from tests.support.service import running_service, service_config

REPO = Path(__file__).resolve().parents[2]
BULK = 3_000_000  # over corrald's stream window and buffer, under the task's output cap below


@pytest.fixture(scope="module")
def service(hypervisor, tmp_path_factory):
    with running_service(service_config(tmp_path_factory.mktemp("streaming"), pool={"size": 1}),
                         hypervisor) as svc:
        yield svc


def corral_run(endpoint: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "protocol.client", "run", "--endpoint", endpoint, *args]


def test_first_line_is_on_the_callers_stdout_while_the_command_runs(endpoint):
    cli = subprocess.Popen(corral_run(endpoint, "--", "sh", "-c", "echo first; sleep 4; echo second"),
                           cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = cli.stdout.readline()
        first_at = time.monotonic()
        rest, err = cli.communicate(timeout=120)
        ended_at = time.monotonic()
    finally:
        cli.kill()
    assert (first, rest, err, cli.returncode) == (b"first\n", b"second\n", b"", 0)
    assert ended_at - first_at > 3.0, f"`first` came only {ended_at - first_at:.2f} s before the end"


def test_interactive_cat_prints_both_lines(endpoint):
    done = subprocess.run(corral_run(endpoint, "-i", "--", "cat"), cwd=REPO, input=b"hello\nworld\n",
                          capture_output=True, timeout=120)
    assert (done.stdout, done.stderr, done.returncode) == (b"hello\nworld\n", b"", 0)


def test_without_i_corral_never_reads_its_stdin(endpoint):
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"the caller's own input\n")
        # The write end stays open: had corral read stdin, it would wait for an EOF that never comes.
        done = subprocess.run(corral_run(endpoint, "--", "true"), cwd=REPO, stdin=read_end,
                              capture_output=True, timeout=120)
        assert (done.stdout, done.stderr, done.returncode) == (b"", b"", 0)
        os.set_blocking(read_end, False)
        assert os.read(read_end, 100) == b"the caller's own input\n"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_interactive_command_that_never_reads_stdin_ends_without_eof(endpoint):
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"nobody reads this\n")
        done = subprocess.run(corral_run(endpoint, "-i", "--", "sh", "-c", "echo done"), cwd=REPO,
                              stdin=read_end, capture_output=True, timeout=120)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert (done.stdout, done.stderr, done.returncode) == (b"done\n", b"", 0)


def test_bulk_output_arrives_byte_for_byte(endpoint):
    script = f"head -c {BULK} /dev/urandom > /tmp/blob; sha256sum /tmp/blob >&2; cat /tmp/blob"
    done = subprocess.run(corral_run(endpoint, "--output-cap", str(BULK + 4096), "--", "sh", "-c", script),
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == BULK
    assert done.stderr == f"{hashlib.sha256(done.stdout).hexdigest()}  /tmp/blob\n".encode()


def test_bulk_stdin_reaches_the_command_whole(endpoint):
    data = os.urandom(1_000_000)  # sixteen 64 KiB chunks and then some
    done = subprocess.run(corral_run(endpoint, "-i", "--", "sha256sum"), cwd=REPO, input=data,
                          capture_output=True, timeout=300)
    assert (done.stdout, done.stderr, done.returncode) == \
        (f"{hashlib.sha256(data).hexdigest()}  -\n".encode(), b"", 0)


def test_client_stream_chunks_carry_offsets_and_the_reply_no_output(endpoint):
    with Client(endpoint) as client:
        task = client.stream(["sh", "-c", "echo out; echo err >&2; sleep 1; echo more"], timeout_s=30)
        chunks = list(task.chunks(wait_s=120))
        reply = task.reply(5)
    assert (reply.error_code, reply.exit_code, reply.stdout, reply.stderr) == ("", 0, b"", b"")
    for stream, expected in ((STDOUT, b"out\nmore\n"), (STDERR, b"err\n")):
        mine = [c for c in chunks if c.stream == stream]
        assert b"".join(c.data for c in mine) == expected
        assert [c.offset for c in mine] == [sum(len(c.data) for c in mine[:i]) for i in range(len(mine))]


def test_a_caller_that_lost_its_connection_attaches_and_loses_or_repeats_no_byte(endpoint):
    """Mid-stream the first connection goes; a new one (same identity) attaches
    at the offsets it had and gets the rest, then the reply."""
    script = "for i in 1 2 3 4 5 6 7 8; do echo line$i; sleep 0.4; done; echo done >&2"
    first = Client(endpoint)
    try:
        task = first.stream(["sh", "-c", script], task_id="reattach", timeout_s=60)
        before = b""
        for chunk in task.chunks(wait_s=60):
            before += chunk.data
            if before.count(b"\n") >= 2:
                break
        offsets = task.offsets
    finally:
        first.close()  # the connection is gone with the task still running
    assert offsets[0] == len(before) and b"line8" not in before
    with Client(endpoint) as second:
        again = second.attach("reattach", *offsets)
        after = {STDOUT: b"", STDERR: b""}
        for chunk in again.chunks(wait_s=60):
            after[chunk.stream] += chunk.data
        reply = again.reply(60)
    assert (reply.error_code, reply.exit_code) == ("", 0)
    assert again.dropped == {STDOUT: 0, STDERR: 0}
    assert before + after[STDOUT] == b"".join(b"line%d\n" % i for i in range(1, 9))
    assert after[STDERR] == b"done\n"
