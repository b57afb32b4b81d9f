"""The ledger tables, defined once (SQLAlchemy Core, portable types) for every backend.

This is the schema at the head revision; the migrations in ``migrations/versions`` build
the same thing step by step (0001 = the pocoflow 0.2.1 schema, 0002 = our additions,
0003 = distributed run queue/shape and attempt task ids, 0004 = worker liveness and who
received a step's message, 0005 = the partial indexes that keep the sweeper's cost
independent of how many finished runs the ledger holds, 0007 = the queue of each step,
0008 = usage rows and run budgets, 0009 = the values sent to runs that wait for them:
``wait_for``/``send``, 0010 = map items and joins, 0011 = what a map step's prep wrote,
kept for its join, 0012 = the builder of a CLI run, 0013 = the claim each attempt row
belongs to, 0016 = a run's usage totals on its row), and
a test compares the two. The 0.2 table and column names are kept so 0.2 readers (the
Streamlit monitor, users' SQL) keep working.

Times: the 0.2 columns stay ISO-8601 UTC text (``started_at``, ``created_at``, ``ts``);
the step-protocol columns are epoch seconds (``Float``) because leases are compared and
added to, never shown raw.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ColumnElement,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)

RUN_STATUSES = ("queued", "running", "paused", "waiting", "completed", "failed", "cancelled")
"""Every status a run row may hold (the CHECK constraint of ``pf_runs.status``)."""

CONTROLS = ("cancel", "pause")
"""Requests another process may leave on a run (``pf_runs.control``); NULL = none."""

STEP_STATUSES = ("queued", "running", "committed", "failed")
"""Life of a ``pf_steps`` row: sent (outbox) -> claimed by a worker -> committed or failed."""


ITEM_STATUSES = ("queued", "running", "done", "failed")
"""Life of a ``pf_items`` row: sent (outbox) -> claimed -> done (result or collected
error) or failed (tries spent, ``on_item_error = "raise"``: the run failed)."""

ACTIVE_ITEM_STATUSES = ("queued", "running")
"""Items somebody must still run."""

LIVE_RUN_STATUSES = ("queued", "running", "waiting")
"""Runs whose steps may still need a worker: what the sweeper looks at."""

ACTIVE_STEP_STATUSES = ("queued", "running")
"""Steps somebody must still run (a lease or an outbox row to watch)."""


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def literal_in(column: Any, values: tuple[str, ...]) -> ColumnElement[bool]:
    """``column IN ('a', 'b')`` with the values written into the SQL, not bound.

    Because a partial index is only used for a query whose WHERE repeats the index's own
    predicate: SQLite matches the terms as written (a bound ``IN (?, ?)`` never matches),
    and PostgreSQL cannot prove it for a generic plan of a parameterised statement. The
    index declarations and the queries that rely on them both build it here.
    """
    return column.in_([literal_column(repr(v)) for v in values])


def _run_fk(table: str) -> ForeignKeyConstraint:
    return ForeignKeyConstraint(["run_id"], ["pf_runs.run_id"], name=f"fk_{table}_run_id")


def _held_index(table: Table) -> Index:
    """The index of ``table``'s rows a worker process holds (``received_by`` set)."""
    held = table.c.received_by.is_not(None)
    return Index(
        f"ix_{table.name}_received_by",
        table.c.received_by,
        sqlite_where=held,
        postgresql_where=held,
    )


metadata = MetaData()

