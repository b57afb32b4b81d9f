"""RunHandle: watch and steer a run that is going on somewhere else.

A background run (a thread in this process) answers from its thread and its in-process
control; a run with a ledger also answers from the ledger, so the same handle works for
runs started by other processes (``attach``).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable

    from pocoflow.db import WorkflowDB
    from pocoflow.store import Store
    from pocoflow.usage import Budget

_log = get_logger("runner")

FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: A run that ran in a process has no step rows to lease when it is woken.
_NO_LEASE = 0.0


class RunControl:
    """In-process cancel and pause flags, checked by the run loop before every node.

    The distributed executor supplies an object with the same methods
    (``cancel(terminate)``, ``pause``, ``resume``, ``cancelled``, ``paused``) that writes
    the ledger and the Redis flags instead.
    """

    def __init__(self) -> None:
        self.cancel_event = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self.stopped_by_cancel = False  # set by the run loop when it honoured a cancel
        #: The run's budget, checked before every node; ``RunHandle.resume`` raises it.
        self.budget: Budget | None = None
        #: True when a handle can resume the run: its budget then holds it, paused.
        self.held_by_handle = False
        #: The run's usage sink (set when the run loop starts).
        self.usage: Any = None

    def cancel(self, terminate: bool = False) -> None:
        self.cancel_event.set()
        self._running.set()  # a paused run wakes up to notice the cancel

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_until_resumed(self, timeout: float | None = None) -> bool:
        return self._running.wait(timeout)


class RunHandle:
    """Handle on one run: ``status``, ``is_done``, ``wait``, ``cancel``, ``pause``,
    ``resume``, ``send``, ``events`` and ``store``.

    ``wait`` returns the final Store, re-raises the run's error, and returns the last
    Store of a cancelled run (check ``status``). A background run whose node waits for a
    value (``wait_for``) stops its thread: ``wait`` returns the Store and ``status`` says
    ``waiting``; a run on the workers is waited for until it ends.
    """

    def __init__(
        self,
        run_id: str,
        thread: threading.Thread | None = None,
        done_event: threading.Event | None = None,
        result_box: list[Any] | None = None,
        cancel_event: threading.Event | None = None,
        db: WorkflowDB | None = None,
        *,
        control: Any = None,
        initial_store: Store | None = None,
        usage: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.run_id = run_id
        self._thread = thread
        self._done = done_event
        self._result_box = result_box if result_box is not None else []
        if control is None:
            control = RunControl()
            if cancel_event is not None:
                control.cancel_event = cancel_event
        self._control = control
        self._db = db
        self._initial_store = initial_store
        self._usage = usage

    # ── status ────────────────────────────────────────────────────────────────

    @property
    def status(self) -> str:
        """``queued``, ``running``, ``paused``, ``waiting``, ``completed``, ``failed`` or
        ``cancelled``: from the ledger when there is one, else from the thread."""
        if self._db is not None:
            run = self._db.get_run(self.run_id)
            if run:
                return run["status"]
        if self._done is not None and self._done.is_set():
            result = self._result_box[0] if self._result_box else None
            if isinstance(result, BaseException):
                return "failed"
            return (
                "cancelled" if getattr(self._control, "stopped_by_cancel", False) else "completed"
            )
        return "paused" if self._control.paused else "running"

    @property
    def is_done(self) -> bool:
        if self._done is not None:
            if not self._done.is_set():
                return False
            # A background run whose node waits for a value ends its thread, but the run
            # is not done: it is ``waiting`` (as a distributed handle says) until resumed.
            return self._db is None or self.status != "waiting"
        return self.status in FINISHED_STATUSES

    # ── waiting ───────────────────────────────────────────────────────────────

    def wait(self, timeout: float | None = None) -> Store:
        """Block until the run finishes; return its Store or re-raise its error."""
        if self._done is not None:
            if not self._done.wait(timeout=timeout):
                raise TimeoutError(f"Run {self.run_id!r} did not finish within {timeout}s")
            result = self._result_box[0]
            if isinstance(result, BaseException):
                raise result
            return result
        return self._wait_on_ledger(timeout)

    def _wait_on_ledger(self, timeout: float | None) -> Store:
        db = self._require_db("wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = 0.005
        while True:
            run = db.get_run(self.run_id)
            if run is None:
                raise KeyError(f"Unknown run id {self.run_id!r}")
            if run["status"] in FINISHED_STATUSES:
                if run["status"] == "failed":
                    raise RunFailed(self.run_id, run.get("error_msg") or "unknown error")
                return self.store()
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"Run {self.run_id!r} did not finish within {timeout}s")
            # Short polls at first so wait() returns within ~50 ms of the end; then back
            # off a little so a long wait does not hammer the ledger.
            time.sleep(
                interval
                if deadline is None
                else min(interval, max(0.0, deadline - time.monotonic()))
            )
            interval = min(interval * 1.5, 0.04)

    # ── control ───────────────────────────────────────────────────────────────

    def cancel(self, terminate: bool = False) -> None:
        """Stop the run before its next node starts (a running ``exec`` may poll
        ``Node.cancelled()``). ``terminate`` also interrupts a distributed step."""
        _log.info("Cancel requested for run %r", self.run_id)
        self._control.cancel(terminate)

    def send(self, key: str, value: Any) -> None:
        """Deliver ``value`` (JSON, or anything the Store's codec round-trips) for ``key``:
        the node waiting in ``wait_for(key)`` runs again from ``prep`` and gets it. A run
        on the workers goes on by itself; a run that ran in a process stays ``waiting``
        until ``flow.resume(run_id)``. A value may also be sent before the node asks.

        ``UnknownRunError`` for an unknown run; ``SendRefused`` (naming run and key) for a
        completed or cancelled run or a key that already has its value."""
        sender = getattr(self._control, "send", None)
        if sender is not None:  # a run on the workers: the control also wakes it
            sender(key, value)
            return
        self._require_db("send").send_signal(self.run_id, key, value, lease_s=_NO_LEASE)

    def pause(self) -> None:
        """Hold the run before its next node, or between a map's items; ``resume()``
        lets it go on."""
        self._control.pause()

    def resume(self, *, max_tokens: int | None = None, max_cost_usd: float | None = None) -> None:
        """Let a paused run go on; ``max_tokens`` / ``max_cost_usd`` first raise the
        budget of a run paused because it spent it (the other limit stays as it was)."""
        if max_tokens is not None or max_cost_usd is not None:
            from pocoflow.usage import Budget

            current = getattr(self._control, "budget", None) or Budget()
            raised = current.raised(max_tokens, max_cost_usd)  # checks the values
            if self._db is not None:
                self._db.set_budget(self.run_id, max_tokens=max_tokens, max_cost_usd=max_cost_usd)
            if hasattr(self._control, "budget"):
                self._control.budget = raised
        self._control.resume()

    def usage(self) -> dict[str, Any]:
        """``{"calls", "input_tokens", "output_tokens", "cost_usd", "by_node": {name:
        {...}}}``: every ``report_usage`` call of the run, failed and retried attempts
        included (``calls`` counts the calls; an unpriced call counts 0 cost)."""
        if self._db is not None:
            return self._db.get_usage(self.run_id)
        if self._usage is not None:
            return self._usage()
        from pocoflow.usage import summarize

        return summarize([])

    # ── what happened ─────────────────────────────────────────────────────────

    def events(self) -> list[dict[str, Any]]:
        return self._require_db("events").get_events(self.run_id)

    def store(self) -> Store:
        """The latest checkpoint, or the initial Store before the first one."""
        if self._db is None:
            if self._done is not None and self._done.is_set():
                result = self._result_box[0]
                if not isinstance(result, BaseException):
                    return result
            if self._initial_store is not None:
                return self._initial_store
            raise RuntimeError(f"Run {self.run_id!r} has no ledger to read its Store from")
        latest = self._db.latest_checkpoint(self.run_id)
        step = latest["step"] if latest else -1
        return self._db.load_checkpoint(self.run_id, step)

    def _require_db(self, what: str) -> WorkflowDB:
        if self._db is None:
            raise RuntimeError(
                f"Run {self.run_id!r}: {what}() needs a ledger; create the Flow with db_path="
            )
        return self._db

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r})"


class RunFailed(RuntimeError):
    """A run this process did not execute failed; the message is the ledger's error."""

    def __init__(self, run_id: str, error_msg: str) -> None:
        super().__init__(f"Run {run_id!r} failed: {error_msg}")
        self.run_id = run_id
        self.error_msg = error_msg
