"""Group commit inside one process: the ledger calls of several threads that come at the
same moment run as one transaction, by whichever of them leads (flat combining).

Because the map items of a threads-pool worker each made a transaction of their own,
and what one costs beyond its statements (SQLite: BEGIN, COMMIT and the hand-over of
the file lock; PostgreSQL: the row lock on the step's join, held through each COMMIT)
made the items take turns. A group pays it once.

One thread leads at a time. A caller queues its unit and waits while another leads; a
caller whose unit was run by a leader returns at once with its outcome (it is woken
when that group ends, not when it could take a lock). A caller that finds no leader
becomes the leader: it passes the ``gate`` (the process's SQLite writer lock, where
that is what the group needs), takes its own unit and the others queued by then (up to
``MAX_GROUP``) and runs them.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

#: At most this many calls share one transaction.
MAX_GROUP = 32


class Unit:
    """One grouped call: its work (what the group's runner does with it), then its
    result or the exception it raised."""

    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: Any) -> None:
        self.work = work
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class GroupAborted(Exception):
    """Another call of the group raised a ``BaseException`` (an interrupt, a
    ``SystemExit``) in the shared transaction, which was rolled back: nothing of this
    call was written, and its caller runs it again."""


class Combiner:
    """The queue and the leader of one process's groups of one kind."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Unit] = deque()
        self._leading = False

    def __len__(self) -> int:
        """Units queued and not yet taken by a leader (tests wait for a group to form)."""
        return len(self._queue)

    def run(
        self,
        unit: Unit,
        run_units: Callable[[list[Unit]], None],
        gate: AbstractContextManager[Any],
    ) -> Any:
        """``unit``'s result, or its error raised, once a group ran it (``run_units``
        gives each unit its result or error; what it raises fails every unit).

        Every unit a leader takes ends done, so a waiting caller finds its unit done or
        still queued; a caller that leaves by an exception (an interrupt while it waits)
        takes its unit out of the queue first, so no later group runs a unit whose caller
        has gone (and may be retrying it as a new call)."""
        lead = False
        units: list[Unit] = []
        try:
            with self._cond:
                self._queue.append(unit)
                while self._leading and not unit.done:
                    self._cond.wait()
                if not unit.done:
                    # ``lead`` first: an interrupt between the two leaves the flag unset,
                    # never set with no leader to clear it.
                    lead = self._leading = True
            if lead:
                with gate:
                    try:
                        with self._cond:  # its own first: no other leader ran while it led
                            self._queue.remove(unit)
                            units.append(unit)
                            while self._queue and len(units) < MAX_GROUP:
                                units.append(self._queue.popleft())
                        run_units(units)
                    except BaseException as exc:  # e.g. the pool's checkout timed out
                        if not units:  # nothing taken: its own unit is dropped below
                            raise
                        fail(units, exc, None)  # every unit taken ends with an answer
        finally:
            with self._cond:
                if not units and not unit.done:  # it left before a group took it
                    self._drop(unit)
                for taken in units:
                    taken.done = True
                if lead:
                    self._leading = False
                    self._cond.notify_all()
        if unit.error is not None:
            raise unit.error
        return unit.result

    def _drop(self, unit: Unit) -> None:
        try:
            self._queue.remove(unit)
        except ValueError:  # a leader took it: it runs (or ran) without its caller
            pass


def fail(units: list[Unit], exc: BaseException, culprit: Unit | None) -> None:
    """The group's transaction failed with ``exc`` and nothing of it committed: every
    unit fails, even one whose compare-and-set missed (its answer may rest on another
    unit's rolled-back write), and its caller retries. An interrupt or exit (not an
    ``Exception``) goes to its own caller only: ``culprit`` whose body raised it, or else
    the leader's own unit (the first), on whose thread it arrived; the others get
    ``GroupAborted`` and run again."""
    if isinstance(exc, Exception):
        for unit in units:
            unit.error = exc
        return
    owner = culprit if culprit is not None else units[0]
    aborted = GroupAborted(f"another call of the group raised {type(exc).__name__}")
    for unit in units:
        unit.error = exc if unit is owner else aborted
