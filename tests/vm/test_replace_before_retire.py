"""Replace before retire, on real VMs: a pool of one whose VMs each run one
task (pool.max_uses = 1, or pool.strict) boots each VM's replacement while
that task runs, so the next task waits at most what is left of one refill,
not a whole boot after the last task ended.

What is asserted holds however slow the host boots: the pool's states are
sampled every 10 ms, and each VM's refill (the pool deciding to boot it until
it is first seen up) is measured in the same run as the waits compared to it."""

import threading
import time

import pytest

from protocol.client.api import Client
from tests.support.service import running_service, service_config

TASK_S = 3.0  # each task's `sleep`: the time its VM's replacement has to boot
TASKS = 3
# Messages between actors (the pool hearing of a task, the Scheduler of a VM
# up) on a loaded host; the margin the asserts leave, far below TASK_S.
MESSAGES_S = 1.0
SAMPLE_S = 0.01


class PoolSampler:
    """The pool's published states every SAMPLE_S, from its own thread."""

    def __init__(self, view):
        self.view = view
        self.samples: list[tuple[float, dict]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.monotonic(), self.view.states))  # replaced whole, never mutated
            time.sleep(SAMPLE_S)

    def first_seen(self) -> dict[str, float]:
        """vm_id -> when the pool first owned it (it publishes a VM as it decides to boot it)."""
        seen = {}
        for t, states in self.samples:
            for vm_id in states:
                seen.setdefault(vm_id, t)
        return seen

    def first_up(self) -> dict[str, float]:
        """vm_id -> when it was first seen past booting (ready, or busy at once)."""
        up = {}
        for t, states in self.samples:
            for vm_id, state in states.items():
                if state != "booting":
                    up.setdefault(vm_id, t)
        return up

    def was_busy(self, vm_id: str, start: float, end: float) -> bool:
        return any(states.get(vm_id) == "busy" for t, states in self.samples if start <= t <= end)


@pytest.fixture(scope="module", params=[{"max_uses": 1}, {"strict": True}], ids=["max_uses_1", "strict"])
def service(request, hypervisor, tmp_path_factory):
    cfg = service_config(tmp_path_factory.mktemp("corrald"), pool={"size": 1, **request.param})
    with running_service(cfg, hypervisor) as svc:
        yield svc


def test_each_vm_is_replaced_while_its_last_task_runs(service):
    tasks = []  # (submitted, answered, reply)
    with PoolSampler(service.pool_view) as sampler, Client(service.cfg.daemon.endpoint) as client:
        for _ in range(TASKS):
            submitted = time.monotonic()
            reply = client.run(["sleep", str(TASK_S)], wait_s=180)
            tasks.append((submitted, time.monotonic(), reply))
            assert (reply.error_code, reply.exit_code) == ("", 0), reply.error_message
    first_seen, first_up = sampler.first_seen(), sampler.first_up()

    for i, (submitted, answered, _) in enumerate(tasks):
        # The one VM the pool started during this task is the task's VM's
        # replacement, started as the task began, not once it ended.
        started = [vm for vm, t in first_seen.items() if submitted <= t <= answered]
        assert len(started) == 1, f"task {i}: VMs started while it ran: {started}"
        (replacement,) = started
        assert answered - first_seen[replacement] >= TASK_S - MESSAGES_S, (
            f"task {i}: its VM's replacement started only {answered - first_seen[replacement]:.2f} s "
            f"before its answer")
        if i + 1 == len(tasks):
            break
        # The next task ran on that replacement and waited for it at most what
        # was left of its refill when this task ended.
        next_submitted, next_answered, next_reply = tasks[i + 1]
        assert sampler.was_busy(replacement, next_submitted, next_answered), f"task {i + 1} ran elsewhere"
        refill_s = first_up[replacement] - first_seen[replacement]
        waited_s = next_reply.queued_ms / 1000
        assert waited_s <= max(0.0, refill_s - TASK_S) + MESSAGES_S, (
            f"task {i + 1} waited {waited_s:.2f} s for a VM whose refill took {refill_s:.2f} s, "
            f"{TASK_S:g} s of it during task {i}")
