"""Waiting for a condition with a deadline, the one way tests wait."""

import time


def wait_until(predicate, timeout_s: float, what: str):
    """The first truthy value of predicate(), polled every 50 ms; fails naming
    `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
