"""An actor probe: a real actor standing in for a neighbour (the pool, the
Scheduler, a Supervisor...) that records every message it is told, so a test
of one actor sees exactly what that actor sends."""

import threading
import time

import pykka


class Recorder(pykka.ThreadingActor):
    def __init__(self):
        super().__init__()
        self.seen = []
        self.changed = threading.Condition()

    def on_receive(self, message):
        with self.changed:
            self.seen.append(message)
            self.changed.notify_all()


def wait_for(recorder, count, timeout_s=5):
    """The messages `recorder` was told, once there are at least `count`."""
    actor = recorder.proxy()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = actor.seen.get()
        if len(seen) >= count:
            return seen
        time.sleep(0.01)
    raise AssertionError(f"only {len(actor.seen.get())} of {count} messages arrived")
