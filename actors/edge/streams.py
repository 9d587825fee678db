"""StreamState: what the IntakeServer holds for one task that streams its
output or takes stdin while it runs (TaskRequest.stream, .stdin_open;
docs/protocol.md, "Caller stream frames").

Plain logic, no sockets and no actors: the server (actors/edge/intake_server.py)
feeds it what happens (a chunk from the Supervisor, a StreamAck, a lost
connection, a TaskAttach, stdin, the answer) and does what it returns (send
these TaskOutput frames, tell the Supervisor ReaderHold or StdinChunk, send
the reply).

Output: per stream (stdout, stderr) a deque of chunks sent on the current
connection and not yet acknowledged, and one of chunks not yet sent; the two
streams go out in the order they arrived. At most `window_bytes` are sent
beyond what the caller acknowledged. Everything not acknowledged is held, and
that is bounded:

- while the caller's connection lives, `buffer_bytes` held asks the Supervisor
  to stop reading the VM's channel (ReaderHold(True)): the command's writes
  block in the guest; below half of it, reading resumes (ReaderHold(False)).
  What was already on its way comes on; past `buffer_bytes + HOLD_SLACK_BYTES`
  (a Supervisor that does not hold) new output is dropped and counted;
- while it is gone, the buffer is a ring: the oldest output is dropped
  (counted per stream) and the command runs on, unheld.

A caller that attaches again names the offsets it has: what is still held
from there is sent again; a chunk starting past the offset shows the gap.

The reply goes out only once every chunk before it was sent (not necessarily
acknowledged). An answered task whose caller is gone, or reads nothing,
keeps its output and reply `linger_s` after the answer or the caller's last
acknowledgement, then they are dropped.

Stdin: held until the Supervisor said the command is starting (TaskStarted),
then forwarded; at most `max_stdin_bytes` in all with the request's own
stdin: a chunk past it is cut there and the stdin closed. Stdin held for
commands not yet started is bounded across all tasks by HELD_STDIN_TOTAL.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from protocol.channel.constants import KiB, MAX_STDIN, MiB, STDERR, STDOUT
from protocol.wire.tasks import TaskReply

STREAMS = (STDOUT, STDERR)
# Unsent output of one stream merges up to this, so a caller that is behind
# gets fewer, larger TaskOutput frames (the guest reads its pipes 64 KiB at a time).
COALESCE_BYTES = 64 * KiB
# TaskOutput frames sent and not acknowledged: well under the ROUTER's send
# high-water mark (1000 messages per peer), past which libzmq drops silently.
MAX_CHUNKS_IN_FLIGHT = 256
# Output that may still arrive after ReaderHold(True): IOGuard's burst and what
# was read before the hold reached it. Past it the Supervisor did not hold.
HOLD_SLACK_BYTES = 4 * MiB
# Stdin held for tasks whose command has not started yet, all tasks together.
HELD_STDIN_TOTAL = 64 * MiB


@dataclass(frozen=True)
class StreamLimits:
    window_bytes: int = 256 * KiB  # tasks.stream_window_bytes
    buffer_bytes: int = 1 * MiB  # tasks.stream_buffer_bytes
    linger_s: float = 30.0  # tasks.stream_linger_s
    max_stdin_bytes: int = MAX_STDIN  # tasks.max_stdin_bytes

    @classmethod
    def from_config(cls, tasks) -> StreamLimits:
        return cls(window_bytes=tasks.stream_window_bytes, buffer_bytes=tasks.stream_buffer_bytes,
                   linger_s=tasks.stream_linger_s, max_stdin_bytes=tasks.max_stdin_bytes)


class StreamTotals:
    """Running totals over every StreamState of one server, exported as
    metrics at scrape time (actors/edge/metrics.py, watch_streams). Written by
    the server thread only."""

    def __init__(self) -> None:
        self.buffered = 0  # output bytes held now
        self.stdin_held = 0  # stdin bytes held for commands not started yet
        self.chunks_sent = 0  # TaskOutput frames sent, resends included
        self.bytes_sent = 0
        self.reader_holds = 0  # ReaderHold(True) told
        self.dropped = collections.Counter()  # reason -> output bytes dropped
        self.stdin_forwarded = 0  # stdin bytes told to Supervisors
        self.stdin_refused = collections.Counter()  # reason -> TaskStdin frames refused or cut
        self.attaches = collections.Counter()  # result -> TaskAttach frames
        self.acks_ignored = 0  # StreamAcks for no task of that connection
        self.replies_expired = 0  # replies dropped after lingering


class Chunk:
    """Output of one stream from `offset` (bytes of the stream before it)."""

    __slots__ = ("seq", "stream", "offset", "data")

    def __init__(self, seq: int, stream: int, offset: int, data: bytes):
        self.seq = seq  # arrival order across both streams
        self.stream = stream
        self.offset = offset
        self.data = data

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    def __repr__(self) -> str:
        return f"Chunk(seq={self.seq}, stream={self.stream}, offset={self.offset}, {len(self.data)} bytes)"


class Output:
    """One stream of a task."""

    __slots__ = ("sent", "unsent", "received", "acked", "sent_to", "dropped")

    def __init__(self) -> None:
        self.sent: collections.deque[Chunk] = collections.deque()  # on this connection, not acknowledged
        self.unsent: collections.deque[Chunk] = collections.deque()
        self.received = 0  # the stream's bytes that reached corrald (the next chunk's offset)
        self.acked = 0  # the caller has (or gave up) everything before this
        self.sent_to = 0  # sent on this connection up to here
        self.dropped = 0  # bytes of this stream the caller will never get


class StreamState:
    def __init__(self, task_id: str, limits: StreamLimits, stdin_open: bool = False, stdin_used: int = 0,
                 totals: StreamTotals | None = None):
        self.task_id = task_id
        self.limits = limits
        self.totals = totals if totals is not None else StreamTotals()
        self.outputs = {stream: Output() for stream in STREAMS}
        self.buffered = 0  # bytes held in both streams, sent or not
        self.in_flight_bytes = 0  # sent and not acknowledged
        self.in_flight_chunks = 0
        self.connected = True
        self.held = False  # as last told to the Supervisor
        self._seq = 0
        self._newest: Chunk | None = None  # the newest chunk while unsent: more of its stream merges into it
        # stdin
        self.stdin_open = stdin_open
        self.stdin_used = stdin_used  # TaskRequest.stdin and every TaskStdin taken
        self.stdin_closed = not stdin_open
        self.stdin_held: list[tuple[bytes, bool]] = []
        self.supervisor = None  # from TaskStarted until the answer
        # the answer
        self.reply: TaskReply | None = None
        self.idle_since = 0.0  # after the answer: since when the caller did nothing

    # --- output ------------------------------------------------------------------

    def add(self, stream: int, offset: int, data: bytes) -> None:
        """A chunk from the Supervisor, `offset` bytes into `stream`."""
        out = self.outputs[stream]
        if self.reply is not None:  # after the answer: never sent, the reply may be out already
            self._drop(out, "late", len(data))
            return
        if offset < out.received:  # overlaps what came already: only the new part counts
            data = data[out.received - offset:]
            offset = out.received
        elif offset > out.received:  # a gap: output that never reached corrald
            self._drop(out, "lost", offset - out.received)
        out.received = offset + len(data)
        if not data:
            return
        if self.connected and self.buffered + len(data) > self.limits.buffer_bytes + HOLD_SLACK_BYTES:
            self._drop(out, "overflow", len(data))
            return
        newest = self._newest
        if (newest is not None and newest.stream == stream and newest.end == offset
                and len(newest.data) + len(data) <= COALESCE_BYTES):
            newest.data += data
        else:
            self._seq += 1
            self._newest = Chunk(self._seq, stream, offset, data)
            out.unsent.append(self._newest)
        self._grow(len(data))
        if not self.connected:
            self._ring()

    def sendable(self) -> list[Chunk]:
        """Chunks to send now, in arrival order, as far as the window allows;
        they count as sent from here on."""
        chunks = []
        if not self.connected:
            return chunks
        while ((room := self.limits.window_bytes - self.in_flight_bytes) > 0
               and self.in_flight_chunks < MAX_CHUNKS_IN_FLIGHT):
            chunk = self._next_unsent()
            if chunk is None:
                break
            if len(chunk.data) > room:  # the window is exact: the rest waits for an ack
                front = Chunk(chunk.seq, chunk.stream, chunk.offset, chunk.data[:room])
                chunk.data = chunk.data[room:]
                chunk.offset += room
                self.outputs[chunk.stream].unsent.appendleft(front)
                chunk = front
            chunks.append(self._mark_sent(chunk))
        return chunks

    def drain(self) -> list[Chunk]:
        """Every unsent chunk whatever the window (corrald is stopping)."""
        chunks = []
        while self.connected and (chunk := self._next_unsent()) is not None:
            chunks.append(self._mark_sent(chunk))
        return chunks

    def ack(self, stdout_offset: int, stderr_offset: int, now: float) -> None:
        """The caller has each stream up to these offsets: never back, never
        past what was sent on this connection."""
        for stream, offset in ((STDOUT, stdout_offset), (STDERR, stderr_offset)):
            out = self.outputs[stream]
            offset = min(offset, out.sent_to)
            if offset <= out.acked:
                continue
            out.acked = offset
            while out.sent and out.sent[0].end <= offset:
                chunk = out.sent.popleft()
                self.in_flight_bytes -= len(chunk.data)
                self.in_flight_chunks -= 1
                self._shrink(len(chunk.data))
            if out.sent and out.sent[0].offset < offset:
                cut = self._cut_front(out.sent[0], offset)
                self.in_flight_bytes -= cut
        self.idle_since = now

    def disconnected(self) -> None:
        """The caller's connection is gone: what was sent on it and not
        acknowledged goes back to unsent, and the buffer becomes a ring."""
        if not self.connected:
            return
        self.connected = False
        for out in self.outputs.values():
            out.unsent.extendleft(reversed(out.sent))
            out.sent.clear()
        self.in_flight_bytes = self.in_flight_chunks = 0
        self._ring()

    def attach(self, stdout_offset: int, stderr_offset: int, now: float) -> None:
        """A new connection of the caller has each stream up to these
        offsets: send again from there what is still held."""
        self.disconnected()
        self.connected = True
        for stream, asked in ((STDOUT, stdout_offset), (STDERR, stderr_offset)):
            out = self.outputs[stream]
            asked = min(asked, out.sent_to)  # it cannot have what was never sent
            while out.unsent and out.unsent[0].end <= asked:
                self._shrink(len(out.unsent.popleft().data))
            if out.unsent and out.unsent[0].offset < asked:
                self._cut_front(out.unsent[0], asked)
            out.acked = max(out.acked, asked)
            out.sent_to = out.acked
        self.idle_since = now

    def hold_change(self) -> bool | None:
        """ReaderHold to tell the Supervisor now (True: hold, False: release),
        or None. Held while a live caller is `buffer_bytes` behind, until it
        is below half; never once the caller is gone or the task answered."""
        if self.held and (not self.connected or self.reply is not None
                          or self.buffered < self.limits.buffer_bytes // 2):
            self.held = False
            return False
        if (not self.held and self.connected and self.reply is None and self.supervisor is not None
                and self.buffered >= self.limits.buffer_bytes):
            self.held = True
            self.totals.reader_holds += 1
            return True
        return None

    # --- stdin -------------------------------------------------------------------

    def started(self, supervisor) -> list[tuple[bytes, bool]]:
        """TaskStarted: stdin goes to `supervisor` from now on; returns what
        was held, to forward now ((data, eof) each)."""
        if self.reply is not None:
            return []
        self.supervisor = supervisor
        held, self.stdin_held = self.stdin_held, []
        self.totals.stdin_held -= sum(len(data) for data, _ in held)
        return held

    def stdin(self, data: bytes, eof: bool) -> list[tuple[bytes, bool]]:
        """A TaskStdin: what to forward now ((data, eof) each; none while held)."""
        if not self.stdin_open or self.stdin_closed:
            self.totals.stdin_refused["not_open" if not self.stdin_open else "closed"] += 1
            return []
        room = self.limits.max_stdin_bytes - self.stdin_used
        held_room = HELD_STDIN_TOTAL - self.totals.stdin_held if self.supervisor is None else room
        if len(data) > min(room, held_room):
            self.totals.stdin_refused["over_cap" if len(data) > room else "held_total"] += 1
            data, eof = data[:max(min(room, held_room), 0)], True
        self.stdin_used += len(data)
        self.stdin_closed = eof
        if not data and not eof:
            return []
        if self.supervisor is None:
            self.stdin_held.append((data, eof))
            self.totals.stdin_held += len(data)
            return []
        self.totals.stdin_forwarded += len(data)
        return [(data, eof)]

    # --- the answer --------------------------------------------------------------

    def answer(self, reply: TaskReply, now: float) -> None:
        """The task's one answer: sent once every chunk is (reply_ready)."""
        self.reply = reply
        self.idle_since = now
        self.supervisor = None  # its VM may run another task from now on
        self.stdin_closed = True
        self._forget_stdin()

    def reply_ready(self) -> bool:
        return (self.reply is not None and self.connected
                and not any(out.unsent for out in self.outputs.values()))

    def deadline(self) -> float | None:
        """When an answered task's undelivered output and reply are dropped."""
        return None if self.reply is None else self.idle_since + self.limits.linger_s

    def close(self) -> None:
        """The state is dropped: give back what it held to the totals."""
        self._shrink(self.buffered)
        for out in self.outputs.values():
            out.sent.clear()
            out.unsent.clear()
        self._newest = None
        self._forget_stdin()

    def dropped(self, stream: int) -> int:
        return self.outputs[stream].dropped

    # --- inside ------------------------------------------------------------------

    def _next_unsent(self) -> Chunk | None:
        heads = [out.unsent[0] for out in self.outputs.values() if out.unsent]
        return min(heads, key=lambda chunk: chunk.seq) if heads else None

    def _mark_sent(self, chunk: Chunk) -> Chunk:
        out = self.outputs[chunk.stream]
        out.unsent.popleft()
        out.sent.append(chunk)
        out.sent_to = chunk.end
        self.in_flight_bytes += len(chunk.data)
        self.in_flight_chunks += 1
        if chunk is self._newest:
            self._newest = None  # what is sent is never changed
        return chunk

    def _ring(self) -> None:
        """No caller: drop the oldest output until the buffer fits."""
        while (excess := self.buffered - self.limits.buffer_bytes) > 0:
            chunk = self._next_unsent()
            out = self.outputs[chunk.stream]
            if len(chunk.data) > excess:
                self._cut_front(chunk, chunk.offset + excess)
                self._drop(out, "absent_reader", excess)
                continue
            out.unsent.popleft()
            if chunk is self._newest:
                self._newest = None
            self._shrink(len(chunk.data))
            self._drop(out, "absent_reader", len(chunk.data))

    def _cut_front(self, chunk: Chunk, offset: int) -> int:
        cut = offset - chunk.offset
        chunk.data = chunk.data[cut:]
        chunk.offset = offset
        self._shrink(cut)
        return cut

    def _drop(self, out: Output, reason: str, count: int) -> None:
        out.dropped += count
        self.totals.dropped[reason] += count

    def _grow(self, count: int) -> None:
        self.buffered += count
        self.totals.buffered += count

    def _shrink(self, count: int) -> None:
        self.buffered -= count
        self.totals.buffered -= count

    def _forget_stdin(self) -> None:
        self.totals.stdin_held -= sum(len(data) for data, _ in self.stdin_held)
        self.stdin_held = []
