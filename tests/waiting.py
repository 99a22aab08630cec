"""Bounded waiting for tests: poll a condition, fail with a message when time runs out."""

from __future__ import annotations

import time


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Return once ``predicate()`` is true; raise AssertionError after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)
