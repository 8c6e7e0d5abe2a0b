"""Polling for the daemon benchmarks: wait until a condition holds, or give up with its name."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float, every: float = 0.2, what: str = "") -> T:
    """The first truthy value of condition(), asked every `every` seconds; SystemExit after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f}s" + (f" waiting for {what}" if what else ""))
