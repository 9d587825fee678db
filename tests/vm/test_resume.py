"""Resume against the real agent in a real VM: the clock it sets, the sequences
it rebases, the state it refuses it in (an exec running). A cold-booted VM
stands in for a restored clone: the agent handles Resume the same either way,
only the clone's guest sequence starts elsewhere than 0. Each test boots its
own VM: a Resume moves its clock, and a violation ends the VM."""

import secrets
import time

import pytest

from actors.vm.errors import ChannelClosed
from protocol.channel import codec, constants, messages
from protocol.channel.capabilities import ALL_SOFT_BITS
from protocol.channel.errors import UnexpectedMessage
from protocol.channel.frame import FrameEncoder
from protocol.hostcrc import crc32
from tests.support.vm import BootedVm

HOUR_NS = 3600 * 10**9
# The guest's clock before the first Resume is its RTC's (whole seconds) plus
# TCG's drift since boot; a Resume's own trip takes milliseconds.
STEP_SLACK_NS = 2 * 10**9
POWER_OFF_S = 30


@pytest.fixture
def vm(hypervisor, cfg):
    vm = BootedVm(hypervisor, cfg.vm.boot_timeout_s)
    yield vm
    vm.destroy()


def resume_at(link, time_ns: int, timeout_s: float = 10) -> messages.ResumeDone:
    """GuestLink.resume with a chosen time instead of now: the same steps."""
    host_seq, guest_seq = secrets.randbits(32), secrets.randbits(32)
    link.send(messages.Resume(time_ns=time_ns, entropy=secrets.token_bytes(constants.RESUME_ENTROPY_LEN),
                              host_seq=host_seq, guest_seq=guest_seq))
    link.encoder.rebase(host_seq)
    link.decoder.rebase(guest_seq)
    answer = link.receive(frozenset({messages.ResumeDone, messages.Error}), time.monotonic() + timeout_s)
    if isinstance(answer, messages.Error):
        raise UnexpectedMessage(f"guest refused the Resume: {answer.code}: {answer.message}")
    return answer


def guest_time(vm) -> tuple[float, float, float]:
    """(host time before, guest `date`, host time after) in seconds since the epoch."""
    before = time.time()
    result = vm.run("date", "+%s.%N")
    after = time.time()
    assert result.exit.exit_code == 0, result
    return before, float(result.stdout), after


def heartbeat(vm, nonce: int) -> None:
    vm.link.send(messages.Heartbeat(nonce=nonce))
    ack = vm.link.receive(frozenset({messages.HeartbeatAck}), time.monotonic() + 10)
    assert ack.nonce == nonce


def test_resume_an_hour_ahead_puts_the_guest_clock_an_hour_ahead(vm):
    done = resume_at(vm.link, time.time_ns() + HOUR_NS)
    assert abs(done.clock_step_ns - HOUR_NS) < STEP_SLACK_NS, done
    before, guest, after = guest_time(vm)
    assert before + 3600 - 1 < guest < after + 3600 + 1


def test_resume_back_to_now_puts_the_clock_within_a_second_of_the_hosts(vm):
    ahead = resume_at(vm.link, time.time_ns() + HOUR_NS)
    assert abs(ahead.clock_step_ns - HOUR_NS) < STEP_SLACK_NS, ahead
    heartbeat(vm, 1)  # host frames on the new base pass, and so do the guest's answers
    back = vm.link.resume(time.monotonic() + 10)  # the host's own: now, fresh bases
    assert abs(back.clock_step_ns + HOUR_NS) < STEP_SLACK_NS, back
    heartbeat(vm, 2)
    before, guest, after = guest_time(vm)
    assert before - 1 < guest < after + 1


def test_resume_after_an_exec_is_taken_and_sets_the_clock(vm):
    """A session's VM is saved between its execs: its clones hear a Resume after work."""
    assert vm.run("true").exit.exit_code == 0
    done = resume_at(vm.link, time.time_ns() + HOUR_NS)
    assert abs(done.clock_step_ns - HOUR_NS) < STEP_SLACK_NS, done
    heartbeat(vm, 3)
    before, guest, after = guest_time(vm)
    assert before + 3600 - 1 < guest < after + 3600 + 1


def test_resume_while_an_exec_runs_is_refused_and_changes_no_clock(vm):
    vm.link.send(messages.Exec(exec_id=7, argv=(b"sh", b"-c", b"echo started; sleep 2"), env=(), cwd=b"",
                               stdin=b"", timeout_ms=10_000, output_cap=1024, as_root=False,
                               capabilities=ALL_SOFT_BITS))
    started = vm.link.receive(frozenset({messages.Output}), time.monotonic() + 20)  # it runs: on the old base
    assert (started.exec_id, started.data) == (7, b"started\n")
    with pytest.raises(UnexpectedMessage, match="resume_refused"):
        resume_at(vm.link, time.time_ns() + HOUR_NS)
    # The refusal came on the new guest base and the agent took the host's: the
    # channel goes on, and so does the exec. The clock was not touched.
    finished = vm.link.receive(frozenset({messages.Exit}), time.monotonic() + 20)
    assert finished.exec_id == 7 and finished.exit_code == 0
    heartbeat(vm, 3)
    before, guest, after = guest_time(vm)
    assert before - 1 < guest < after + 1


def ends_the_vm(vm) -> None:
    """The agent powers the VM off on a protocol violation: the channel ends,
    and the (transient) domain with it."""
    with pytest.raises(ChannelClosed):
        vm.link.receive(frozenset(messages.GUEST_TO_HOST), time.monotonic() + POWER_OFF_S)
    deadline = time.monotonic() + POWER_OFF_S
    while vm.hypervisor.domain_exists(vm.handle.name):
        assert time.monotonic() < deadline, "the VM outlived a protocol violation"
        time.sleep(0.1)


def test_a_host_frame_with_the_pre_resume_sequence_ends_the_vm(vm):
    vm.link.resume(time.monotonic() + 10)
    # Before the Resume (sequence 0) the host's next frame would have carried 1.
    stale = FrameEncoder(crc32, first_seq=1).encode(codec.encode(messages.Heartbeat(nonce=4)))
    assert vm.link.encoder.next_seq != 1  # 1 in 2**32 that the new base is the old one
    vm.link.sock.sendall(stale)
    ends_the_vm(vm)


def test_a_malformed_resume_ends_the_vm(vm):
    good = codec.encode(messages.Resume(time_ns=time.time_ns() + HOUR_NS, entropy=bytes(32), host_seq=5,
                                        guest_seq=6))
    # The same Resume with 31 bytes of entropy, declared as such.
    short = good[:9] + (31).to_bytes(4, "big") + good[13:44] + good[45:]
    vm.link.sock.sendall(vm.link.encoder.encode(short))
    ends_the_vm(vm)
