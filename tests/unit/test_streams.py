"""StreamState (actors/edge/streams.py) on its own: the window, the bounded
buffer and its reader holds, the ring while the caller is gone, attach,
the reply after the last chunk, and stdin held, forwarded and capped."""

import pytest

from actors.edge.streams import (COALESCE_BYTES, HELD_STDIN_TOTAL, HOLD_SLACK_BYTES, MAX_CHUNKS_IN_FLIGHT,
                                 StreamLimits, StreamState, StreamTotals)
from protocol.channel.constants import STDERR, STDOUT
from protocol.wire.tasks import error_reply

KiB = 1024
LIMITS = StreamLimits(window_bytes=16 * KiB, buffer_bytes=64 * KiB, linger_s=30.0, max_stdin_bytes=100)
SUPERVISOR = object()  # the state only keeps the reference


class Caller:
    """What a caller received: each stream's bytes, checked to come in order
    with no byte repeated; `gaps` the bytes it was told it will never get."""

    def __init__(self):
        self.got = {STDOUT: bytearray(), STDERR: bytearray()}
        self.gaps = {STDOUT: 0, STDERR: 0}
        self.order = []

    def take(self, chunks):
        for chunk in chunks:
            have = len(self.got[chunk.stream]) + self.gaps[chunk.stream]
            assert chunk.offset >= have, f"{chunk} repeats bytes the caller has ({have})"
            self.gaps[chunk.stream] += chunk.offset - have
            self.got[chunk.stream] += chunk.data
            self.order.append((chunk.stream, chunk.offset))

    def offsets(self):
        return tuple(len(self.got[s]) + self.gaps[s] for s in (STDOUT, STDERR))


def started(limits=LIMITS, **kwargs):
    state = StreamState("t", limits, **kwargs)
    state.started(SUPERVISOR)
    return state


def feed(state, stream, data, size):
    """`data` as chunks of `size`, from the stream's current end."""
    offset = state.outputs[stream].received
    for i in range(0, len(data), size):
        state.add(stream, offset + i, data[i:i + size])


def test_chunks_go_out_in_arrival_order_across_streams():
    state = started()
    state.add(STDOUT, 0, b"out1")
    state.add(STDERR, 0, b"err1")
    state.add(STDOUT, 4, b"out2")
    caller = Caller()
    caller.take(state.sendable())
    assert caller.order == [(STDOUT, 0), (STDERR, 0), (STDOUT, 4)]
    assert caller.got == {STDOUT: b"out1out2", STDERR: b"err1"}
    assert state.sendable() == []


def test_the_window_holds_output_back_until_the_caller_acknowledges():
    state = started()
    data = bytes(range(256)) * 160  # 40 KiB
    feed(state, STDOUT, data, 4 * KiB)
    caller = Caller()
    caller.take(state.sendable())
    assert len(caller.got[STDOUT]) == LIMITS.window_bytes and state.sendable() == []
    state.ack(8 * KiB, 0, now=0)  # half the window consumed
    caller.take(state.sendable())
    assert len(caller.got[STDOUT]) == LIMITS.window_bytes + 8 * KiB
    state.ack(*caller.offsets(), now=0)
    caller.take(state.sendable())
    state.ack(*caller.offsets(), now=0)
    caller.take(state.sendable())
    assert bytes(caller.got[STDOUT]) == data and state.buffered == 0


def test_an_ack_never_goes_back_nor_past_what_was_sent():
    state = started()
    feed(state, STDOUT, b"x" * 20 * KiB, 4 * KiB)
    state.sendable()  # 16 KiB sent
    state.ack(10**12, 0, now=0)  # past what was sent: up to what was sent
    assert state.outputs[STDOUT].acked == 16 * KiB and state.in_flight_bytes == 0
    state.ack(1, 0, now=0)
    assert state.outputs[STDOUT].acked == 16 * KiB and state.buffered == 4 * KiB


def test_an_ack_inside_a_chunk_cuts_it():
    state = started()
    state.add(STDOUT, 0, b"abcdef")
    state.sendable()
    state.ack(4, 0, now=0)
    assert state.buffered == 2 and state.in_flight_bytes == 2 and state.outputs[STDOUT].sent[0].data == b"ef"


def test_unsent_output_of_one_stream_merges_and_sent_output_never_changes():
    state = started()
    feed(state, STDOUT, b"a" * (3 * COALESCE_BYTES), 1000)
    assert [len(c.data) for c in state.outputs[STDOUT].unsent] == [65000, 65000, 65000, 1608]
    state = started()
    state.add(STDOUT, 0, b"one")
    (first,) = state.sendable()
    state.add(STDOUT, 3, b"two")
    assert first.data == b"one" and [c.data for c in state.sendable()] == [b"two"]
    state.add(STDERR, 0, b"e")
    state.add(STDOUT, 6, b"3")  # another stream came between: no merge across it
    assert len(state.sendable()) == 2


