"""Pausing and resuming through QEMU's own monitor (vm.fast_resume), without a
VM: the protocol and its error paths against a scripted QMP peer on a unix
socket, the domain's monitor socket, and QEMU's user and confinement as
libvirt's capabilities tell them. Against real QEMU: tests/vm/test_qmp.py."""

import json
import socket
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from actors.vm.domain import QEMU_NS, qemu_confinement
from actors.vm.errors import HypervisorError, QmpError, QmpTimeout
from actors.vm.qmp import MAX_MESSAGE_BYTES, QmpMonitor
from tests.support.vm import make_spec

GREETING = b'{"QMP": {"version": {}, "capabilities": ["oob"]}}\r\n'


class ScriptedQmp:
    """A QMP peer: greets, then answers each command with `answer(request)`,
    a list of raw lines to send back (events, replies, garbage) or None to
    stay silent."""

    def __init__(self, path: Path, answer, greeting: bytes = GREETING):
        self.path = path
        self.answer = answer
        self.requests: list[dict] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.greeting = greeting
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self._converse()
        except OSError:
            pass  # the monitor under test hung up first

    def _converse(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(self.greeting)
            buffer = b""
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request = json.loads(line)
                    self.requests.append(request)
                    lines = self.answer(request)
                    if lines is None:
                        continue
                    for out in lines:
                        conn.sendall(out if isinstance(out, bytes) else json.dumps(out).encode() + b"\r\n")

    def close(self) -> None:
        self.listener.close()


def polite(request):
    """Every command succeeds, each reply preceded by an unrelated event."""
    return [{"event": "RTC_CHANGE", "data": {"offset": 1}}, {"return": {}, "id": request.get("id")}]


@pytest.fixture
def qmp_peer(tmp_path):
    peers = []

    def start(answer=polite, greeting=GREETING):
        peer = ScriptedQmp(tmp_path / "vm.qmp", answer, greeting)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        peer.close()


def connected(peer, timeout_s=1.0) -> QmpMonitor:
    monitor = QmpMonitor(peer.path, timeout_s)
    monitor.connect()
    return monitor


def test_connect_negotiates_then_unlinks_the_socket(qmp_peer):
    peer = qmp_peer()
    monitor = connected(peer)
    assert peer.requests[0]["execute"] == "qmp_capabilities"
    assert not peer.path.exists(), "nobody else may connect after us"
    monitor.resume()
    monitor.pause()
    assert [r["execute"] for r in peer.requests[1:]] == ["cont", "stop"]
    monitor.close()


def test_events_and_stale_replies_are_skipped(qmp_peer):
    def stale_first(request):
        return [{"return": {"stale": True}, "id": 9999}, {"event": "STOP"},
                {"return": {"status": "paused"}, "id": request["id"]}]

    monitor = connected(qmp_peer(stale_first))
    assert monitor.execute("query-status") == {"status": "paused"}


def test_an_error_reply_names_the_command_and_qemus_reason(qmp_peer):
    def refuse_cont(request):
        if request["execute"] == "cont":
            return [{"error": {"class": "GenericError", "desc": "Resetting the VM is required"},
                     "id": request["id"]}]
        return polite(request)

    monitor = connected(qmp_peer(refuse_cont))
    with pytest.raises(QmpError, match="refused cont: Resetting the VM is required") as info:
        monitor.resume()
    assert info.value.error_class == "GenericError"
    assert isinstance(info.value, HypervisorError)


def test_a_silent_monitor_times_out_on_the_deadline(qmp_peer):
    monitor = connected(qmp_peer(lambda r: None if r["execute"] == "stop" else polite(r)), timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(QmpTimeout, match="did not answer within 0.3 s"):
        monitor.pause()
    assert 0.3 <= time.monotonic() - started < 1.5


class Trickle:
    """Events, one every 0.1 s for 3 s, and never the reply."""

    def __iter__(self):
        for _ in range(30):
            time.sleep(0.1)
            yield {"event": "RTC_CHANGE"}


def test_an_event_stream_does_not_extend_the_deadline(qmp_peer):
    monitor = connected(qmp_peer(lambda r: Trickle() if r["execute"] == "stop" else polite(r)), timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(HypervisorError, match="did not answer within 0.5 s"):
        monitor.pause()
    # A deadline restarted by each event would run until the trickle stops (3 s).
    assert 0.5 <= time.monotonic() - started < 1.5


@pytest.mark.parametrize("reply, error", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "not an object"),
    (b'{"id": 2}\n', "neither return nor error"),
    (b"x" * (MAX_MESSAGE_BYTES + 70000), "over"),
])
def test_a_broken_monitor_is_a_hypervisor_error(qmp_peer, reply, error):
    monitor = connected(qmp_peer(lambda r: [reply] if r["execute"] == "cont" else polite(r)))
    with pytest.raises(HypervisorError, match=error):
        monitor.resume()


def test_a_peer_that_is_not_qmp_is_refused(qmp_peer):
    peer = qmp_peer(greeting=b'{"hello": "not qemu"}\n')
    with pytest.raises(HypervisorError, match="did not greet with QMP"):
        connected(peer)


def test_a_closed_monitor_is_an_error_not_a_hang(qmp_peer, tmp_path):
    monitor = connected(qmp_peer())
    monitor.close()
    with pytest.raises(HypervisorError, match="closed"):
        monitor.resume()
    with pytest.raises(HypervisorError, match="cannot connect"):
        QmpMonitor(tmp_path / "nothing.qmp", 0.5).connect()


# --- the domain and the host ------------------------------------------------------

def test_the_domain_gets_a_qmp_socket_only_when_asked(tmp_path):
    import dataclasses

    plain = ET.fromstring(make_spec(tmp_path).to_xml())
    assert plain.find(f"{{{QEMU_NS}}}commandline") is None
    spec = dataclasses.replace(make_spec(tmp_path), monitor_socket=Path("/run/a,b/vm.qmp"))
    args = [a.get("value") for a in ET.fromstring(spec.to_xml()).iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    # A comma in a path is doubled, or QEMU would read the rest as options.
    assert args == ["-qmp", "unix:/run/a,,b/vm.qmp,server=on,wait=off"]


LABELS = {"dac": "{label}", "selinux": "system_u:system_r:svirt_tcg_t:s0", "apparmor": None, "none": None}


def capabilities(*models, label="+64055:+107"):
    """Host capabilities as libvirt lists them: each secmodel with its base labels."""
    secmodels = ""
    for model in models:
        text = LABELS[model] and LABELS[model].format(label=label)
        labels = "".join(f"<baselabel type='{t}'>{text}</baselabel>" for t in ("kvm", "qemu")) if text else ""
        secmodels += f"<secmodel><model>{model}</model><doi>0</doi>{labels}</secmodel>"
    return f"<capabilities><host><uuid>x</uuid>{secmodels}</host></capabilities>"


def test_qemus_user_and_confinement_come_from_libvirts_capabilities():
    assert qemu_confinement(capabilities("none", "dac"), "tcg") == (None, (64055, 107))
    assert qemu_confinement(capabilities("dac", label="root:root"), "kvm") == (None, (0, 0))
    # A confining driver first, as libvirt lists it: its labels are not users.
    assert qemu_confinement(capabilities("selinux", "dac"), "tcg") == ("selinux", None)
    assert qemu_confinement(capabilities("apparmor", "dac"), "kvm") == ("apparmor", None)
    with pytest.raises(KeyError):  # the Hypervisor turns fast_resume off on this
        qemu_confinement(capabilities("dac", label="no-such-user:kvm"), "tcg")
