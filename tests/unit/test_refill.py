"""The Refill's choice between a restored clone, a template build and a cold
boot, without a VM: a scripted Hypervisor that records what it was asked,
real Metrics, a clock the tests move; and a restore past its deadline through
a real Supervisor and Hypervisor on libvirt's test driver. What a real clone
does after its restore is tests/vm/test_clones.py's."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from actors.directory import Directory
from actors.edge.metrics import Metrics
from actors.messages import PoolVmState
from actors.refill import BUILD_HOLD_OFF_S, RESTORE_HOLD_OFF_S, Refill
from actors.vm.errors import HypervisorError, RestoreFailed, TemplateBuildFailed, TemplateGone
from actors.vm.handle import VmHandle
from actors.supervisor import Supervisor, VmSettings
from actors.timers import Timers
from actors.vm.snapshots import Template, TemplateKey
from tests.support.probe import Recorder, wait_for
from tests.support.waiting import wait_until
from tests.unit.test_snapshots import publish_synthetic, hypervisor_on_test_driver


def key(network: bool = False, memory_mib: int = 512) -> TemplateKey:
    return TemplateKey(gold="g", agent="a", host="h", domain="d", network=network, memory_mib=memory_mib)


def template(k: TemplateKey) -> Template:
    return Template(key=k, directory=Path("/nonexistent") / k.digest, xml="<domain/>", name="corral-t-0",
                    inode=1, data_len=65536, guest_next_seq=1, host_next_seq=0)


class ScriptedHypervisor:
    """What Refill calls of a Hypervisor; templates appear when built."""

    def __init__(self) -> None:
        self.templates: dict[TemplateKey, Template] = {}
        self.calls: list[tuple] = []
        self.build_failure: Exception | None = None
        self.restore_failure: RestoreFailed | None = None
        self.build_started = threading.Event()
        self.build_may_end = threading.Event()
        self.build_may_end.set()
        self.names = iter(f"corral-t-{i:012x}" for i in range(1, 1000))

    def template_key(self, network=False, memory_mib=None):
        return key(network, memory_mib or 512)

    def template(self, network=False, memory_mib=None):
        return self.templates.get(self.template_key(network, memory_mib))

    def build_template(self, network=False, memory_mib=None, *, name=None, boot_timeout_s=60.0):
        self.calls.append(("build", name))
        self.build_started.set()
        self.build_may_end.wait(10)
        if self.build_failure is not None:
            raise self.build_failure
        built = self.templates[self.template_key(network, memory_mib)] = template(
            self.template_key(network, memory_mib))
        return built

    def restore(self, tmpl, name=None):
        self.calls.append(("restore", name))
        if self.restore_failure is not None:
            raise self.restore_failure
        return handle(name, restored=True)

    def create(self, name=None, network=False, memory_mib=None):
        self.calls.append(("create", name))
        return handle(name)

    def new_name(self):
        return next(self.names)


def handle(name: str, restored: bool = False) -> VmHandle:
    return VmHandle(name=name, overlay=Path(f"/nonexistent/{name}.qcow2"), socket=Path(f"/nonexistent/{name}.sock"),
                    console_log=None, spec=None, restored=restored, guest_first_seq=1 if restored else 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def hv():
    return ScriptedHypervisor()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def metrics():
    return Metrics()


def refill(hv, metrics, clock, enabled=True) -> Refill:
    return Refill(hv, metrics, enabled=enabled, boot_timeout_s=30, clock=clock)


def value(counter, **labels) -> float:
    return counter.labels(**labels)._value.get()


def test_with_snapshots_off_every_vm_is_booted(hv, metrics, clock):
    hv.templates[key()] = template(key())
    made = refill(hv, metrics, clock, enabled=False).new_vm("corral-t-vm1")
    assert (made.kind, made.key, made.handle.restored) == ("boot", None, False)
    assert hv.calls == [("create", "corral-t-vm1")]


def test_a_valid_template_is_restored_under_the_vms_name(hv, metrics, clock):
    hv.templates[key(network=True)] = template(key(network=True))
    made = refill(hv, metrics, clock).new_vm("corral-t-vm1", network=True)
    assert (made.kind, made.key, made.handle.restored) == ("restore", key(network=True), True)
    assert hv.calls == [("restore", "corral-t-vm1")]


def test_one_caller_builds_a_missing_template_the_others_boot_meanwhile(hv, metrics, clock):
    r = refill(hv, metrics, clock)
    hv.build_may_end.clear()
    made = {}

    def new_vm(name, **tier):
        made[name] = r.new_vm(name, **tier)

    builders = [threading.Thread(target=new_vm, args=("corral-t-vm1",))]
    builders[0].start()
    assert hv.build_started.wait(5)
    assert r.building() == {hv.calls[0][1]}  # the Watchdog counts the template VM as owned
    assert r.new_vm("corral-t-vm2").kind == "boot"  # no second build of the same key
    builders.append(threading.Thread(target=new_vm, args=("corral-t-vm3",), kwargs={"network": True}))
    builders[1].start()  # another tier's template is built beside it
    while len(r.building()) < 2:
        threading.Event().wait(0.01)
    assert r.building() == {name for call, name in hv.calls if call == "build"}
    hv.build_may_end.set()
    for builder in builders:
        builder.join(5)
    assert made["corral-t-vm1"].kind == made["corral-t-vm3"].kind == "build"
    assert made["corral-t-vm1"].handle.restored and made["corral-t-vm3"].key == key(network=True)
    assert r.building() == frozenset()
    assert value(metrics.snapshot_builds, result="ok") == 2
    assert r.new_vm("corral-t-vm4").kind == "restore"  # the next ones restore
    assert [call for call, _ in hv.calls].count("build") == 2


def test_a_failed_build_boots_and_is_not_retried_until_its_hold_off_ends(hv, metrics, clock, caplog):
    r = refill(hv, metrics, clock)
    hv.build_failure = TemplateBuildFailed("the template VM did not say hello")
    assert r.new_vm("corral-t-vm1").kind == "boot"
    assert value(metrics.snapshot_builds, result="failed") == 1
    assert "could not be built: the template VM did not say hello" in caplog.text
    assert r.building() == frozenset()
    clock.now += BUILD_HOLD_OFF_S[0] - 1
    assert r.new_vm("corral-t-vm2").kind == "boot"
    assert [c[0] for c in hv.calls] == ["build", "create", "create"]  # held off: no build
    clock.now += 2
    r.new_vm("corral-t-vm3")  # fails again: held off twice as long
    assert value(metrics.snapshot_builds, result="failed") == 2
    clock.now += BUILD_HOLD_OFF_S[0] * 2 - 1
    r.new_vm("corral-t-vm4")
    assert [c[0] for c in hv.calls].count("build") == 2
    hv.build_failure = None
    clock.now += 2
    assert r.new_vm("corral-t-vm5").kind == "build"


def test_a_build_error_of_any_host_kind_is_a_failed_build(hv, metrics, clock):
    hv.build_failure = HypervisorError("libvirt went away")
    assert refill(hv, metrics, clock).new_vm("corral-t-vm1").kind == "boot"
    assert value(metrics.snapshot_builds, result="failed") == 1


def test_a_failed_restore_boots_with_one_warning_and_a_count_then_holds_restores_off(hv, metrics, clock, caplog):
    hv.templates[key()] = template(key())
    r = refill(hv, metrics, clock)
    hv.restore_failure = RestoreFailed("libvirt could not restore it", template_removed=True)
    made = r.new_vm("corral-t-vm1")
    assert made.kind == "boot" and hv.calls == [("restore", "corral-t-vm1"), ("create", "corral-t-vm1")]
    assert value(metrics.restore_failures, stage="restore") == 1
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == 1 and "libvirt could not restore it" in warnings[0]
    assert "will be rebuilt" in warnings[0]
    hv.restore_failure = None
    clock.now += RESTORE_HOLD_OFF_S[0] - 1
    assert r.new_vm("corral-t-vm2").kind == "boot"  # held off
    clock.now += 2
    assert r.new_vm("corral-t-vm3").kind == "restore"


def test_clones_failing_after_their_restore_hold_restores_off_longer_each_time_until_one_succeeds(
        hv, metrics, clock):
    hv.templates[key()] = template(key())
    r = refill(hv, metrics, clock)
    r.restore_failed(key(), "resuming", "no answer within 30 s")
    r.restore_failed(key(), "warming", "the warm-up `true` ended badly")
    assert value(metrics.restore_failures, stage="resuming") == 1
    assert value(metrics.restore_failures, stage="warming") == 1
    clock.now += RESTORE_HOLD_OFF_S[0] * 2 - 1
    assert r.new_vm("corral-t-vm1").kind == "boot"
    clock.now += 2
    made = r.new_vm("corral-t-vm2")
    assert made.kind == "restore"
    r.restored(made.key)  # its Supervisor offered it
    r.restore_failed(key(), "resuming", "again")
    clock.now += RESTORE_HOLD_OFF_S[0] + 1  # the count started over
    assert r.new_vm("corral-t-vm3").kind == "restore"


def test_a_builder_that_finds_the_template_published_meanwhile_restores_without_building(hv, metrics, clock):
    r = refill(hv, metrics, clock)
    first = True

    def template_appears(network=False, memory_mib=None):
        nonlocal first
        if first:  # absent when the caller looked, built by someone else by the time it claimed the build
            first = False
            return None
        return template(key())

    hv.template = template_appears
    made = r.new_vm("corral-t-vm1")
    assert made.kind == "restore" and [c[0] for c in hv.calls] == ["restore"]
    assert value(metrics.snapshot_builds, result="ok") == 0


def template_goes_on_restore(hv, times: int, rebuilt: bool):
    """hv.restore raising TemplateGone the first `times` calls, as for a clone
    that waited on the image while another removed the template (and, if
    `rebuilt`, a builder published a new one)."""
    restore = hv.restore
    gone = 0

    def restore_or_gone(tmpl, name=None):
        nonlocal gone
        if gone < times:
            gone += 1
            hv.calls.append(("gone", name))
            del hv.templates[tmpl.key]
            if rebuilt:
                hv.templates[tmpl.key] = dataclasses.replace(tmpl, inode=tmpl.inode + 1)
            raise TemplateGone(f"cannot restore VM {name}: template {tmpl.key.digest} was removed meanwhile")
        return restore(tmpl, name)

    hv.restore = restore_or_gone


def no_restore_failure(metrics, caplog) -> bool:
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    return value(metrics.restore_failures, stage="restore") == 0 and warnings == []


def test_a_template_rebuilt_while_the_clone_waited_is_looked_up_again_and_restored(hv, metrics, clock, caplog):
    hv.templates[key()] = template(key())
    template_goes_on_restore(hv, times=1, rebuilt=True)
    r = refill(hv, metrics, clock)
    made = r.new_vm("corral-t-vm1")
    assert made.kind == "restore" and made.handle.restored
    assert hv.calls == [("gone", "corral-t-vm1"), ("restore", "corral-t-vm1")]
    assert no_restore_failure(metrics, caplog)
    assert r.new_vm("corral-t-vm2").kind == "restore"  # no hold-off either


def test_a_template_removed_while_the_clone_waited_is_built_anew_without_a_failure(hv, metrics, clock, caplog):
    hv.templates[key()] = template(key())
    template_goes_on_restore(hv, times=1, rebuilt=False)
    made = refill(hv, metrics, clock).new_vm("corral-t-vm1")
    assert made.kind == "build" and [c for c, _ in hv.calls] == ["gone", "build", "restore"]
    assert no_restore_failure(metrics, caplog)


def test_a_template_that_keeps_going_is_given_up_for_a_boot_without_a_failure(hv, metrics, clock, caplog):
    hv.templates[key()] = template(key())
    template_goes_on_restore(hv, times=10, rebuilt=True)
    made = refill(hv, metrics, clock).new_vm("corral-t-vm1")
    assert made.kind == "boot" and [c for c, _ in hv.calls] == ["gone", "gone", "create"]
    assert no_restore_failure(metrics, caplog)


# --- a restore past its deadline --------------------------------------------------

def test_a_restore_that_may_finish_late_is_raised_never_booted_under_its_name(hv, metrics, clock):
    hv.templates[key()] = template(key())
    hv.restore_failure = RestoreFailed("libvirt did not finish restoring VM corral-t-vm1 within 30 s",
                                       template_removed=True, may_finish_late=True)
    with pytest.raises(RestoreFailed) as failed:
        refill(hv, metrics, clock).new_vm("corral-t-vm1")
    assert failed.value.may_finish_late
    assert hv.calls == [("restore", "corral-t-vm1")]  # no create of that name
    assert value(metrics.restore_failures, stage="restore") == 1


SETTINGS = VmSettings(boot_timeout_s=1, acquire_timeout_s=1, reset_timeout_s=1, deadman_grace_s=1,
                      max_uses=1, max_age_s=600, strict=True)


@pytest.fixture
def test_driver(tmp_path):
    hv = hypervisor_on_test_driver(tmp_path)
    yield hv
    hv.close()


def test_a_restore_past_its_deadline_ends_its_supervisor_and_the_late_domain_clashes_with_nothing(
        test_driver, tmp_path):
    """libvirt may finish a restore after its deadline and create the clone's
    domain then; it refuses a second domain of one name. So the clone's name is
    never booted: its Supervisor ends (the pool starts a VM of a fresh name) and
    the late domain is a zombie for the Watchdog."""
    hv = test_driver
    hv.fast_resume, hv.console_log = True, True
    publish_synthetic(hv.snapshots, tmp_path, hv.template_key())
    hv.calls.timeout_s = 0.3
    finish, finished = threading.Event(), []

    def restore_late(name, template, image):  # a libvirtd stuck in restoreFlags that finishes later
        finish.wait(10)
        hv.conn.createXML(f"<domain type='test'><name>{name}</name><memory>1024</memory>"
                          "<os><type>hvm</type></os></domain>", 0)
        finished.append(name)

    hv._restore_image = restore_late
    booted = []
    create = hv.create
    hv.create = lambda name=None, **tier: (booted.append(name), create(name=name, **tier))[1]
    metrics, timers, directory = Metrics(), Timers(), Directory()
    pool = Recorder.start()
    directory["pool"] = pool
    vm_id = "corral-main-c10e000000a1"
    Supervisor.start(vm_id, directory=directory, hypervisor=hv, timers=timers, metrics=metrics,
                     refill=Refill(hv, metrics, enabled=True, boot_timeout_s=1), settings=SETTINGS)
    try:
        told = wait_for(pool, 2, timeout_s=10)
        assert [(m.vm_id, m.state, m.reason) for m in told] == [
            (vm_id, PoolVmState.BOOTING, ""), (vm_id, PoolVmState.GONE, "restore_failed")]
        assert booted == []
        assert value(metrics.restore_failures, stage="restore") == 1
        finish.set()
        wait_until(lambda: finished == [vm_id], 5, "the late restore's domain")
        assert vm_id in hv.corral_domains()
    finally:
        finish.set()
        pool.stop()
        timers.stop()
