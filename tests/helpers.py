"""Small test helpers shared by every suite."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Waits on state, not time: returns as soon as the condition holds and fails with an
    ``AssertionError`` (naming the predicate) if it does not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            name = getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"condition {name} not met within {timeout}s (last: {result!r})")
        time.sleep(interval)


def stable_id(value: Any) -> str:
    """A parametrized test's id for ``value`` that every process computes alike (pytest-
    xdist's workers must collect the same ids): no object address, and a set's members
    in sorted order, not in the order of this process's string hashes."""
    if isinstance(value, (set, frozenset)):
        inner = ", ".join(sorted(stable_id(member) for member in value))
        return f"{type(value).__name__}({{{inner}}})"
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))
