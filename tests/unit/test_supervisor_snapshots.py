"""A Supervisor's side of session snapshots, without a VM, as in
test_supervisor_sessions.py (the far end of a unix socket played as the
guest, recording actors as Intake, IOGuard, the pool, the Scheduler and
Sessions, libvirt a recording stand-in). SaveSession saves a session's VM
with the channel's sequences and says SessionSaved instead of SessionEnded;
a Supervisor started with a RestoreSession restores the snapshot, sends the
Resume and is the session's once it is answered; every failure on either
path loses the session with its reason. What real VMs do is
tests/vm/test_session_snapshots_vm.py's."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import pytest

from actors.artifacts.files import FileSettings
from actors.messages import (ChannelFailed, EndSession, Freeze, PoolVmState, RestoreSession, SaveSession,
                             SessionEnded, SessionSaved, SessionStarted, Thaw, Unwatch, VmState,
                             Watch)
from actors.supervisor import Supervisor, VmSettings
from actors.vm.errors import RestoreFailed, SessionSaveFailed, TemplateGone
from actors.vm.handle import VmHandle
from actors.vm.snapshots import Template, TemplateKey
from actors.vm.tiers import Tier
from protocol.channel import messages as guest
from protocol.channel.capabilities import soft_bits
from protocol.channel.frame import FrameDecoder
from tests.support.waiting import wait_until
from tests.unit.test_supervisor_sessions import CAPS, SESSION, Egress, SessionWorld
from tests.unit.test_supervisor_streams import VM, GuestEnd, Hypervisor, Refill, exit_message, out

KEY = TemplateKey(gold="g", agent="a", host="h", domain="d", network=False, memory_mib=128)
SETTINGS = dict(acquire_timeout_s=10, reset_timeout_s=10, deadman_grace_s=5, max_uses=10, max_age_s=300,
                strict=False, files=FileSettings(max_put_bytes=1 << 20, max_collect_bytes=1 << 20,
                                                 collect_timeout_s=10, signer=None),
                cpu=(1024, 50), high_cpu=(4096, 0))


def snapshot(guest_next_seq: int = 17, host_next_seq: int = 40) -> Template:
    return Template(key=KEY, directory=Path(f"/nonexistent/snapvm-{SESSION}-0123456789ab"), xml="<domain/>",
                    name="corral-saved", inode=1, data_len=1, guest_next_seq=guest_next_seq,
                    host_next_seq=host_next_seq)


class SnapshotHypervisor(Hypervisor):
    """The libvirt stand-in, with a session VM's save and a snapshot's restore."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.saves: list[tuple] = []
        self.restores: list[tuple] = []
        self.cpu: list[tuple] = []
        self.save_error: Exception | None = None
        self.restore_error: Exception | None = None

    def save_session(self, handle, session_id, guest_next_seq, host_next_seq) -> Template:
        self.calls.append("save")
        self.saves.append((handle.name, session_id, guest_next_seq, host_next_seq))
        if self.save_error is not None:
            raise self.save_error
        return snapshot(guest_next_seq, host_next_seq)

    def restore(self, template, name=None, private_copy=False) -> VmHandle:
        self.restores.append((template, name))
        if self.restore_error is not None:
            raise self.restore_error
        return VmHandle(name=name, overlay=Path("/nonexistent.qcow2"), socket=self.socket_path, console_log=None,
                        spec=None, restored=True, guest_first_seq=template.guest_next_seq,
                        host_first_seq=template.host_next_seq)

    def set_cpu(self, name, shares, quota_pct) -> None:
        self.cpu.append((shares, quota_pct))


