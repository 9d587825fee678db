"""One timer thread for every deadline in corrald: `call_later(delay, ref, message)`
tells `message` to the actor `ref` after `delay` seconds (monotonic clock).

A thread per deadline would do too, but the pool arms several deadlines per
task; one heap and one thread keep that cheap and easy to stop.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any

import pykka

from actors.directory import send


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, pykka.ActorRef, Any]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
        self._thread.start()

    def call_later(self, delay_s: float, ref: pykka.ActorRef, message) -> None:
        with self._wake:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._order), ref, message))
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(2)

    def _run(self) -> None:
        with self._wake:
            while not self._stopped:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    _, _, ref, message = heapq.heappop(self._heap)
                    send(ref, message)
                    continue
                self._wake.wait(self._heap[0][0] - now if self._heap else None)
