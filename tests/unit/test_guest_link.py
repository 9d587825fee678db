"""The host end of the channel against a test-only hostile peer on a real unix
socket: every malformed frame or out-of-place message is rejected with its
typed error, the host never allocates what a hostile header declares, and a
silent or vanished guest is a timeout or a lost VM, never a hang."""

import socket
import threading
import time
import tracemalloc
import zlib

import pytest

from actors.vm.errors import ChannelClosed, GuestTimeout
from actors.vm.guest_link import GUEST_FRAME_CAP, CappedOutput, GuestLink
from protocol.channel import codec, constants, messages
from protocol.channel.errors import (BadMagic, CrcMismatch, FrameTooLarge, OutputOutOfOrder, SequenceError,
                                     StalledFrame, TruncatedFrame, UnexpectedMessage, UnknownMessageType, WrongExec)
from protocol.channel.frame import HEADER, MAGIC, FrameEncoder


class HostilePeer:
    """Plays the guest side of a channel socket, sending whatever a test scripts."""

    def __init__(self, path):
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.encoder = FrameEncoder(zlib.crc32)
        self.conn = None

    def accept(self):
        self.conn, _ = self.server.accept()

    def send_raw(self, data: bytes):
        self.conn.sendall(data)

    def send(self, message):
        self.send_raw(self.encoder.encode(codec.encode(message)))

    def close(self):
        for s in (self.conn, self.server):
            if s is not None:
                s.close()


@pytest.fixture
def pair(tmp_path):
    path = tmp_path / "vm.sock"
    peer = HostilePeer(path)
    link = GuestLink(path)
    link.connect(time.monotonic() + 2)
    peer.accept()
    yield peer, link
    link.close()
    peer.close()


HELLO = messages.Hello(agent_version="0.1", boot_id="b", kernel="k")


def soon(seconds=2.0):
    return time.monotonic() + seconds


def test_well_behaved_peer_is_understood(pair):
    peer, link = pair
    peer.send(HELLO)
    assert link.wait_hello(soon()) == HELLO


def test_bad_magic(pair):
    peer, link = pair
    peer.send_raw(b"\x00\x00\x00\x00" + b"\xff" * 60)
    with pytest.raises(BadMagic):
        link.wait_hello(soon())


def test_oversize_length_rejected_from_the_header_alone_without_allocating(pair):
    peer, link = pair
    peer.send_raw(HEADER.pack(MAGIC, 0xFFFFFFF0, 0, 0))
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            link.wait_hello(soon())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_host_caps_guest_frames_below_the_protocol_maximum(pair):
    peer, link = pair
    peer.send_raw(HEADER.pack(MAGIC, GUEST_FRAME_CAP + 1, 0, 0))
    with pytest.raises(FrameTooLarge):
        link.wait_hello(soon())


def test_crc_mismatch(pair):
    peer, link = pair
    frame = bytearray(peer.encoder.encode(codec.encode(HELLO)))
    frame[-1] ^= 0x01
    peer.send_raw(bytes(frame))
    with pytest.raises(CrcMismatch):
        link.wait_hello(soon())


def test_sequence_gap(pair):
    peer, link = pair
    peer.encoder = FrameEncoder(zlib.crc32, first_seq=1)  # the first frame must be 0
    peer.send(HELLO)
    with pytest.raises(SequenceError):
        link.wait_hello(soon())


def test_sequence_replay(pair):
    peer, link = pair
    frame = peer.encoder.encode(codec.encode(HELLO))
    peer.send_raw(frame + frame)
    assert link.wait_hello(soon()) == HELLO
    with pytest.raises(SequenceError):
        link.receive(frozenset({messages.Hello}), soon())


def test_unknown_message_type(pair):
    peer, link = pair
    peer.send_raw(peer.encoder.encode(b"\xee"))
    with pytest.raises(UnknownMessageType):
        link.wait_hello(soon())


def test_host_only_message_from_a_guest_is_refused(pair):
    peer, link = pair
    peer.send(messages.Reset(reset_id=1))
    with pytest.raises(UnexpectedMessage):
        link.wait_hello(soon())


def test_message_out_of_state_is_refused(pair):
    """Default deny per state: an exec accepts Output/Exit, not a second Hello."""
    peer, link = pair
    threading.Thread(target=lambda: (peer.conn.recv(65536), peer.send(HELLO)), daemon=True).start()
    with pytest.raises(UnexpectedMessage, match="Hello"):
        link.run([b"true"], soon())


def test_truncated_header_then_eof(pair):
    peer, link = pair
    peer.send_raw(HEADER.pack(MAGIC, 10, 0, 0)[:9])
    peer.conn.shutdown(socket.SHUT_WR)
    with pytest.raises(TruncatedFrame):
        link.wait_hello(soon())


def test_vanished_guest_is_a_lost_vm(pair):
    peer, link = pair
    peer.conn.close()
    with pytest.raises(ChannelClosed):
        link.wait_hello(soon())


