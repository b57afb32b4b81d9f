"""Pause (and cancel) requests met by a local run: before each node and between map items.

The run loop of ``Flow`` meets a request before every node (G4). A MapNode step runs
its items inside one node, so without more a pause would wait for every item of the
fan-out first. ``ItemGate`` is what a local map asks before it starts an item: was the
run paused (its own handle's ``pause()``, in this process: a flag, free to read) or was
a pause or cancel left on it in the ledger by another process (``pocoflow pause RUN``,
``attach(run_id).pause()``: one narrow read, at most every ``ITEM_POLL_S`` while the map
starts items, none in a map shorter than that)? Once one is met the map starts no more
items, lets the running ones end (they are kept, with a ledger: ``itemlog``), and holds
the run in place, ``paused``, as the loop does before a node: ``handle.resume()`` (or
the withdrawn ledger request, ``pocoflow resume RUN``) lets it go on with the items not
started, a cancel ends it. A process that dies while held leaves the run ``paused`` with
its finished items kept, so ``flow.resume(run_id)`` runs only the others.

How the gate reaches the map: ``Flow``'s loop sets it for each step (``CURRENT``, a
context variable) and ``MapNode`` reads it in the step's thread, so a MapNode inside a
sub-flow (or the passes of a parallel BatchFlow) meets it too; a MapNode run on another
thread (inside a map item's ``exec``) or on a worker has none.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING

from pocoflow.step import RunCancelled

if TYPE_CHECKING:
    from pocoflow.recorder import RunRecorder
    from pocoflow.runner import RunControl

#: How often a run held by a pause request from another process looks for its withdrawal.
LEDGER_POLL_S = 0.05
#: How often, at most, a local map reads the ledger for a request from another process
#: while it starts items (its own handle's pause is a flag, read before every item).
ITEM_POLL_S = 0.5

#: The item gate of the step running in this context (set by ``Flow``'s loop).
CURRENT: ContextVar[ItemGate | None] = ContextVar("pocoflow_item_gate", default=None)


class CancelledInLedger(RunCancelled):
    """A cancel that another process recorded (status ``cancelled``, its event): the run
    ends without recording it again."""


def hold_for_handle(recorder: RunRecorder, control: RunControl, step: int) -> bool:
    """The run's own handle paused it before ``step``: ``paused`` in the ledger until
    ``resume()`` (or ``cancel()``). False if another process cancelled it meanwhile (the
    run is no longer paused there): it must stop, that cancel recorded already (G4)."""
    recorder.hold(step)
    control.wait_until_resumed()
    return control.cancelled or recorder.release(step)


def hold_for_ledger(recorder: RunRecorder, control: RunControl, step: int) -> bool:
    """Wait while another process's pause request stands; False if it became a cancel.
    Polls the ledger, since the request comes from another process."""
    recorder.park(step)
    while True:
        requested = recorder.requested_control()
        if requested == "cancel" or control.cancelled:
            return False
        if requested != "pause":
            recorder.unpark(step)
            return True
        control.cancel_event.wait(LEDGER_POLL_S)


class ItemGate:
    """What a local map asks between its items: ``requested()`` before starting one (cheap),
    and, once it is True and the running items ended, ``hold()``."""

    def __init__(self, recorder: RunRecorder, control: RunControl) -> None:
        self.recorder = recorder
        self.control = control
        self.step = 0
        self._next_read = 0.0

    def at_step(self, step: int) -> None:
        """A new step starts: the loop read the ledger's request just before it, so the
        first read of this step's map waits ``ITEM_POLL_S``."""
        self.step = step
        self._next_read = time.monotonic() + ITEM_POLL_S

    def requested(self) -> bool:
        """True if the run was paused by its handle, or (read at most every
        ``ITEM_POLL_S``) a pause or cancel request stands on it in the ledger."""
        if self.control.paused:
            return True
        if self.recorder.db is None:
            return False
        now = time.monotonic()
        if now < self._next_read:
            return False
        self._next_read = now + ITEM_POLL_S
        return self.recorder.db.get_control(self.recorder.run_id) in ("pause", "cancel")

    def hold(self, where: str) -> None:
        """Hold the run here while it is paused (by its handle, or in the ledger), as the
        loop does before a node; return once it may go on. ``RunCancelled`` if it was
        cancelled meanwhile (``CancelledInLedger`` when another process recorded it)."""
        recorder, control, step = self.recorder, self.control, self.step
        while True:
            requested = recorder.db.get_control(recorder.run_id) if recorder.db else None
            if requested == "cancel":
                raise CancelledInLedger(f"{where}: cancelled")
            if requested == "pause" and not hold_for_ledger(recorder, control, step):
                # The handle's own cancel is this run's to record, unless the ledger
                # holds one already (another process's, recorded by it).
                if control.cancelled and recorder.requested_control() != "cancel":
                    raise RunCancelled(f"{where}: cancelled")
                raise CancelledInLedger(f"{where}: cancelled")
            if control.paused:
                if not hold_for_handle(recorder, control, step):
                    raise CancelledInLedger(f"{where}: cancelled")
                continue  # look again: a request left in the ledger meanwhile
            if control.cancelled:
                raise RunCancelled(f"{where}: cancelled")
            self._next_read = time.monotonic() + ITEM_POLL_S
            return
