"""A fake corrald for the client's tests: a real ZeroMQ ROUTER in a thread,
bound where the test says, that decodes what the client sends, records it,
and answers as the test scripts it."""

import queue
import threading

import zmq

from protocol.channel.codec import decode, encode, replace
from protocol.wire import envelope
from protocol.wire.tasks import CLIENT_TO_DAEMON, PROTOCOL_TAG, TaskReply, error_reply


def ok_reply(task_id: str, **fields) -> TaskReply:
    """A reply for a command that ran; ``fields`` override the defaults."""
    return replace(error_reply(task_id, "", ""), **{"exit_code": 0, **fields})


def framed(identity: bytes, message) -> list[bytes]:
    """``message`` as the ROUTER sends it to the client ``identity``."""
    return [identity, *envelope.build(PROTOCOL_TAG, encode(message))]


def silent(identity, request):
    return []


class FakeDaemon:
    """A ROUTER that decodes each client message, records it (``requests``,
    and who sent it in ``senders``), and sends whatever ``answer(identity,
    request)`` returns: a list of multipart messages, identity frame first.
    ``answer`` may be swapped at any time; ``push()`` sends from the test's
    thread, in order with the answers."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.answer = silent
        self.requests: list = []
        self.senders: list[bytes] = []
        self.errors: list[str] = []  # what the client got wrong on the wire
        self._pushed: queue.SimpleQueue = queue.SimpleQueue()
        self._context = zmq.Context()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._main, name="fake corrald")
        self._thread.start()
        assert self._bound.wait(5), "fake corrald did not bind"

    def push(self, *messages: list[bytes]) -> None:
        """Send these multipart messages (``framed(...)``) as soon as the ROUTER's thread can."""
        for message in messages:
            self._pushed.put(message)

    def of_type(self, kind) -> list:
        """What the client sent of this message type, in order."""
        return [request for request in self.requests if isinstance(request, kind)]

    def _main(self) -> None:
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(self.endpoint)
        self._bound.set()
        try:
            while not self._stop.is_set():
                if router.poll(10):
                    self._serve_one(router)
                while not self._pushed.empty():
                    router.send_multipart(self._pushed.get())
        finally:
            router.close()

    def _serve_one(self, router) -> None:
        identity, *frames = router.recv_multipart()
        try:
            payload = envelope.parse(PROTOCOL_TAG, frames)
        except envelope.MalformedEnvelope:
            self.errors.append(f"bad framing {frames[:2]!r} ({len(frames)} frames)")
            return
        try:
            request = decode(payload, CLIENT_TO_DAEMON)
            self.senders.append(identity)
            self.requests.append(request)
            messages = self.answer(identity, request)
        except Exception as exc:  # a broken test answer: report it at teardown
            self.errors.append(repr(exc))
            return
        for message in messages:
            router.send_multipart(message)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._context.term()
