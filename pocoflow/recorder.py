"""The commit side of an in-process run: ledger rows and JSON checkpoint files.

One ``StepCommit`` per node step, so a local run leaves the same rows a distributed one
does. The ledger is imported lazily: a flow without ``db_path`` never loads SQLAlchemy.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocoflow.commit import StepCommit
from pocoflow.delta import StoreTracker
from pocoflow.errors import RunSetupError, StepConflict
from pocoflow.hooks import FLOW_END, FLOW_START, RUN_PAUSED, RUN_RESUMED
from pocoflow.itemlog import ItemLog
from pocoflow.step import utc_now
from pocoflow.store import Store
from pocoflow.usage import BUDGET_EXCEEDED, Budget, LedgerSink, MemorySink, UsageSink
from pocoflow.waiting import Signal, SignalReader, WaitingFor

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from pocoflow.node import Node

_UNREAD = object()


@lru_cache(maxsize=32)
def _open_ledger(location: str) -> WorkflowDB:
    from pocoflow.db import WorkflowDB

    return WorkflowDB(location)


def open_ledger(location: str | Path) -> WorkflowDB:
    """One WorkflowDB (engine, pool, migration check) per location per process."""
    return _open_ledger(str(location))


class RunRecorder:
    """Writes what a run did; with neither a ledger nor a checkpoint dir it does nothing."""

    def __init__(
        self,
        run_id: str,
        db: WorkflowDB | None,
        checkpoint_dir: Path | None,
    ) -> None:
        self.run_id = run_id
        self.db = db
        self.checkpoint_dir = checkpoint_dir
        self.tracker = StoreTracker()
        self.active = db is not None or checkpoint_dir is not None
        #: Where the run's ``report_usage`` calls go: a row each in the ledger, or memory.
        self.usage: UsageSink = LedgerSink(db) if db is not None else MemorySink()
        # The run's control request as read by the last step's commit, for the check
        # before the next node; _UNREAD once used (or before any commit): read the ledger.
        self._control: str | object | None = _UNREAD

    # ── run boundaries ────────────────────────────────────────────────────────

    def start(
        self,
        store: Store,
        *,
        flow_name: str,
        fingerprint: str,
        max_steps: int,
        start_id: str,
        start_name: str,
        initial_step: int = -1,
        parent_run_id: str | None = None,
        forked_from_step: int | None = None,
        budget: Budget | None = None,
        builder: str | None = None,
    ) -> None:
        if self.db is None:
            return
        created = self.db.create_run(
            self.run_id,
            flow_name,
            status="running",
            fingerprint=fingerprint,
            max_steps=max_steps,
            initial_store=store,
            initial_step=initial_step,
            start_node=start_id,
            start_events=[{"event": FLOW_START, "node_name": start_name, "ts": utc_now()}],
            parent_run_id=parent_run_id,
            forked_from_step=forked_from_step,
            max_tokens=budget.max_tokens if budget else None,
            max_cost_usd=budget.max_cost_usd if budget else None,
            builder=builder,
        )
        if not created:
            raise RunSetupError(
                f"Run id {self.run_id!r} is already in the ledger: give each run its own id "
                "(leave Flow(run_id=...) unset to get a fresh one)"
            )
        self.tracker.diff(store.as_dict(), initial_step)

    def resume_from(self, store: Store, manifest: dict[str, int], texts: dict[str, str]) -> None:
        self.tracker.seed(manifest, texts, store.as_dict())

    def step_done(
        self,
        store: Store,
        *,
        step: int,
        node_name: str,
        action: str | None,
        next_id: str | None,
        next_name: str | None,
        events: list[dict[str, Any]],
    ) -> None:
        """Commit the checkpoint of ``step``; the last step also closes the run (one txn)."""
        if self.checkpoint_dir is not None:
            store.snapshot(self.checkpoint_dir / f"step_{step:03d}_{node_name}.json")
        if self.db is None:
            return
        manifest, changed = self.tracker.diff(store.as_dict(), step)
        run_fields: dict[str, Any] = {"total_steps": step + 1}
        if next_id is None:
            now = utc_now()
            events = [*events, {"event": FLOW_END, "step": step + 1, "ts": now}]
            run_fields.update(status="completed", completed_at=now, current_node=node_name)
        else:
            run_fields["current_node"] = next_name
        committed, self._control = self.db.commit_step_read_control(
            StepCommit(
                run_id=self.run_id,
                step=step,
                node_name=node_name,
                action=action,
                next_node=next_id,
                manifest=manifest,
                changed=changed,
                events=events,
                run_fields=run_fields,
            )
        )
        if not committed:
            raise StepConflict(
                f"Run {self.run_id!r}: step {step} ({node_name}) was already committed by "
                "another runner; this one stops to keep one transition per step"
            )

    def requested_control(self) -> str | None:
        """A ``cancel``/``pause`` left on the run by another process (``attach``, the CLI).

        Right after a step's commit this is the value that commit read (G4 holds: it is
        the request as of that instant); any later call reads the ledger again, so a
        paused run polling here sees the request change."""
        control, self._control = self._control, _UNREAD
        if control is not _UNREAD:
            return control  # type: ignore[return-value]
        return self.db.get_control(self.run_id) if self.db is not None else None

    def item_log(self, step: int, node: Node, *, may_have_kept: bool) -> ItemLog:
        """Where the MapNode of ``step`` keeps its finished items (a resume of the step
        runs only the others); ``may_have_kept``: the step ran before, so read what it
        kept (a fresh step reads nothing)."""
        assert self.db is not None
        return ItemLog(self.db, self.run_id, step, node, may_have_kept=may_have_kept)

    def signal_reader(self) -> SignalReader | None:
        """What ``Node.wait_for`` reads in this run: its signals in the ledger (None
        without one: ``wait_for`` then says it needs a ledger)."""
        db, run_id = self.db, self.run_id
        if db is None:
            return None

        def read(key: str) -> Signal:
            return db.read_signal(run_id, key)

        return read

    def wait(self, step: int, node_name: str, waiting: WaitingFor) -> str:
        """The node of ``step`` waits for a value not sent yet: mark the run ``waiting``
        (``PARKED``), unless the value arrived meanwhile (``SIGNALLED``: run the node
        again) or the run was stopped (``STOPPED``); see ``WorkflowDB.park_waiting``."""
        assert self.db is not None
        return self.db.park_waiting(
            self.run_id, waiting.key, step=step, node_name=node_name, timeout=waiting.timeout
        )

    def rewind(self, store: Store, step: int) -> None:
        """Put ``store`` back, in place, to the checkpoint before ``step``: a node that
        runs again from ``prep`` (its value came as it stopped to wait) must not see what
        its first ``prep`` wrote."""
        assert self.db is not None
        before = self.db.load_checkpoint(self.run_id, step - 1).as_dict()
        for key in [k for k in store if k not in before]:
            del store[key]
        store.update({k: v for k, v in before.items() if k not in store or store[k] != v})

    def park(self, step: int) -> None:
        """A ledger pause request met before ``step``: the run is ``paused`` until the
        request is withdrawn."""
        assert self.db is not None
        self.db.update_run_if(
            self.run_id,
            status_in=("running",),
            control_in=("pause",),
            with_events=[{"event": RUN_PAUSED, "step": step}],
            status="paused",
        )

    def unpark(self, step: int) -> None:
        assert self.db is not None
        self.db.update_run_if(
            self.run_id,
            status_in=("paused",),
            with_events=[{"event": RUN_RESUMED, "step": step}],
            status="running",
        )

    def hold(self, step: int) -> None:
        """The run's own handle paused it before ``step``: ``paused`` in the ledger, unless
        another process cancelled it meanwhile (compare-and-set: the cancel stands). The
        event lands with the status, so whoever sees ``paused`` finds its event."""
        if self.db is not None:
            self.db.update_run_if(
                self.run_id,
                status_in=("running",),
                with_events=[{"event": RUN_PAUSED, "step": step}],
                status="paused",
            )

    def budget_exceeded(self, step: int, message: str) -> None:
        """Why the run pauses before ``step``: it spent its budget (an event)."""
        if self.db is not None:
            self.db.save_event(self.run_id, BUDGET_EXCEEDED, step=step, error_msg=message)

    def release(self, step: int) -> bool:
        """The handle resumed the run held by ``hold``: ``running`` again. False if the run
        is no longer paused (``pocoflow cancel`` landed while it was held): stop, G4."""
        return self.db is None or self.db.update_run_if(
            self.run_id, status_in=("paused",), status="running"
        )

    def ended_early(self, step: int, status: str, event: str, error_msg: str | None) -> None:
        """The run stopped before its graph ended: failed or cancelled."""
        if self.db is None:
            return
        now = utc_now()
        self.db.save_event(self.run_id, event, step=step, error_msg=error_msg, ts=now)
        self.db.update_run(self.run_id, status=status, error_msg=error_msg, completed_at=now)

    def failed(self, step: int, events: list[dict[str, Any]], error_msg: str) -> None:
        if self.db is None:
            return
        for event in events:
            self.db.save_event(self.run_id, **event)
        self.db.update_run(
            self.run_id, status="failed", error_msg=error_msg, completed_at=utc_now()
        )

    def empty_run_done(self) -> None:
        """A run whose start node was None or that resumed past its end."""
        if self.db is None:
            return
        now = utc_now()
        self.db.save_event(self.run_id, FLOW_END, step=0, ts=now)
        self.db.update_run(self.run_id, status="completed", completed_at=now)
