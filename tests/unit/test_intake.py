"""Intake with a real ROUTER and the real client, a recording actor as the
Scheduler: validation codes, the ledger's exactly-once, and answers that
survive an Intake crash."""

import time

import pykka
import pytest

from actors.directory import Directory
from actors.edge.intake_server import IntakeServer
from actors.intake import Intake
from actors.messages import InjectFault, Submit
from actors.edge.metrics import Metrics
import zmq

from protocol.channel import codec
from protocol.client.api import Client
from protocol.wire import envelope
from protocol.wire.tasks import DAEMON_TO_CLIENT, PROTOCOL_TAG, TaskReply, TaskRequest, error_reply
from tests.support.intake import LIMITS
from tests.support.probe import Recorder, wait_for


@pytest.fixture
def intake(tmp_path):
    directory = Directory()
    metrics = Metrics()
    server = IntakeServer(f"ipc://{tmp_path}/intake.sock", LIMITS, metrics, directory)
    directory.answer_fallback = server.post
    server.start()
    scheduler = Recorder.start()
    directory["scheduler"] = scheduler
    directory["intake"] = Intake.start(server, directory)
    client = Client(server.endpoint)
    yield directory, server, scheduler, client, metrics
    client.close()
    pykka.ActorRegistry.stop_all()
    server.stop()


def ok_reply(task_id: str) -> TaskReply:
    return error_reply(task_id, "", "")


@pytest.mark.parametrize("kwargs, code, fragment", [
    (dict(argv=["a\0b"]), "invalid_request", "NUL"),
    (dict(argv=["true"], env={"A=B": "x"}), "invalid_request", "contains '='"),
    (dict(argv=["true"], cwd="relative"), "invalid_request", "absolute"),
    (dict(argv=["true"], timeout_s=7200), "invalid_request", "over the maximum"),
    (dict(argv=["true"], output_cap=32 << 20), "invalid_request", "output cap"),
    (dict(argv=["true"], capabilities=["net:everything"]), "unknown_capability", "net:everything"),
    (dict(argv=["true"], capabilities=["dev:python", "dev:python"]), "duplicate_capability", "twice"),
    (dict(argv=["true"], capabilities=["dev:gpu"]), "capability_unavailable", "passthrough"),
])
def test_bad_requests_are_refused_at_once_without_reaching_the_scheduler(intake, kwargs, code, fragment):
    directory, server, scheduler, client, metrics = intake
    reply = client.run(wait_s=5, **kwargs)
    assert reply.error_code == code and fragment in reply.error_message
    assert scheduler.proxy().seen.get() == []
    assert server.unanswered() == 0


def test_defaults_are_filled_in_and_the_task_reaches_the_scheduler(intake):
    directory, server, scheduler, client, metrics = intake
    future = client.submit(["true"], capabilities=["base:execute"])
    (submit,) = wait_for(scheduler, 1)
    assert isinstance(submit, Submit)
    assert submit.task.request.timeout_ms == 60_000 and submit.task.request.output_cap == 1 << 20
    directory.answer(submit.task.ticket, ok_reply(submit.task.request.task_id))
    assert future.result(timeout=5).error_code == ""


def test_a_second_answer_is_dropped_and_counted(intake):
    directory, server, scheduler, client, metrics = intake
    future = client.submit(["true"], task_id="once")
    (submit,) = wait_for(scheduler, 1)
    directory.answer(submit.task.ticket, ok_reply("once"))
    directory.answer(submit.task.ticket, error_reply("once", "vm_lost", "late"))
    assert future.result(timeout=5).error_code == ""
    deadline = time.monotonic() + 5
    while metrics.counter_total(metrics.duplicate_answers) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metrics.counter_total(metrics.duplicate_answers) == 1


def test_duplicate_task_id_in_flight_is_refused(intake):
    """Raw DEALER: the client library itself refuses to send a duplicate."""
    directory, server, scheduler, client, metrics = intake
    request = TaskRequest(task_id="same", priority=2, argv=(b"true",), env=(), cwd=b"", stdin=b"",
                          timeout_ms=0, output_cap=0, capabilities=())
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(server.endpoint)
    try:
        for _ in range(2):
            dealer.send_multipart(envelope.build(PROTOCOL_TAG, codec.encode(request)))
        assert dealer.poll(5000)
        frames = dealer.recv_multipart()
        reply = codec.decode(envelope.parse(PROTOCOL_TAG, frames), DAEMON_TO_CLIENT)
        assert reply.error_code == "duplicate_task"
        assert len(wait_for(scheduler, 1)) == 1
    finally:
        dealer.close()


def test_answers_survive_an_intake_crash(intake):
    directory, server, scheduler, client, metrics = intake
    futures = [client.submit(["true"], task_id=f"t{i}") for i in range(3)]
    submits = wait_for(scheduler, 3)
    directory.get("intake").tell(InjectFault("crash"))
    for submit in submits:  # some land in the dying actor's inbox, some find it dead
        directory.answer(submit.task.ticket, ok_reply(submit.task.request.task_id))
    assert [f.result(timeout=5).task_id for f in futures] == ["t0", "t1", "t2"]


def test_stopping_answers_every_task_left_in_the_ledger(intake):
    directory, server, scheduler, client, metrics = intake
    future = client.submit(["true"])
    wait_for(scheduler, 1)
    server.stop()
    assert future.result(timeout=5).error_code == "cancelled"