def test_a_frame_that_stops_is_stalled_long_before_the_deadline_and_holds_only_what_arrived(pair):
    # Declares a 1 MiB Output, sends 10 bytes, stops: 1 s + 1 s, not the 30 s wait.
    peer, link = pair
    peer.send_raw(HEADER.pack(MAGIC, 1 << 20, 0, 0) + b"0123456789")
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(StalledFrame, match="10 of 1048576 payload bytes"):
            link.wait_hello(started + 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 1.9 < time.monotonic() - started < 4
    assert peak < 256 * 1024


def test_half_a_header_that_stops_is_stalled(pair):
    peer, link = pair
    peer.send_raw(HEADER.pack(MAGIC, 10, 0, 0)[:5])
    started = time.monotonic()
    with pytest.raises(StalledFrame, match="5 of 16 header bytes"):
        link.wait_hello(started + 30)
    assert 0.9 < time.monotonic() - started < 3


def test_silent_guest_times_out_at_its_deadline(pair):
    _, link = pair
    started = time.monotonic()
    with pytest.raises(GuestTimeout):
        link.wait_hello(started + 0.3)
    assert 0.3 <= time.monotonic() - started < 1.0


def test_output_past_the_cap_is_dropped_and_flagged_by_the_host(pair):
    """The host does not trust the guest to truncate: it keeps at most the cap."""
    peer, link = pair

    def guest():
        peer.conn.recv(65536)
        peer.send(messages.Output(exec_id=1, stream=constants.STDOUT, offset=0, data=b"x" * 1000))
        peer.send(messages.Output(exec_id=1, stream=constants.STDERR, offset=0, data=b"e" * 10))
        peer.send(messages.Exit(exec_id=1, exit_code=0, signal=0, timed_out=False,
                                stdout_truncated=False, stderr_truncated=False, wall_ms=1,
                                user_cpu_ms=0, sys_cpu_ms=0, max_rss_kib=0))

    threading.Thread(target=guest, daemon=True).start()
    result = link.run([b"yes"], soon(), output_cap=100)
    assert result.stdout == b"x" * 100 and result.exit.stdout_truncated
    assert result.stderr == b"e" * 10 and not result.exit.stderr_truncated


def test_exit_for_another_exec_is_refused(pair):
    peer, link = pair

    def guest():
        peer.conn.recv(65536)
        peer.send(messages.Exit(exec_id=99, exit_code=0, signal=0, timed_out=False,
                                stdout_truncated=False, stderr_truncated=False, wall_ms=1,
                                user_cpu_ms=0, sys_cpu_ms=0, max_rss_kib=0))

    threading.Thread(target=guest, daemon=True).start()
    with pytest.raises(UnexpectedMessage, match="exec 99"):
        link.run([b"true"], soon())


@pytest.mark.parametrize("offsets", [(1,), (0, 2), (0, 0), (0, 4)], ids=["gap first", "gap", "repeat", "overlap"])
def test_an_output_chunk_out_of_order_is_refused(pair, offsets):
    """Each chunk (3 bytes here) must start where its stream ended."""
    peer, link = pair

    def guest():
        peer.conn.recv(65536)
        for offset in offsets:
            peer.send(messages.Output(exec_id=1, stream=constants.STDOUT, offset=offset, data=b"abc"))

    threading.Thread(target=guest, daemon=True).start()
    with pytest.raises(OutputOutOfOrder, match=f"offset {offsets[-1]}, expected {3 * (len(offsets) - 1)}"):
        link.run([b"yes"], soon())


def test_output_for_another_exec_is_refused_as_wrong_exec(pair):
    peer, link = pair

    def guest():
        peer.conn.recv(65536)
        peer.send(messages.Output(exec_id=7, stream=constants.STDOUT, offset=0, data=b"x"))

    threading.Thread(target=guest, daemon=True).start()
    with pytest.raises(WrongExec, match="exec 7"):
        link.run([b"true"], soon())


def test_capped_output_counts_each_stream_on_its_own_and_cuts_at_the_cap():
    output = CappedOutput(5)
    assert output.add(constants.STDOUT, 0, b"abc") == b"abc"
    assert output.add(constants.STDERR, 0, b"E") == b"E"
    assert output.add(constants.STDOUT, 3, b"defg") == b"de"  # past the cap: cut
    assert output.add(constants.STDOUT, 7, b"h") == b""  # the guest's offsets count what it sent
    assert output.received == {constants.STDOUT: 8, constants.STDERR: 1}
    assert output.stdout() == b"abcde" and output.stderr() == b"E"
    assert output.dropped == {constants.STDOUT: True, constants.STDERR: False}
    with pytest.raises(OutputOutOfOrder):
        output.add(constants.STDERR, 0, b"E")


def test_capped_output_that_keeps_nothing_still_cuts_and_flags():
    """A streaming task's output goes on to the caller chunk by chunk: the host
    keeps none of it, but still forwards only what is within the cap."""
    output = CappedOutput(4, keep=False)
    assert output.add(constants.STDOUT, 0, b"abc") == b"abc"
    assert output.add(constants.STDOUT, 3, b"def") == b"d"
    assert output.stdout() == b"" and output.dropped[constants.STDOUT]