def test_tiny_chunks_in_flight_are_bounded_in_number_too():
    state = started()
    for i in range(MAX_CHUNKS_IN_FLIGHT):  # alternating streams never merge
        state.add(STDOUT, i, b"o")
        state.add(STDERR, i, b"e")
    assert len(state.sendable()) == MAX_CHUNKS_IN_FLIGHT
    assert state.sendable() == []
    state.ack(MAX_CHUNKS_IN_FLIGHT // 2, MAX_CHUNKS_IN_FLIGHT // 2, now=0)
    assert len(state.sendable()) == MAX_CHUNKS_IN_FLIGHT


def test_a_full_buffer_holds_the_reader_and_half_of_it_releases():
    state = started()
    assert state.hold_change() is None
    feed(state, STDOUT, b"x" * LIMITS.buffer_bytes, 4 * KiB)
    caller = Caller()
    caller.take(state.sendable())
    assert state.hold_change() is True and state.hold_change() is None
    assert state.totals.reader_holds == 1
    while state.hold_change() is None:  # the caller reads a window at a time
        state.ack(*caller.offsets(), now=0)
        caller.take(state.sendable())
        assert state.buffered >= LIMITS.buffer_bytes // 2 - LIMITS.window_bytes
    assert state.buffered < LIMITS.buffer_bytes // 2 and not state.held


def test_no_hold_before_the_command_started_nor_after_the_answer():
    state = StreamState("t", LIMITS)
    feed(state, STDOUT, b"x" * LIMITS.buffer_bytes, 4 * KiB)
    assert state.hold_change() is None
    state.started(SUPERVISOR)
    assert state.hold_change() is True
    state.answer(error_reply("t", "", ""), now=0)
    assert state.hold_change() is False and state.hold_change() is None


def test_a_live_caller_past_buffer_and_slack_loses_new_output_counted():
    state = started()
    limit = LIMITS.buffer_bytes + HOLD_SLACK_BYTES
    feed(state, STDOUT, b"x" * limit, 64 * KiB)
    state.add(STDOUT, limit, b"y" * 10)
    state.add(STDOUT, limit + 10, b"z" * 10)
    assert state.buffered == limit and state.dropped(STDOUT) == 20
    assert state.totals.dropped["overflow"] == 20


def test_without_a_caller_the_buffer_is_a_ring_that_drops_the_oldest():
    state = started()
    feed(state, STDOUT, b"x" * LIMITS.buffer_bytes, 4 * KiB)
    assert state.hold_change() is True
    state.disconnected()
    assert state.hold_change() is False  # the task runs on
    assert state.sendable() == []
    feed(state, STDERR, b"e" * 8 * KiB, 4 * KiB)
    feed(state, STDOUT, b"o" * 8 * KiB, 4 * KiB)
    assert state.buffered == LIMITS.buffer_bytes
    assert state.dropped(STDOUT) == 16 * KiB and state.dropped(STDERR) == 0
    assert state.totals.dropped["absent_reader"] == 16 * KiB
    assert state.hold_change() is None


def test_attach_resends_from_the_offsets_asked_with_nothing_lost_or_repeated():
    state = started()
    data = bytes(range(251)) * 200  # 50 200 bytes, under the buffer
    feed(state, STDOUT, data[:30_000], 3000)
    feed(state, STDERR, b"E" * 5000, 1000)
    first = Caller()
    first.take(state.sendable())
    state.ack(6000, 0, now=0)  # it acknowledged some, received more, then its connection went
    state.disconnected()
    feed(state, STDOUT, data[30_000:], 3000)
    have = first.offsets()
    assert have[0] > 6000
    state.attach(*have, now=1)
    second = Caller()
    second.got = {s: bytearray(b) for s, b in first.got.items()}
    second.take(state.sendable())
    while state.buffered:
        state.ack(*second.offsets(), now=1)
        second.take(state.sendable())
    assert bytes(second.got[STDOUT]) == data and bytes(second.got[STDERR]) == b"E" * 5000
    assert second.gaps == {STDOUT: 0, STDERR: 0}


def test_attach_inside_a_chunk_cuts_it_and_before_the_buffer_shows_the_gap():
    state = started()
    state.add(STDOUT, 0, b"abcdef")
    state.sendable()
    state.disconnected()
    state.attach(3, 0, now=0)
    (chunk,) = state.sendable()
    assert (chunk.offset, chunk.data) == (3, b"def")
    # The ring dropped the start while it was gone: a caller asking from 0 sees the gap.
    state = started(StreamLimits(window_bytes=4 * KiB, buffer_bytes=64 * KiB))
    feed(state, STDOUT, bytes(range(100)) * 1000, 1000)  # 100 000 bytes
    state.sendable()
    state.disconnected()
    assert state.dropped(STDOUT) == 100_000 - 64 * KiB
    state.attach(0, 0, now=0)
    caller = Caller()
    caller.take(state.sendable())
    assert caller.gaps[STDOUT] == 100_000 - 64 * KiB


def test_attach_cannot_claim_output_never_sent():
    state = started()
    state.add(STDOUT, 0, b"abc")
    state.sendable()
    state.add(STDOUT, 3, b"def")
    state.attach(1000, 0, now=0)  # it was sent "abc" only
    assert [c.data for c in state.sendable()] == [b"def"]


def test_a_gap_from_the_supervisor_is_counted_and_an_overlap_trimmed():
    state = started()
    state.add(STDOUT, 0, b"abc")
    state.add(STDOUT, 1, b"bcde")  # overlaps: only "de" is new
    state.add(STDOUT, 10, b"k")  # 5 bytes never arrived
    caller = Caller()
    caller.take(state.sendable())
    assert bytes(caller.got[STDOUT]) == b"abcdek" and caller.gaps[STDOUT] == 5
    assert state.totals.dropped["lost"] == 5


def test_the_reply_is_ready_only_once_every_chunk_was_sent_and_lingers():
    state = started()
    feed(state, STDOUT, b"x" * 20 * KiB, 4 * KiB)
    state.sendable()
    state.answer(error_reply("t", "", ""), now=100.0)
    assert not state.reply_ready() and state.deadline() == 130.0
    state.add(STDOUT, 20 * KiB, b"late")  # after the answer: dropped
    assert state.totals.dropped["late"] == 4
    state.ack(16 * KiB, 0, now=110.0)
    assert state.deadline() == 140.0
    state.sendable()
    assert state.reply_ready()
    state.disconnected()
    assert not state.reply_ready()


def test_close_gives_back_what_the_state_held():
    totals = StreamTotals()
    states = [StreamState(f"t{i}", LIMITS, stdin_open=True, totals=totals) for i in range(3)]
    for state in states:
        feed(state, STDOUT, b"x" * 10 * KiB, 1 * KiB)
        state.stdin(b"in", False)
    assert totals.buffered == 30 * KiB and totals.stdin_held == 6
    for state in states:
        state.close()
    assert totals.buffered == 0 and totals.stdin_held == 0


# --- stdin --------------------------------------------------------------------

def test_stdin_is_held_until_the_command_starts_then_forwarded():
    state = StreamState("t", LIMITS, stdin_open=True)
    assert state.stdin(b"a\n", False) == [] and state.stdin(b"b\n", False) == []
    assert state.started(SUPERVISOR) == [(b"a\n", False), (b"b\n", False)]
    assert state.totals.stdin_held == 0
    assert state.stdin(b"c\n", True) == [(b"c\n", True)]
    assert state.stdin(b"d\n", False) == []  # after eof
    assert state.totals.stdin_refused["closed"] == 1


def test_stdin_past_the_cap_is_cut_there_and_closed():
    state = started(stdin_open=True, stdin_used=40)  # the request carried 40 bytes
    assert state.stdin(b"x" * 50, False) == [(b"x" * 50, False)]
    assert state.stdin(b"y" * 20, False) == [(b"y" * 10, True)]
    assert state.stdin_used == 100 and state.stdin_closed
    assert state.totals.stdin_refused["over_cap"] == 1
    assert state.stdin(b"z", True) == []


def test_stdin_exactly_at_the_cap_stays_open_until_more_comes():
    state = started(stdin_open=True)
    assert state.stdin(b"x" * 100, False) == [(b"x" * 100, False)]
    assert state.stdin(b"", True) == [(b"", True)]  # a bare eof is not over the cap
    state = started(stdin_open=True)
    state.stdin(b"x" * 100, False)
    assert state.stdin(b"!", False) == [(b"", True)]


def test_stdin_for_a_task_without_stdin_open_is_ignored():
    state = started(stdin_open=False)
    assert state.stdin(b"x", True) == []
    assert state.totals.stdin_refused["not_open"] == 1


def test_stdin_held_for_unstarted_commands_is_bounded_across_tasks():
    totals = StreamTotals()
    big = StreamLimits(max_stdin_bytes=8 << 20)
    states = [StreamState(f"t{i}", big, stdin_open=True, totals=totals) for i in range(9)]
    chunk = b"s" * 65536
    for state in states[:8]:
        for _ in range(128):  # 8 MiB each: 64 MiB held in all
            assert state.stdin(chunk, False) == []
    assert totals.stdin_held == HELD_STDIN_TOTAL
    assert states[8].stdin(chunk, False) == [] and states[8].stdin_closed
    assert totals.stdin_refused["held_total"] == 1
    assert states[8].started(SUPERVISOR) == [(b"", True)]
    states[0].answer(error_reply("t0", "", ""), now=0)  # an answered task's held stdin is let go
    assert totals.stdin_held == HELD_STDIN_TOTAL - (8 << 20)


@pytest.mark.parametrize("stdin_open", [False, True])
def test_stdin_after_the_answer_is_ignored(stdin_open):
    state = started(stdin_open=stdin_open)
    state.answer(error_reply("t", "", ""), now=0)
    assert state.stdin(b"x", False) == [] and state.started(SUPERVISOR) == []
