"""Queries on ``pf_runs``: one row per run, its status, counters, lineage and control flag."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.engine import Connection

from pocoflow.ledger.common import NOW, insert_ignore, iso_now
from pocoflow.ledger.pipeline import Op
from pocoflow.ledger.tables import CONTROLS, RUN_STATUSES, pf_runs, pf_steps

UPDATABLE = frozenset(
    {
        "flow_name",
        "status",
        "completed_at",
        "total_steps",
        "current_node",
        "error_msg",
        "fingerprint",
        "max_steps",
        "store_name",
        "control",
        "parent_run_id",
        "forked_from_step",
        "queue",
        "graph_shape",
        "max_tokens",
        "max_cost_usd",
    }
)
"""Fields ``update_run`` accepts (0.2's five plus ours); ``updated_at`` is always set."""

# SET columns come from the parameter names, so one statement (and one compiled form per
# set of fields, cached by SQLAlchemy) serves every update.
_UPDATE = update(pf_runs).where(pf_runs.c.run_id == bindparam("b_run_id"))
_GET = select(pf_runs).where(pf_runs.c.run_id == bindparam("run_id"))
_LIST = select(pf_runs).order_by(pf_runs.c.started_at.desc()).limit(bindparam("limit"))
_r = pf_runs.c
_s = pf_steps.c
# A plain OR of equalities, not IN: expanding parameters do not survive the precompiled
# batches of pipeline.run.
_LIVE = or_(_r.status == "queued", _r.status == "running")
# The run fields that end a run apply while it is live or paused: a cancel that landed
# while the last step ran stands (G4), but a pause only holds the *next* node, so the
# commit of a step that was already running still ends the run.
_UPDATE_IF_ENDABLE = _UPDATE.where(or_(_LIVE, _r.status == "paused"))
# Parking needs the delivery that would run the step: a duplicate, a stale attempt or a
# step another worker holds under a live lease (it will commit, and its successor's guard
# parks) must not park, or the holder's last commit would find the run not live.
_STEP_RUNNABLE_BY = (
    select(_s.step)
    .where(
        _s.run_id == bindparam("b_run_id"),
        _s.step == bindparam("b_step"),
        _s.attempt == bindparam("b_attempt"),
        or_(
            _s.status == "queued",
            and_(
                _s.status == "running",
                or_(_s.lease_owner == bindparam("holder"), _s.lease_expires_at < NOW),
            ),
        ),
    )
    .exists()
)
_PARK = _UPDATE.where(_LIVE, _r.control == "pause", _STEP_RUNNABLE_BY)
# The run columns a worker's guard and load need, not the whole row: graph_shape alone
# is over a kilobyte for a 20-node flow and only a version refusal reads it (G4, G6).
GUARD_COLUMNS = (
    _r.run_id,
    _r.flow_name,
    _r.status,
    _r.control,
    _r.max_steps,
    _r.fingerprint,
    _r.queue,
    _r.store_name,
    _r.max_tokens,
    _r.max_cost_usd,
)
_GUARD = select(*GUARD_COLUMNS).where(_r.run_id == bindparam("b_run_id"))
_ENDING_FIELDS = frozenset({"status", "completed_at", "error_msg"})
_CONTROL = select(pf_runs.c.control).where(pf_runs.c.run_id == bindparam("run_id"))
_CONTROL_OF = select(pf_runs.c.control).where(pf_runs.c.run_id == bindparam("b_run_id"))
_UPDATE_READING_CONTROL = _UPDATE.returning(pf_runs.c.control)
_EXISTS = select(func.count()).select_from(pf_runs).where(pf_runs.c.run_id == bindparam("run_id"))


def check_fields(fields: Mapping[str, Any]) -> None:
    """Reject what the CHECK constraints would, but with a message naming field and value."""
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValueError(
            f"Unknown run field(s) {', '.join(sorted(unknown))}; "
            f"updatable: {', '.join(sorted(UPDATABLE))}"
        )
    status = fields.get("status")
    if status is not None and status not in RUN_STATUSES:
        raise ValueError(f"Unknown run status {status!r}; one of {', '.join(RUN_STATUSES)}")
    control = fields.get("control")
    if control is not None and control not in CONTROLS:
        raise ValueError(f"Unknown run control {control!r}; one of {', '.join(CONTROLS)} or None")


def insert_op(dialect: str, row: dict[str, Any]) -> Op:
    """Insert the run row, a guard that misses if the run id exists already (0.2's
    INSERT OR IGNORE): the first op of the batch that creates a run."""
    row.setdefault("started_at", iso_now())
    row.setdefault("updated_at", row["started_at"])
    return Op(insert_ignore(dialect, pf_runs, "run_id"), row, must_hit_one=True)


def update_op(run_id: str, fields: Mapping[str, Any]) -> Op:
    """Set ``fields`` (already checked) and ``updated_at``."""
    params = dict(fields)
    params["updated_at"] = iso_now()
    params["b_run_id"] = run_id
    return Op(_UPDATE, params)


def step_update_ops(
    run_id: str,
    fields: Mapping[str, Any],
    *,
    read_control: bool = False,
    returning: bool = False,
) -> list[Op]:
    """The run fields of a step commit. A status change (the run ends) applies only while
    the run is live or paused, so a cancel that landed while the last step ran stands
    (G4) while a pause parked meanwhile cannot leave a finished run unfinished.

    Progress alone (``total_steps``, ``current_node``) leaves ``updated_at`` as it is:
    that column is the stamp of the run's last transition, which a compare-and-set whose
    COMMIT outcome was lost looks for on its retry (``WorkflowDB.update_run_if``); a step
    committing meanwhile (a cancel does not stop a running step) must not wipe it.

    ``read_control``: the first op also returns the run's ``control`` (one row, or none
    when the run is gone; see ``control_of``), read in the commit's transaction: by the
    progress UPDATE's RETURNING when ``returning`` (a statement fewer per step), else
    by a SELECT in the same batch."""
    ending = {k: v for k, v in fields.items() if k in _ENDING_FIELDS}
    progress = {k: v for k, v in fields.items() if k not in _ENDING_FIELDS}
    ops = []
    if read_control:
        params = {"b_run_id": run_id}
        if progress and returning:
            ops.append(Op(_UPDATE_READING_CONTROL, {**progress, **params}, returns_rows=True))
            progress = {}
        else:
            ops.append(Op(_CONTROL_OF, params))
    if progress:
        ops.append(Op(_UPDATE, {**progress, "b_run_id": run_id}))
    if ending:
        params = {**ending, "updated_at": iso_now(), "b_run_id": run_id}
        ops.append(Op(_UPDATE_IF_ENDABLE, params))
    return ops


def control_of(rows: list[tuple[Any, ...]]) -> str | None:
    """The ``control`` read by the first of ``step_update_ops(..., read_control=True)``."""
    return rows[0][0] if rows else None


def update_fields(conn: Connection, run_id: str, fields: Mapping[str, Any]) -> bool:
    """Set ``fields`` (already checked) and ``updated_at``; False if no such run."""
    op = update_op(run_id, fields)
    return conn.execute(op.stmt, op.params).rowcount == 1


def update_fields_if(
    conn: Connection,
    run_id: str,
    fields: Mapping[str, Any],
    *,
    status_in: tuple[str, ...] | None = None,
    control_in: tuple[str, ...] | None = None,
    stamp: str | None = None,
) -> bool:
    """``update_fields`` only while the run's status / control is one of those given: a
    compare-and-set, so racing processes (a worker parking a run, a user resuming it)
    cannot both win. False if the row did not match. ``stamp`` is the ``updated_at`` to
    write (default now): a caller that may have to recognise its own write passes one."""
    stmt = _UPDATE
    if status_in is not None:
        stmt = stmt.where(pf_runs.c.status.in_(status_in))
    if control_in is not None:
        stmt = stmt.where(pf_runs.c.control.in_(control_in))
    params = dict(fields)
    params["updated_at"] = stamp or iso_now()
    params["b_run_id"] = run_id
    return conn.execute(stmt, params).rowcount == 1


def shows(conn: Connection, run_id: str, fields: Mapping[str, Any]) -> bool:
    """The run row holds every one of ``fields``. How a write whose COMMIT outcome was lost
    recognises itself on the retry (``txn.run``'s ``confirm``): its fields include a time
    stamp it generated (``updated_at``, ``started_at``, to the microsecond), which serves
    as its write token, since no other writer wrote that value."""
    row = get(conn, run_id)
    return row is not None and all(row.get(k) == v for k, v in fields.items())


def park(
    conn: Connection,
    run_id: str,
    step: int,
    attempt: int,
    holder: str,
    now: float | None,
    stamp: str,
) -> bool:
    """Mark the run paused iff it is live with a pause request and ``attempt`` of step
    ``step`` is this holder's to run (queued, or running under its own or an expired
    lease): one compare-and-set over both rows, so no claim or commit slips in between.
    ``stamp`` is the ``updated_at`` written (the caller's write token)."""
    params = {
        "status": "paused",
        "updated_at": stamp,
        "b_run_id": run_id,
        "b_step": step,
        "b_attempt": attempt,
        "holder": holder,
        "now": now,
    }
    return conn.execute(_PARK, params).rowcount == 1


def get(conn: Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute(_GET, {"run_id": run_id}).mappings().first()
    return dict(row) if row is not None else None


def guard_op(run_id: str) -> Op:
    """The read of the run's ``GUARD_COLUMNS``, as part of a batch (``guard_row``)."""
    return Op(_GUARD, {"b_run_id": run_id})


def guard_row(rows: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    """``guard_op``'s rows -> the run's guard columns by name, or None (no such run)."""
    return dict(zip((c.key for c in GUARD_COLUMNS), rows[0], strict=True)) if rows else None


def control(conn: Connection, run_id: str) -> str | None:
    return conn.execute(_CONTROL, {"run_id": run_id}).scalar()


def exists(conn: Connection, run_id: str) -> bool:
    return bool(conn.execute(_EXISTS, {"run_id": run_id}).scalar())


def list_recent(
    conn: Connection,
    limit: int,
    *,
    statuses: tuple[str, ...] = (),
    flow_name: str | None = None,
    since: str | None = None,
) -> list[dict[str, Any]]:
    """The newest ``limit`` runs (by start), optionally only those with one of
    ``statuses``, of ``flow_name``, started at or after ``since`` (ISO-8601 UTC): one
    indexed read, newest first (``ix_pf_runs_started_at``)."""
    if not (statuses or flow_name or since):
        return [dict(r) for r in conn.execute(_LIST, {"limit": limit}).mappings()]
    stmt = select(pf_runs)
    if statuses:
        stmt = stmt.where(_r.status.in_(statuses))
    if flow_name:
        stmt = stmt.where(_r.flow_name == flow_name)
    if since:
        stmt = stmt.where(_r.started_at >= since)
    stmt = stmt.order_by(_r.started_at.desc()).limit(limit)
    return [dict(r) for r in conn.execute(stmt).mappings()]
