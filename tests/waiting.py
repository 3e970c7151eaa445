"""Waiting on a condition instead of sleeping a fixed time: fast when the condition comes early,
a clear failure naming what never came when it does not."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.1


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               describe: Callable[[], str] | None = None) -> T:
    """Call `predicate` every POLL_SECONDS until it returns a true value, and return that value.

    After `timeout` seconds raise AssertionError("timed out after ...s waiting for <what>"), with
    `describe()` appended (e.g. the tail of a worker's log) where given.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(POLL_SECONDS)