pf_runs = Table(
    "pf_runs",
    metadata,
    # ── 0.2 columns ──
    Column("run_id", Text, primary_key=True),
    Column("flow_name", Text, nullable=False, server_default=""),
    Column("status", Text, nullable=False, server_default="running"),
    Column("started_at", Text, nullable=False),
    Column("completed_at", Text),
    Column("total_steps", Integer),
    Column("current_node", Text),
    Column("error_msg", Text),
    # ── 0.3 ──
    Column("fingerprint", Text),
    Column("max_steps", Integer),
    Column("store_name", Text),
    Column("control", Text),
    Column("parent_run_id", Text),
    Column("forked_from_step", Integer),
    Column("updated_at", Text),
    # ── 0003: distributed runs ──
    # Broker queue the run's steps go to (NULL = the default queue).
    Column("queue", Text),
    # JSON shape of the graph the run started with, so a refusal can say what changed (G6).
    Column("graph_shape", Text),
    # ── 0008: the run's budget (NULL = no limit); raised by a resume ──
    Column("max_tokens", Integer),
    Column("max_cost_usd", Float),
    # ── 0012: MODULE:BUILDER of a run started by ``pocoflow run`` (resume/fork rebuild it) ──
    Column("builder", Text),
    # ── 0016: the run's usage so far, the sums over its pf_usage rows (tokens = input +
    # output; an unknown cost counts 0), so a budget check reads this row, not every call.
    # ``add_usage`` writes a row and adds it here in one transaction; nothing else writes
    # pf_usage rows (a fork starts at zero and copies none; a prune deletes a run's rows
    # with its run row). BIGINT because a big fan-out passes 2**31 tokens (PostgreSQL's
    # INTEGER), as the SUM it replaces (a bigint) did.
    Column("used_tokens", BigInteger, nullable=False, server_default="0"),
    Column("used_cost_usd", Float, nullable=False, server_default="0"),
    CheckConstraint(_in("status", RUN_STATUSES), name="ck_pf_runs_status"),
    CheckConstraint(f"control IS NULL OR {_in('control', CONTROLS)}", name="ck_pf_runs_control"),
    Index("ix_pf_runs_started_at", "started_at"),
)
# The live runs, however many finished ones the ledger keeps: the sweeper starts from
# here, so its cost follows the work in flight, not the history (partial: both backends).
_LIVE = literal_in(pf_runs.c.status, LIVE_RUN_STATUSES)
Index("ix_pf_runs_live", pf_runs.c.run_id, sqlite_where=_LIVE, postgresql_where=_LIVE)

pf_checkpoints = Table(
    "pf_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("node_name", Text, nullable=False),
    # Full Store JSON, written by 0.2 only; new rows keep their values in pf_values.
    Column("store_json", Text),
    Column("created_at", Text, nullable=False),
    # Node id that runs after this step; NULL = the run ends here.
    Column("next_node", Text),
    Column("action", Text),
    # JSON object key -> step whose pf_values row holds the key's value at this step.
    Column("manifest", Text),
    # G1's last line of defence: one committed transition per (run_id, step).
    UniqueConstraint("run_id", "step", name="uq_pf_checkpoints_run_step"),
    _run_fk("pf_checkpoints"),
)

pf_values = Table(
    "pf_values",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("key", Text, nullable=False),
    # codec.encode text: written once, at the step that changed the key.
    Column("value_json", Text, nullable=False),
    PrimaryKeyConstraint("run_id", "step", "key", name="pk_pf_values"),
    _run_fk("pf_values"),
)

pf_events = Table(
    "pf_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Text, nullable=False),
    Column("step", Integer),
    Column("node_name", Text),
    Column("event", Text, nullable=False),
    Column("action", Text),
    Column("elapsed_ms", Float),
    Column("error_msg", Text),
    Column("ts", Text, nullable=False),
    Column("attempt", Integer),
    _run_fk("pf_events"),
    Index("ix_pf_events_run_id", "run_id", "id"),
)