class RecordingRefill(Refill):
    """The pool's Refill: a session's restore must never go through it."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(socket_path)
        self.calls: list = []

    def new_vm(self, name, network=False, memory_mib=None):
        self.calls.append("new_vm")
        return super().new_vm(name, network, memory_mib)

    def restore_failed(self, *args, **kwargs) -> None:
        self.calls.append("restore_failed")

    def restored(self, key) -> None:
        self.calls.append("restored")


class SnapshotWorld(SessionWorld):
    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path)
        path = tmp_path / "vm.sock"
        self.hypervisor = SnapshotHypervisor(path)
        self.refill = RecordingRefill(path)
        self.resume: guest.Resume | None = None

    def restored(self, snapshot_: Template | None = None, capabilities: tuple = CAPS, egress_allow: tuple = (),
                 boot_timeout_s: float = 10, network: bool = False) -> None:
        """A Supervisor started as the pool does for a RestoreSession; the
        guest end reads the Resume the host's first frame (on the snapshot's
        count) carries, and counts from its new base after it."""
        snapshot_ = snapshot_ or snapshot()
        extra = {}
        if network:
            self.egress = Egress()
            extra = {"tier": Tier(network=True), "egress": self.egress}
        self.supervisor = Supervisor.start(
            VM, directory=self.directory, hypervisor=self.hypervisor, refill=self.refill, timers=self.timers,
            metrics=self.metrics, settings=VmSettings(boot_timeout_s=boot_timeout_s, **SETTINGS),
            restore=RestoreSession(SESSION, "alice", snapshot_, capabilities, egress_allow), **extra)
        if self.hypervisor.restore_error is not None:
            return
        self.guest = GuestEnd(self.server)
        self.guest.decoder = FrameDecoder(zlib.crc32, first_seq=snapshot_.host_next_seq)
        self.resume = self.guest.receive()
        assert isinstance(self.resume, guest.Resume), self.resume
        self.guest.decoder.rebase(self.resume.host_seq)

    def watched_from(self) -> int:
        watch = wait_until(lambda: next((m for m in self.seen("ioguard") if isinstance(m, Watch)), None), 5,
                           "the Watch")
        return watch.first_seq

    def started(self) -> None:
        self.say(guest.ResumeDone(clock_step_ns=1000))
        wait_until(lambda: self.sessions_told(SessionStarted), 5, "SessionStarted")

    def ended_with(self, reason: str) -> bool:
        return wait_until(lambda: next(iter(self.sessions_told(SessionEnded)), None), 5, "SessionEnded") \
            == SessionEnded(SESSION, reason)

    def pool_told(self) -> list:
        return [m.state for m in self.seen("pool") if isinstance(m, VmState)]


@pytest.fixture
def world(tmp_path):
    w = SnapshotWorld(tmp_path)
    yield w
    w.close()


def channel_closed(world) -> bool:
    world.guest.conn.settimeout(5)
    try:
        while world.guest.conn.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    return True


# --- saving a session's VM -------------------------------------------------------------------

def test_a_save_closes_the_channel_saves_with_its_sequences_and_says_session_saved_not_ended(world):
    world.start()
    world.open()  # host frames: Heartbeat, Exec; guest's: Hello, HeartbeatAck, Exit
    task, exec_ = world.exec()  # host: Exec
    world.say(out(exec_.exec_id, 0, b"x"), exit_message(exec_.exec_id))  # guest: Output, Exit
    world.answer_of(task)
    world.tell(SaveSession())
    saved = wait_until(lambda: next(iter(world.sessions_told(SessionSaved)), None), 5, "SessionSaved")
    assert world.hypervisor.saves == [(VM, SESSION, 5, 3)]
    assert saved == SessionSaved(SESSION, snapshot(5, 3))
    assert channel_closed(world)  # closed before the save: the agent saw the host leave
    wait_until(lambda: VmState(VM, PoolVmState.GONE, "session_saved") in world.seen("pool"), 5, "the pool told")
    assert world.hypervisor.destroyed == [VM]  # what the saved VM left is discarded
    assert Unwatch(VM) in world.seen("ioguard")
    assert world.sessions_told(SessionEnded) == [] and world.execs_done() == 1
    assert not world.supervisor.is_alive()


def test_a_net_egress_session_leaves_its_egress_port_before_the_save(world):
    world.start(egress=True)
    world.open(egress_allow=(b"example.org",))
    world.tell(SaveSession())
    wait_until(lambda: world.sessions_told(SessionSaved), 5, "SessionSaved")
    assert world.egress.calls[-1] == "detach"


def test_a_save_asked_with_an_exec_running_loses_the_session_and_answers_the_exec(world):
    world.start()
    world.open()
    task, _ = world.exec()
    world.tell(SaveSession())
    assert world.answer_of(task).reply.error_code == "session_lost"
    assert world.ended_with("save_failed")
    assert world.hypervisor.saves == [] and world.sessions_told(SessionSaved) == []
    world.gone("save_failed")


def test_a_save_that_fails_loses_the_session(world):
    world.hypervisor.save_error = SessionSaveFailed("libvirt could not")
    world.start()
    world.open()
    world.tell(SaveSession())
    assert world.ended_with("save_failed")
    world.gone("save_failed")
    assert world.sessions_told(SessionSaved) == []


# --- restoring a session's VM ----------------------------------------------------------------

def test_a_restored_vm_is_the_sessions_once_its_resume_is_answered(world):
    world.restored()
    assert world.hypervisor.restores == [(snapshot(), VM)]
    assert world.watched_from() == world.resume.guest_seq  # IOGuard reads on the new base
    world.say(guest.ResumeDone(clock_step_ns=1000))
    started = wait_until(lambda: next(iter(world.sessions_told(SessionStarted)), None), 5, "SessionStarted")
    assert started == SessionStarted(SESSION, VM, world.supervisor)
    assert world.pool_told() == [PoolVmState.SESSION]  # never booting: outside the pool's size
    assert world.hypervisor.cpu == [(1024, 50)]
    assert world.refill.calls == []
    assert world.guest.nothing_more()  # no warm-up: the session's own execs come next
    task, exec_ = world.exec()  # the host's frames go on from the Resume's base
    assert exec_.capabilities & soft_bits(CAPS) == soft_bits(CAPS)
    world.say(exit_message(exec_.exec_id, exit_code=3))
    assert world.answer_of(task).reply.exit_code == 3
    wait_until(lambda: world.execs_done() == 1, 5, "SessionExecDone")


def test_a_restored_session_has_its_cpu_and_egress_rules(world):
    world.restored(capabilities=(b"net:egress", b"res:high_cpu"), egress_allow=(b"example.org",),
                   network=True)
    world.started()
    assert world.hypervisor.cpu == [(4096, 0)]
    assert world.egress.calls == ["attach", ("begin", SESSION)]


def test_a_restored_session_can_be_saved_again_on_its_new_sequences(world):
    world.restored()
    world.started()
    world.tell(SaveSession())
    wait_until(lambda: world.sessions_told(SessionSaved), 5, "SessionSaved")
    # The guest's ResumeDone was the one frame on its new base; the host sent none on its own.
    assert world.hypervisor.saves == [(VM, SESSION, (world.resume.guest_seq + 1) & 0xFFFFFFFF,
                                       world.resume.host_seq)]


def test_a_restored_session_ends_as_a_sessions_vm_does(world):
    world.restored()
    world.started()
    world.tell(EndSession("closed"))
    assert world.ended_with("closed")
    world.gone("session_closed")


@pytest.mark.parametrize("error", [RestoreFailed("libvirt refused"), TemplateGone("discarded meanwhile")])
def test_a_restore_that_fails_says_restore_failed_and_never_involves_the_refill(world, error):
    world.hypervisor.restore_error = error
    world.restored()
    assert world.ended_with("restore_failed")
    wait_until(lambda: VmState(VM, PoolVmState.GONE, "restore_failed") in world.seen("pool"), 5, "the pool told")
    assert world.refill.calls == []
    assert not any(isinstance(m, Watch) for m in world.seen("ioguard"))


@pytest.mark.parametrize("how", ["error", "violation", "channel lost", "silence"])
def test_a_restored_vm_that_fails_before_its_resume_done_says_restore_failed(world, how):
    world.restored(boot_timeout_s=0.5 if how == "silence" else 10)
    if how == "error":
        world.say(guest.Error(code="resume_refused", message="an exec runs"))
    elif how == "violation":
        world.say(guest.Hello(agent_version="t", boot_id="b", kernel="k"))  # not allowed while restoring
    elif how == "channel lost":
        world.tell(ChannelFailed(VM, "vm_lost", "eof", violation=False))
    assert world.ended_with("restore_failed")
    world.gone("restore_failed")
    assert world.refill.calls == [] and world.sessions_told(SessionStarted) == []


def test_a_scram_while_restoring_holds_its_deadline_and_the_session_starts_after_thaw(world):
    world.restored(boot_timeout_s=1)
    world.watched_from()
    world.tell(Freeze())
    wait_until(lambda: "pause" in world.hypervisor.calls, 5, "the pause")
    time.sleep(1.5)  # past the boot timeout, frozen: it does not count
    assert world.sessions_told() == []
    world.tell(Thaw())
    world.started()
    assert world.hypervisor.calls == ["pause", "resume"]
    time.sleep(1.2)  # the restoring deadline was disarmed as the session began
    assert world.sessions_told(SessionEnded) == []
    assert world.supervisor.is_alive()
