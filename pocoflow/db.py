"""WorkflowDB: the ledger of runs, checkpoints, events and steps (0.2's name and API).

``WorkflowDB(path_or_url)`` takes what 0.2 took (a file path) or an SQLAlchemy URL
(``sqlite:///FILE``, ``postgresql://USER:PASS@HOST/DB``). Every call is one transaction
on a pooled connection; the queries live in ``pocoflow.ledger`` by table group, and the
facade only picks the transaction, encodes values with ``pocoflow.codec`` and turns driver
errors into messages that name the run and the database.

Usage::

    db = WorkflowDB("pocoflow.db")
    db.create_run("run-abc", flow_name="my_pipeline")
    db.save_checkpoint("run-abc", step=0, node_name="StepA", store=store)
    db.update_run("run-abc", status="completed")
    store = db.load_checkpoint("run-abc", step=0)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection

from pocoflow import codec
from pocoflow.commit import NextStep, StepCommit
from pocoflow.hooks import RUN_PAUSED
from pocoflow.ledger import (
    checkpoints,
    events,
    pipeline,
    prune as retention,
    runs,
    steps,
    txn,
    usage as usage_rows,
)
from pocoflow.ledger.common import iso_now
from pocoflow.ledger.inbox import SignalInbox
from pocoflow.ledger.itemqueue import ItemQueue
from pocoflow.ledger.queue import StepQueue
from pocoflow.ledger.tables import RUN_STATUSES
from pocoflow.store import Store

_log = logging.getLogger("pocoflow.ledger")

__all__ = ["WorkflowDB"]


def _data_of(store: Any) -> Mapping[str, Any]:
    if isinstance(store, Store):
        return store.as_dict()
    if isinstance(store, Mapping):
        return store
    data = getattr(store, "_data", None)  # a 0.2-style Store from another package
    if isinstance(data, Mapping):
        return data
    raise TypeError(f"Expected a Store or a mapping, got {type(store).__name__}")


def _encode_all(data: Mapping[str, Any]) -> dict[str, str]:
    """Every value as codec text; a value that would not round-trip raises ``TypeError``
    naming its key before anything is written (G7)."""
    return {key: codec.encode(value, key=key) for key, value in data.items()}


def _decode_all(texts: Mapping[str, str]) -> dict[str, Any]:
    return {key: codec.decode(text, key=key) for key, text in texts.items()}


def _own(conn: Connection, c: StepCommit) -> bool:
    """After a step commit whose COMMIT outcome was lost, and whose retry found the step
    committed: was it this commit? A distributed commit closed its own claim's attempt row
    (this attempt, this holder token: another delivery of the same attempt in the same
    process has the same worker id) as committed in the same transaction; a local run has
    a single writer, so the checkpoint of its step is its own."""
    if c.attempt is not None and c.worker is not None:
        return any(
            a["step"] == c.step
            and a["attempt"] == c.attempt
            and (a["holder"] or a["worker"]) == c.lease_holder
            and a["outcome"] == "committed"
            for a in steps.attempts(conn, c.run_id)
        )
    row = checkpoints.get_row(conn, c.run_id, c.step)
    return row is not None and row["node_name"] == c.node_name


class WorkflowDB(ItemQueue, StepQueue, SignalInbox):
    """The run ledger on SQLite or PostgreSQL.

    Parameters
    ----------
    path_or_url :
        A file path (``str`` or ``Path``; parent directories are created, as in 0.2) or a
        URL: ``sqlite:///FILE``, ``postgresql://`` / ``postgresql+psycopg://``.
    synchronous :
        SQLite only: ``"NORMAL"`` (default; env ``POCOFLOW_SQLITE_SYNCHRONOUS``), ``"FULL"``
        or ``"EXTRA"`` to fsync every commit, or ``"OFF"`` (fast, but a power loss can
        corrupt the file).
    busy_timeout :
        SQLite only: seconds a writer waits for another's lock before each retry.

    Instances on the same database share one engine and pool per process, and the schema
    is migrated (or found current) once per engine, so constructing one is cheap.

    This class holds the run, checkpoint and event calls (0.2's API and the step commit);
    the distributed executor's step calls (outbox, leases, attempts) come from
    ``pocoflow.ledger.queue.StepQueue``, the human-in-the-loop calls (``wait_for``,
    ``send``) from ``pocoflow.ledger.inbox.SignalInbox``, the open/transaction plumbing from
    ``pocoflow.ledger.client.LedgerClient``.
    """

    # ── runs ──────────────────────────────────────────────────────────────────

    def create_run(
        self,
        run_id: str,
        flow_name: str = "",
        *,
        status: str = "running",
        fingerprint: str | None = None,
        max_steps: int | None = None,
        initial_store: Store | Mapping[str, Any] | None = None,
        initial_step: int = -1,
        start_node: str | None = None,
        parent_run_id: str | None = None,
        forked_from_step: int | None = None,
        queue: str | None = None,
        graph_shape: str | None = None,
        start_events: list[dict[str, Any]] | None = None,
        first_step: NextStep | None = None,
        now: float | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        builder: str | None = None,
    ) -> bool:
        """Record a new run; False (and nothing written) if ``run_id`` exists, as 0.2
        ignored duplicates.

        ``initial_store`` is written in the same transaction as the checkpoint of
        ``initial_step`` (-1: before the first node; a fork passes the step it forks
        from), with ``start_node`` as its ``next_node``, so a run never exists without
        the Store it starts from. A distributed run also records the broker ``queue`` its
        steps go to and its ``graph_shape`` (JSON), which a version refusal compares (G6).
        ``start_events`` and the ``first_step`` outbox row (leased from ``now``) land in
        the same transaction, so a submitted run never exists without its first step.
        ``builder`` is the ``MODULE:BUILDER`` a run started from the CLI was built by, so
        ``pocoflow resume`` and ``fork`` rebuild its graph without being told.
        """
        runs.check_fields({"status": status})
        started = iso_now()  # also this call's write token (see ``own_run``)
        row: dict[str, Any] = {
            "run_id": run_id,
            "flow_name": flow_name,
            "started_at": started,
            "updated_at": started,
            "status": status,
            "fingerprint": fingerprint,
            "max_steps": max_steps,
            "store_name": initial_store.name if isinstance(initial_store, Store) else None,
            "parent_run_id": parent_run_id,
            "forked_from_step": forked_from_step,
            "queue": queue,
            "graph_shape": graph_shape,
            "max_tokens": max_tokens,
            "max_cost_usd": max_cost_usd,
            "builder": builder,
        }
        texts = None if initial_store is None else _encode_all(_data_of(initial_store))
        dialect = self._dialect

        # One batch (one round trip on PostgreSQL, its COMMIT included): the run row
        # first, a guard that aborts the whole batch when the run id exists already.
        ops = [runs.insert_op(dialect, row)]
        if texts is not None:
            ops += checkpoints.full_ops(run_id, initial_step, "", texts, next_node=start_node)
        if start_events:
            ops.append(events.insert_op(events.rows_of(run_id, start_events), dialect))
        if first_step is not None:
            ops.append(steps.successor_op(dialect, run_id, first_step, now))
        ops = pipeline.aborting(ops)

        def body(conn: Connection) -> bool:
            if not pipeline.run_reading(conn, ops, commit=True)[0]:
                raise txn.Abort(False)
            return True

        def own_run(conn: Connection, created: bool) -> bool:
            # The COMMIT's outcome was lost and the retry found the run: it is ours if it
            # carries the start time this call wrote.
            return created or runs.shows(
                conn, run_id, {"started_at": started, "flow_name": flow_name}
            )

        return self._write(body, "creating the run", run_id, confirm=own_run, batched=True)

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Set fields of a run row (0.2's five, plus ``fingerprint``, ``max_steps``,
        ``control``...). Unknown field -> ``ValueError``; unknown run -> ``KeyError``."""
        runs.check_fields(fields)
        if not self._write(
            lambda conn: runs.update_fields(conn, run_id, fields), "updating the run", run_id
        ):
            raise KeyError(f"Unknown run id {run_id!r} in ledger {self._ledger.label}")

    def update_run_if(
        self,
        run_id: str,
        *,
        status_in: tuple[str, ...] | None = None,
        control_in: tuple[str, ...] | None = None,
        with_events: list[dict[str, Any]] | None = None,
        **fields: Any,
    ) -> bool:
        """``update_run`` as a compare-and-set: only while the run's status (and control)
        is one of ``status_in`` (``control_in``). False, nothing written, otherwise or for
        an unknown run. How distributed runs change state without racing each other.
        ``with_events`` (dicts with an ``event`` key) are written only if the update is,
        in its transaction: a reader never sees the new status without its reason."""
        runs.check_fields(fields)
        stamp = iso_now()  # this call's write token, if its COMMIT's outcome is lost
        rows = events.rows_of(run_id, with_events or [])

        def body(conn: Connection) -> bool:
            done = runs.update_fields_if(
                conn, run_id, fields, status_in=status_in, control_in=control_in, stamp=stamp
            )
            if done and rows:
                events.insert_rows(conn, rows)
            return done

        def own_update(conn: Connection, done: bool) -> bool:
            return done or runs.shows(conn, run_id, {**fields, "updated_at": stamp})

        return self._write(body, "updating the run", run_id, confirm=own_update)

    def park_run(
        self,
        run_id: str,
        step: int,
        attempt: int,
        holder: str,
        now: float | None = None,
        *,
        reason: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Mark a live run with a pause request ``paused`` before step ``step`` (and write
        its ``run_paused`` event, after the ``reason`` events if any), iff the delivery of ``attempt`` by ``holder`` is the one
        that would run that step (not a duplicate of a step another worker holds or
        committed). False, nothing written, otherwise (G4 without stranding a running
        step)."""
        stamp = iso_now()  # this call's write token, as in ``update_run_if``
        said = events.rows_of(run_id, [*(reason or []), {"event": RUN_PAUSED, "step": step}])

        def body(conn: Connection) -> bool:
            done = runs.park(conn, run_id, step, attempt, holder, now, stamp)
            if done:  # with its event: a reader never sees paused without run_paused
                events.insert_rows(conn, said)
            return done

        def own_park(conn: Connection, done: bool) -> bool:
            return done or runs.shows(conn, run_id, {"status": "paused", "updated_at": stamp})

        return self._write(body, "parking the run", run_id, confirm=own_park)

    def get_control(self, run_id: str) -> str | None:
        """The ``cancel``/``pause`` request standing on a run (None: none, or no run): what
        an in-process run reads before every node, so it is one narrow query."""
        return self._read(lambda conn: runs.control(conn, run_id), run_id)

    def set_control(self, run_id: str, control: str | None) -> None:
        """Leave a ``cancel`` / ``pause`` request on the run (None clears it); read it back
        with ``get_run(run_id)["control"]``. Workers check it before each node (G4)."""
        self.update_run(run_id, control=control)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run row as a dict (0.2 column names plus ours), or None."""
        return self._read(lambda conn: runs.get(conn, run_id), run_id)

    def list_runs(
        self,
        limit: int = 100,
        *,
        statuses: Sequence[str] = (),
        flow_name: str | None = None,
        since: str | None = None,
    ) -> list[dict[str, Any]]:
        """The ``limit`` most recently started runs, newest first; optionally only those
        in one of ``statuses``, of ``flow_name``, or started at or after ``since`` (an
        ISO-8601 UTC time). An unknown status is a ``ValueError`` naming it."""
        wanted = tuple(statuses)
        unknown = [s for s in wanted if s not in RUN_STATUSES]
        if unknown:
            raise ValueError(f"unknown run status {unknown[0]!r}: one of {', '.join(RUN_STATUSES)}")
        return self._read(
            lambda conn: runs.list_recent(
                conn, limit, statuses=wanted, flow_name=flow_name, since=since
            )
        )

    # ── checkpoints ───────────────────────────────────────────────────────────

    def save_checkpoint(self, run_id: str, step: int, node_name: str, store: Any) -> None:
        """0.2's checkpoint call: writes every value at ``step``, replacing an existing
        checkpoint of that step. Not the hot path (``commit_step`` is)."""
        texts = _encode_all(_data_of(store))
        self._write(
            lambda conn: checkpoints.write_full(conn, run_id, step, node_name, texts, replace=True),
            f"saving checkpoint {step}",
            run_id,
        )

    def commit_step(self, c: StepCommit, *, now: float | None = None) -> bool:
        """Write one node step in one transaction: its changed values, the checkpoint
        (manifest, next node, action), its events, the run fields and, distributed, the
        fenced ``pf_steps`` update and the successor's outbox row.

        Returns False, with nothing written, when ``(run_id, step)`` is committed already
        or ``c.attempt`` no longer holds the step: another attempt won (G1). ``now`` is
        the clock of the outbox row.
        """
        return self._commit(c, now, read_control=False)[0]

    def commit_step_read_control(self, c: StepCommit) -> tuple[bool, str | None]:
        """``commit_step``, then the run's ``cancel``/``pause`` request read in the same
        transaction: ``(committed, control)``.

        What an in-process run does after each node, because it checks the request before
        the next one (G4): the value as of its own commit is as good as one read an
        instant later (a request landing in between is seen before the node after), and
        costs a statement instead of a read transaction per step.
        """
        return self._commit(c, None, read_control=True)

    def _commit(
        self, c: StepCommit, now: float | None, *, read_control: bool
    ) -> tuple[bool, str | None]:
        if c.run_fields:
            runs.check_fields(c.run_fields)
        checkpoints.check_commit(c)
        dialect = self._dialect

        def body(conn: Connection) -> tuple[bool, str | None]:
            committed = checkpoints.commit(conn, dialect, c, now, read_control=read_control)
            if not committed[0]:
                raise txn.Abort((False, None))
            return committed

        def own_commit(
            conn: Connection, result: tuple[bool, str | None]
        ) -> tuple[bool, str | None]:
            if result[0] or not _own(conn, c):
                return result
            return True, runs.control(conn, c.run_id) if read_control else None

        return self._write(
            body, f"committing step {c.step}", c.run_id, confirm=own_commit, batched=True
        )

    def get_checkpoints(self, run_id: str) -> list[dict[str, Any]]:
        """Checkpoint rows of the nodes that ran (step >= 0), by step; 0.2 columns plus
        ``next_node`` and ``action``. ``store_json`` is only set on 0.2 rows."""
        return self._read(lambda conn: checkpoints.list_rows(conn, run_id), run_id)

    def get_checkpoint(self, run_id: str, step: int) -> dict[str, Any]:
        """One checkpoint row (any step, -1 included); ``KeyError`` if absent."""
        row = self._read(lambda conn: checkpoints.get_row(conn, run_id, step), run_id)
        if row is None:
            raise KeyError(f"No checkpoint for run_id={run_id!r} step={step}")
        return row

    def latest_checkpoint(self, run_id: str) -> dict[str, Any] | None:
        """``step``, ``node_name``, ``next_node``, ``action`` of the newest checkpoint
        (step -1 = only the initial Store), or None: where a resume starts."""
        return self._read(lambda conn: checkpoints.latest(conn, run_id), run_id)

    def load_checkpoint(self, run_id: str, step: int) -> Store:
        """The whole Store after ``step`` (-1 = the initial Store); ``KeyError`` naming run
        and step if there is no such checkpoint."""
        return self.load_store(run_id, step)[0]

    def load_store(self, run_id: str, step: int) -> tuple[Store, dict[str, int], dict[str, str]]:
        """``(store, manifest, texts)`` of a checkpoint, to resume from it.

        ``texts`` holds each value's stored codec text, so a ``StoreTracker`` seeded with
        the manifest and texts knows what is unchanged without re-encoding. A 0.2
        checkpoint returns an empty manifest and texts: its values must all be written
        again by the next commit.
        """
        dialect = self._dialect
        manifest, texts, legacy = self._read(
            lambda conn: checkpoints.load_texts(conn, dialect, run_id, step), run_id
        )
        data = legacy if legacy is not None else _decode_all(texts)
        return Store(data, name=f"{run_id}@step{step}"), manifest, texts

    def claim_to_run(
        self,
        run_id: str,
        step: int,
        attempt: int,
        worker: str,
        lease_s: float,
        *,
        holder: str,
        node_id: str,
        flow: str,
        task_id: str | None = None,
        now: float | None = None,
        load_step: int | None = None,
    ) -> tuple[bool, dict[str, Any] | None, tuple[Store, dict[str, int], dict[str, str]] | None]:
        """``claim_if_runnable`` for a step message naming ``node_id`` of a run of
        ``flow`` (it wins only if the ledger agrees on both), then the Store of
        ``load_step``: on PostgreSQL read in the claim's own batch, one round trip for
        all a worker needs before every step; on SQLite, which has no round trips to
        save, read after the claim's COMMIT, so the write lock is not held while a large
        Store is read.

        Returns ``(claimed, run, (store, manifest, texts))``; the Store part is None
        unless the claim won and the checkpoint was read and decoded. A Store that cannot
        be (a codec error, a value of a type this process never registered, a missing
        checkpoint) is left for the caller to read again under its claim, where the error
        counts toward the step's crash budget instead of failing this call. (On
        PostgreSQL a read the server refuses rolls the claim back with it: the caller
        claims again without the read.)"""
        dialect = self._dialect
        read = checkpoints.load_op(dialect, run_id, load_step) if load_step is not None else None
        in_batch = dialect == "postgresql"
        claimed, run, rows = self._claim(
            run_id, step, attempt, worker, holder, lease_s, now, task_id, node_id, True,
            flow=flow, then_read=read if in_batch else None,
        )  # fmt: skip
        if not claimed or run is None or read is None or load_step is None:
            return claimed, run, None
        try:
            if not in_batch:
                rows = self._read(lambda conn: pipeline.run_reading(conn, [read])[1][0], run_id)
            manifest, texts, legacy = checkpoints.texts_of(rows, run_id, load_step)
            data = legacy if legacy is not None else _decode_all(texts)
        except Exception as exc:
            _log.warning(
                "Step %d of run %s: its Store of step %d cannot be loaded (%s: %s)",
                step,
                run_id,
                load_step,
                type(exc).__name__,
                exc,
            )
            return claimed, run, None
        name = run.get("store_name") or f"{run_id}@step{load_step}"  # as the run began
        return claimed, run, (Store(data, name=name), manifest, texts)

    def count_committed(self, run_id: str) -> int:
        """Committed node steps of the run (checkpoints with step >= 0): what
        ``max_steps`` is checked against across workers (G5)."""
        return self._read(lambda conn: checkpoints.count_committed(conn, run_id), run_id)

    def count_values(self, run_id: str, key: str | None = None) -> int:
        """Stored value rows of a run (of one key): each is one change of that key."""
        return self._read(lambda conn: checkpoints.count_values(conn, run_id, key), run_id)

    # ── events ────────────────────────────────────────────────────────────────

    def save_event(self, run_id: str, event: str, **kw: Any) -> None:
        """Append an event. Optional: ``step``, ``node_name``, ``action``, ``elapsed_ms``,
        ``error_msg``, ``attempt``, ``ts`` (ISO text, datetime or epoch; default now)."""
        row = events.row(run_id, event, kw)
        tries = 0

        def body(conn: Connection) -> None:
            nonlocal tries
            tries += 1
            # An append has no compare-and-set for a retry to miss: after a COMMIT whose
            # outcome was lost (txn.run retries it), it looks for its first try's row.
            if tries == 1 or not events.exists(conn, row):
                events.insert_rows(conn, [row])

        self._write(body, "saving an event", run_id)

    def get_events(self, run_id: str, *, after_id: int = 0) -> list[dict[str, Any]]:
        """Events of a run in insertion order; ``after_id`` skips those already seen."""
        return self._read(lambda conn: events.get(conn, run_id, after_id), run_id)

    # ── usage ─────────────────────────────────────────────────────────────────

    def add_usage(self, report: Any) -> None:
        """Record one ``report_usage`` call (a ``pocoflow.usage.UsageReport``) at once, in
        its own transaction: the call was billed whatever the attempt does next. The same
        transaction adds it to the run's totals (``usage_totals``), so the row and the
        addition land together or not at all. An unknown run id: ``KeyError``."""
        values = usage_rows.row(report)
        ops = usage_rows.add_ops(values)
        tries = 0

        def body(conn: Connection) -> None:
            nonlocal tries
            tries += 1
            # A retry after a COMMIT whose outcome was lost finds its first try's row (see
            # save_event); that try added to the totals too, so it does neither again.
            if tries > 1 and usage_rows.exists(conn, values):
                return
            if not pipeline.run_reading(conn, ops, commit=True)[0]:
                raise self._unknown_run(report.run_id)  # rolls the row back with it

        self._write(body, "recording usage", report.run_id, batched=True)

    def usage_totals(self, run_id: str) -> tuple[int, float]:
        """(tokens, cost_usd) the run reported so far, every attempt included: the totals
        kept on its run row, so a budget check costs one row read at any number of calls.
        (0, 0.0) for a run id the ledger does not hold."""
        return self._read(lambda conn: usage_rows.totals(conn, run_id), run_id)

    def get_usage(self, run_id: str) -> dict[str, Any]:
        """``{"calls", "input_tokens", "output_tokens", "cost_usd", "by_node": {...}}``
        of the run (``RunHandle.usage()``); an unknown cost counts as 0."""
        from pocoflow.usage import summarize

        return summarize(self._read(lambda conn: usage_rows.by_node(conn, run_id), run_id))

    def usage_by_run(self, run_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Totals (calls, tokens, cost) of each run that reported usage: one query."""
        return self._read(lambda conn: usage_rows.by_run(conn, run_ids))

    def set_budget(
        self, run_id: str, *, max_tokens: int | None = None, max_cost_usd: float | None = None
    ) -> None:
        """Raise (or set) the run's budget; a limit left None keeps the recorded one."""
        fields = {
            k: v
            for k, v in (("max_tokens", max_tokens), ("max_cost_usd", max_cost_usd))
            if v is not None
        }
        if fields:
            self.update_run(run_id, **fields)

    # ── retention ─────────────────────────────────────────────────────────────

    def prune_runs(
        self,
        older_than_s: float,
        *,
        statuses: tuple[str, ...] = retention.FINISHED,
        dry_run: bool = False,
        batch: int = retention.DEFAULT_BATCH,
        max_batches: int | None = None,
        now: float | None = None,
    ) -> int:
        """Delete the finished runs (``statuses``: completed, failed, cancelled) whose last
        change is more than ``older_than_s`` seconds before ``now``, with their
        checkpoints, values, events, steps and attempts; returns how many runs went
        (``dry_run``: how many would, nothing deleted).

        ``batch`` runs per write transaction, so the steps running beside a prune wait
        milliseconds for a lock, not the whole prune; ``max_batches`` bounds one call (the
        sweeper prunes a little each pass). A live run is never touched: each batch
        re-checks its runs inside its transaction. ``ValueError`` for a status that is not
        finished or a negative age.
        """
        statuses = retention.check_statuses(tuple(statuses))
        if not older_than_s >= 0:
            raise ValueError(f"Prune age must be >= 0 seconds, got {older_than_s!r}")
        if batch < 1:
            raise ValueError(f"Prune batch must be >= 1 run, got {batch!r}")
        cutoff = retention.cutoff_iso(older_than_s, time.time() if now is None else now)
        if dry_run:
            return self._read(lambda conn: retention.count(conn, statuses, cutoff))
        dialect = self._dialect
        deleted, batches, after = 0, 0, ""
        while max_batches is None or batches < max_batches:

            def listing(conn: Connection, after: str = after) -> list[list[str]]:
                ids = retention.candidates(conn, statuses, cutoff, after, batch)
                return retention.by_item_rows(conn, ids)  # many map items: smaller ones

            groups: list[list[str]] = self._read(listing)
            if not groups:
                break
            after = groups[-1][-1]
            for ids in groups:

                def deleting(conn: Connection, ids: list[str] = ids) -> int:
                    return retention.delete_runs(conn, dialect, ids, statuses, cutoff)

                deleted += self._write(deleting, f"pruning {len(ids)} runs", None)
            batches += 1
        return deleted