pf_steps = Table(
    "pf_steps",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("node_id", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="queued"),
    # Fencing token: bumped by every take-over; a commit must carry the current one (G1).
    Column("attempt", Integer, nullable=False, server_default="1"),
    Column("lease_owner", Text),
    Column("lease_expires_at", Float),
    # NULL = the outbox row was written but its message not yet published.
    Column("sent_at", Float),
    # Broker task id of the current attempt's message (for revoke on cancel).
    Column("task_id", Text),
    # When the current attempt was queued (insert or take-over): the unsent sweep's clock.
    Column("queued_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    # 0004: the worker process (``pf_workers.worker_id``) holding this attempt's message
    # in its prefetch buffer or countdown; if that process dies it is sent again (G3).
    Column("received_by", Text),
    # 0007: the broker queue of this step's node (``Node.queue``); NULL = the run's queue.
    # Kept with the step because a re-send (sweeper, resume) must route it as its first
    # send did, and the sending process need not have the flow's graph.
    Column("queue", Text),
    PrimaryKeyConstraint("run_id", "step", name="pk_pf_steps"),
    CheckConstraint(_in("status", STEP_STATUSES), name="ck_pf_steps_status"),
    _run_fk("pf_steps"),
)
# A dead worker's received messages are found from the worker (0004). Held rows only
# (0014): a full index also holds every finished row's NULL, and SQLite took it for the
# sweeper's ``received_by IS NULL`` and walked them all.
_held_index(pf_steps)
# A live run's unfinished steps (one or a few per run), without its committed ones nor
# the queued rows that paused and cancelled runs leave behind: the sweeper's second seek.
_ACTIVE = literal_in(pf_steps.c.status, ACTIVE_STEP_STATUSES)
Index(
    "ix_pf_steps_active",
    pf_steps.c.run_id,
    pf_steps.c.lease_expires_at,
    sqlite_where=_ACTIVE,
    postgresql_where=_ACTIVE,
)

pf_attempts = Table(
    "pf_attempts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("worker", Text),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float),
    # NULL while running; then e.g. committed, duplicate, failed, retry, lost, crashed.
    Column("outcome", Text),
    Column("error_msg", Text),
    # Broker task id of the delivery this attempt ran (0003).
    Column("task_id", Text),
    # 0013: the holder token of the claim that opened the row (``pf_steps.lease_owner``
    # while it held the step): two deliveries of one attempt in one process share
    # ``worker``, and each closes only its own row. NULL: opened before 0013.
    Column("holder", Text),
    _run_fk("pf_attempts"),
    Index("ix_pf_attempts_run_step", "run_id", "step", "attempt"),
)

pf_workers = Table(
    "pf_workers",
    metadata,
    # One row per worker process (0004): what ``pf_steps.lease_owner``/``received_by`` and
    # ``pf_attempts.worker`` name. Times are the database's clock, so hosts whose clocks
    # disagree still agree on who is alive (G3).
    Column("worker_id", Text, primary_key=True),
    Column("host", Text),
    Column("pid", Integer),
    Column("started_at", Float, nullable=False),
    # Last heartbeat; a process silent for ``dead_after`` is taken for dead (G3).
    Column("beat_at", Float, nullable=False),
    Index("ix_pf_workers_beat_at", "beat_at"),
)

pf_usage = Table(
    "pf_usage",
    metadata,
    # One row per ``Node.report_usage`` call (0008), written as it is made, so the calls of
    # a failed, retried or crashed attempt are kept: they were billed.
    Column("id", Integer, primary_key=True),
    Column("run_id", Text, nullable=False),
    Column("step", Integer),
    Column("attempt", Integer, nullable=False),
    Column("node_name", Text, nullable=False),
    # The map item's index (NULL: a plain node's exec).
    Column("item", Integer),
    Column("model", Text),
    Column("input_tokens", Integer, nullable=False),
    Column("output_tokens", Integer, nullable=False),
    # Given, or priced from the table where the call ran; NULL = unknown model, no cost.
    Column("cost_usd", Float),
    Column("ts", Text, nullable=False),
    _run_fk("pf_usage"),
    # Totals by run (``runs``, the budget guard) and by node (``show``) read this index.
    Index("ix_pf_usage_run_id", "run_id", "node_name"),
    sqlite_autoincrement=True,
)

pf_signals = Table(
    "pf_signals",
    metadata,
    # 0009: human in the loop. One row per (run, key): the value sent for ``key``
    # (``RunHandle.send``) and, while a step waits for it (``Node.wait_for``), which step.
    # Unique per key, so a second send for the same key is refused, not overwritten.
    Column("run_id", Text, nullable=False),
    Column("key", Text, nullable=False),
    # codec.encode text of the value; NULL = not sent yet (a step waits for it).
    Column("value_json", Text),
    Column("sent_at", Float),
    # The step parked on this key, NULL once woken (by the value or the timeout).
    Column("waiting_step", Integer),
    # Deadline of the wait (database clock), set by the first wait and kept by later
    # ones; past it ``wait_for`` raises TimeoutError. NULL = no timeout.
    Column("wait_until", Float),
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("run_id", "key", name="pk_pf_signals"),
    _run_fk("pf_signals"),
)

pf_items = Table(
    "pf_items",
    metadata,
    # 0010: one row per item of a map step, written with its siblings in the fan-out's
    # transaction; its outbox, lease and fencing work as ``pf_steps``' do (G1, G3).
    Column("run_id", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("idx", Integer, nullable=False),
    # codec text of the item: exec's argument, read back by its claim and by the join.
    Column("item_json", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="queued"),
    # Fencing token, bumped by every take-over and retry; lease_owner = holder token.
    Column("attempt", Integer, nullable=False, server_default="1"),
    # exec try this attempt runs (1 on the first; a retry carries the next).
    Column("try_number", Integer, nullable=False, server_default="1"),
    Column("lease_owner", Text),
    # NULL while queued: a deep queue of items is no expiry storm; set by the claim.
    Column("lease_expires_at", Float),
    # NULL = the message was not published yet (the outbox); the sweeper sends it.
    Column("sent_at", Float),
    # When the current attempt is due (a retry: after its backoff).
    Column("queued_at", Float, nullable=False),
    # The worker process holding the message unstarted (prefetch), as pf_steps has.
    Column("received_by", Text),
    # codec text of exec's result, written once by the item's commit.
    Column("result_json", Text),
    # JSON {"type", "message"} of the exception: collected (done) or fatal (failed).
    Column("error_json", Text),
    # Broker task id of the delivery that claimed the item (revoked by a terminate).
    Column("task_id", Text),
    # Attempts lost with their worker process: a poison item fails its run at the limit.
    Column("crashes", Integer, nullable=False, server_default="0"),
    PrimaryKeyConstraint("run_id", "step", "idx", name="pk_pf_items"),
    CheckConstraint(_in("status", ITEM_STATUSES), name="ck_pf_items_status"),
    _run_fk("pf_items"),
)
_held_index(pf_items)
_ITEM_ACTIVE = literal_in(pf_items.c.status, ACTIVE_ITEM_STATUSES)
Index(
    "ix_pf_items_active",
    pf_items.c.run_id,
    pf_items.c.lease_expires_at,
    sqlite_where=_ITEM_ACTIVE,
    postgresql_where=_ITEM_ACTIVE,
)

pf_joins = Table(
    "pf_joins",
    metadata,
    # 0010: one row per fanned-out map step. Its existence says the items are in the
    # ledger (prep never runs again); ``done`` is moved by each item's commit, and the
    # commit that makes it reach ``total`` sets ``ready_at`` and re-queues the step: the
    # join's outbox entry, written once (the counter has one such commit).
    Column("run_id", Text, nullable=False),
    Column("step", Integer, nullable=False),
    Column("total", Integer, nullable=False),
    Column("done", Integer, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("ready_at", Float),
    # The worker process publishing the step's item messages (fan-out, re-open), NULL
    # once all are out: its unsent items are not re-sent while it lives and publishes.
    Column("sending_by", Text),
    # 0011: what ``prep`` wrote to the Store at the fan-out (JSON: ``{"set": {key: codec
    # text}, "deleted": [key]}``), NULL if nothing: the join, another delivery that loads
    # the Store of step-1, applies it before ``post``, as a local run's post sees it.
    Column("prep_store", Text),
    PrimaryKeyConstraint("run_id", "step", name="pk_pf_joins"),
    _run_fk("pf_joins"),
)

V02_TABLES = ("pf_runs", "pf_checkpoints", "pf_events")
"""Tables a pocoflow 0.2 database has; their presence without a version table = 0.2.1."""
