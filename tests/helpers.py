"""Small test helpers shared by every suite."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def pg_client_trace(engine: Any) -> Iterator[list[list[str]]]:
    """libpq's trace of the messages the client sends (a list of each line's tab-separated
    fields, filled when the block ends) on the connections ``engine`` lends meanwhile:
    make them fresh (dispose the pool first), and do not lend them again (after)."""
    from sqlalchemy import event

    sent: list[list[str]] = []
    with tempfile.NamedTemporaryFile("w+") as log:

        def trace(dbapi_conn: Any, *_: Any) -> None:
            dbapi_conn.pgconn.trace(log.fileno())

        event.listen(engine, "checkout", trace)
        try:
            yield sent
        finally:
            event.remove(engine, "checkout", trace)
            engine.dispose()
        log.seek(0)
        sent.extend(line.rstrip("\n").split("\t") for line in log)


def round_trips_of(sent: list[list[str]]) -> int:
    """The round trips in a ``pg_client_trace``: each Sync or simple Query the client sent."""
    return sum(1 for p in sent if len(p) > 3 and p[1] == "F" and p[3].startswith(("Sync", "Query")))
