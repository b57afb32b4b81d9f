"""Queries on ``pf_checkpoints`` and ``pf_values``, and the step commit that writes them.

A checkpoint row holds a manifest ``{key: step}``: for every key of the Store after that
step, the step whose ``pf_values`` row holds its value. A value is written once, at the
step that changed it, so an unchanged key costs nothing per step; loading any step still
returns the whole Store, in one query joining the manifest's members with their rows.
0.2 rows have no manifest and keep their full Store JSON in ``store_json``; they load too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, insert, select, true
from sqlalchemy.engine import Connection

from pocoflow.commit import StepCommit
from pocoflow.ledger import events, pipeline, runs, steps
from pocoflow.ledger.common import insert_ignore, iso_now, json_object_items
from pocoflow.ledger.errors import LedgerError
from pocoflow.ledger.tables import pf_checkpoints, pf_values

_c = pf_checkpoints.c
_v = pf_values.c
_ROW_COLUMNS = [col for col in pf_checkpoints.c if col.name != "manifest"]

_INSERT_VALUES = insert(pf_values)
_INSERT_CHECKPOINT = insert(pf_checkpoints)
_DELETE_VALUES = delete(pf_values).where(
    _v.run_id == bindparam("run_id"), _v.step == bindparam("step")
)
_DELETE_CHECKPOINT = delete(pf_checkpoints).where(
    _c.run_id == bindparam("run_id"), _c.step == bindparam("step")
)
_LIST = (
    select(*_ROW_COLUMNS).where(_c.run_id == bindparam("run_id"), _c.step >= 0).order_by(_c.step)
)
_GET = select(*_ROW_COLUMNS).where(_c.run_id == bindparam("run_id"), _c.step == bindparam("step"))
_LATEST = (
    select(_c.step, _c.node_name, _c.next_node, _c.action)
    .where(_c.run_id == bindparam("run_id"))
    .order_by(_c.step.desc())
    .limit(1)
)
_COUNT = select(func.count()).where(_c.run_id == bindparam("run_id"), _c.step >= 0)
_COUNT_VALUES = select(func.count()).where(_v.run_id == bindparam("run_id"))
_COUNT_KEY_VALUES = _COUNT_VALUES.where(_v["key"] == bindparam("key"))


@cache
def _load_stmt(dialect: str) -> Select[Any]:
    """Checkpoint row x manifest members, each with its value text, in one indexed query.

    One row per manifest key (document order) with its value text; a 0.2 row or an empty
    manifest gives one row with NULL key; no row = no such checkpoint.
    """
    items, key, step, order = json_object_items(dialect, _c.manifest)
    # A correlated scalar subquery, not a join: both databases then seek the primary key
    # once per member (a join lets PostgreSQL hash-scan every value row of the run).
    value = (
        select(_v.value_json)
        .where(_v.run_id == _c.run_id, _v.step == step, _v["key"] == key)
        .scalar_subquery()
    )
    return (
        select(_c.manifest.is_(None).label("legacy"), _c.store_json, key, step, value)
        .select_from(pf_checkpoints)
        .outerjoin(items, true())
        .where(_c.run_id == bindparam("run_id"), _c.step == bindparam("step"))
        .order_by(order)
    )


_json = json.JSONEncoder(separators=(",", ":")).encode
"""A manifest as compact JSON text; one encoder for every step (``json.dumps`` with
options builds a new one per call, which costs as much as the encoding)."""


def _value_rows(run_id: str, step: int, texts: Mapping[str, str]) -> list[dict[str, Any]]:
    return [
        {"run_id": run_id, "step": step, "key": key, "value_json": text}
        for key, text in texts.items()
    ]


def write_full(
    conn: Connection,
    run_id: str,
    step: int,
    node_name: str,
    texts: Mapping[str, str],
    *,
    replace: bool = False,
) -> None:
    """A checkpoint holding every value at ``step`` (0.2's ``save_checkpoint``).
    ``replace`` overwrites an existing checkpoint, as 0.2's INSERT OR REPLACE did."""
    if replace:
        params = {"run_id": run_id, "step": step}
        conn.execute(_DELETE_VALUES, params)
        conn.execute(_DELETE_CHECKPOINT, params)
    pipeline.run(conn, full_ops(run_id, step, node_name, texts))


def full_ops(
    run_id: str,
    step: int,
    node_name: str,
    texts: Mapping[str, str],
    *,
    next_node: str | None = None,
) -> list[pipeline.Op]:
    """The statements of a checkpoint holding every value at ``step``: ``write_full``'s,
    and the initial Store's in the batch that creates a run."""
    checkpoint = {
        "run_id": run_id,
        "step": step,
        "node_name": node_name,
        "store_json": None,
        "created_at": iso_now(),
        "next_node": next_node,
        "action": None,
        "manifest": _json(dict.fromkeys(texts, step)),
    }
    return [
        pipeline.Op(_INSERT_VALUES, _value_rows(run_id, step, texts)),
        pipeline.Op(_INSERT_CHECKPOINT, checkpoint),
    ]


def check_commit(c: StepCommit) -> None:
    """A changed key must point at this step in the manifest, or its value would be lost."""
    manifest = c.manifest
    for key in c.changed:
        if manifest.get(key) != c.step:
            raise ValueError(
                f"Run {c.run_id!r} step {c.step}: changed key {key!r} must map to step "
                f"{c.step} in the manifest, not {manifest.get(key)!r}"
            )


def commit(
    conn: Connection,
    dialect: str,
    c: StepCommit,
    now: float | None = None,
    *,
    read_control: bool = False,
) -> tuple[bool, str | None]:
    """Write one step (G1): fenced ``pf_steps`` update, checkpoint, values, events, run
    fields and the successor's outbox row. ``(False, None)`` = another attempt owns or
    committed the step; the caller then rolls the transaction back, so nothing of this
    attempt lands. ``read_control``: the second item is the run's cancel/pause request
    as of this transaction (what an in-process run checks before its next node, G4),
    else None.

    No SELECT but the control request's: the fence is an UPDATE's row count and the
    checkpoint an ``INSERT ... ON CONFLICT DO NOTHING``'s row count. On PostgreSQL the
    statements and the COMMIT go out in one round trip (``pipeline``; a missed guard
    aborts the transaction there), the control request as the run UPDATE's RETURNING.
    """
    ops: list[pipeline.Op] = []
    if c.attempt is not None:
        ops.append(steps.fence_op(c.run_id, c.step, c.attempt, c.lease_holder))
    ops.append(
        pipeline.Op(
            insert_ignore(dialect, pf_checkpoints, "run_id", "step"),
            {
                "run_id": c.run_id,
                "step": c.step,
                "node_name": c.node_name,
                "store_json": None,
                "created_at": iso_now(),
                "next_node": c.next_node,
                "action": c.action,
                "manifest": _json(c.manifest),
            },
            must_hit_one=True,
        )
    )
    ops.append(pipeline.Op(_INSERT_VALUES, _value_rows(c.run_id, c.step, c.changed)))
    ops.append(events.insert_op(events.rows_of(c.run_id, c.events), dialect))
    run_at = len(ops)
    ops.extend(
        runs.step_update_ops(
            c.run_id,
            c.run_fields,
            read_control=read_control,
            # Not on SQLite, where UPDATE ... RETURNING costs more than a second statement.
            returning=dialect == "postgresql",
        )
    )
    if c.next_step is not None:
        ops.append(steps.successor_op(dialect, c.run_id, c.next_step, now))
    if c.attempt is not None and c.worker is not None:
        ops.append(
            steps.close_attempt_op(
                c.run_id, c.step, c.attempt, c.worker, c.lease_holder, "committed", now
            )
        )
    # pk_pf_values can only fire when this step's checkpoint exists already (PostgreSQL
    # sends the whole batch before looking at the checkpoint insert's row count).
    conflicts = ("pk_pf_values",)
    # On PostgreSQL the batch carries its COMMIT (one round trip): every guard aborts the
    # transaction when it misses, and so does a conflict, so nothing of a missed commit
    # lands.
    ops = pipeline.aborting(ops)
    ok, rows = pipeline.run_reading(conn, ops, conflicts, commit=True)
    return ok, runs.control_of(rows[run_at]) if ok and read_control else None


def list_rows(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    """Checkpoints of nodes that ran (step >= 0), oldest first, without the manifest."""
    return [dict(r) for r in conn.execute(_LIST, {"run_id": run_id}).mappings()]


def get_row(conn: Connection, run_id: str, step: int) -> dict[str, Any] | None:
    row = conn.execute(_GET, {"run_id": run_id, "step": step}).mappings().first()
    return dict(row) if row is not None else None


def latest(conn: Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute(_LATEST, {"run_id": run_id}).mappings().first()
    return dict(row) if row is not None else None


def count_committed(conn: Connection, run_id: str) -> int:
    return int(conn.execute(_COUNT, {"run_id": run_id}).scalar() or 0)


def count_values(conn: Connection, run_id: str, key: str | None) -> int:
    if key is None:
        return int(conn.execute(_COUNT_VALUES, {"run_id": run_id}).scalar() or 0)
    return int(conn.execute(_COUNT_KEY_VALUES, {"run_id": run_id, "key": key}).scalar() or 0)


def load_texts(
    conn: Connection, dialect: str, run_id: str, step: int
) -> tuple[dict[str, int], dict[str, str], dict[str, Any] | None]:
    """(manifest, encoded text per key, legacy data) of one checkpoint, in one query.

    A 0.2 row (no manifest) returns an empty manifest and texts plus its decoded
    ``store_json``: its values were never written to ``pf_values``, so a tracker seeded
    from it must treat every key as new. Raises ``KeyError`` naming run and step.
    """
    rows = conn.execute(_load_stmt(dialect), {"run_id": run_id, "step": step}).all()
    return texts_of(rows, run_id, step)


def load_op(dialect: str, run_id: str, step: int) -> pipeline.Op:
    """``load_texts``'s query as part of a batch; ``texts_of`` reads its rows."""
    return pipeline.Op(_load_stmt(dialect), {"run_id": run_id, "step": step})


def texts_of(
    rows: Sequence[Sequence[Any]], run_id: str, step: int
) -> tuple[dict[str, int], dict[str, str], dict[str, Any] | None]:
    """``load_texts`` from the rows of its query (``KeyError`` when there are none)."""
    if not rows:
        raise KeyError(f"No checkpoint for run_id={run_id!r} step={step}")
    legacy, store_json = rows[0][0], rows[0][1]
    if legacy:
        return {}, {}, json.loads(store_json or "{}")
    manifest: dict[str, int] = {}
    texts: dict[str, str] = {}
    missing = []
    for _legacy, _store_json, key, key_step, text in rows:
        if key is None:
            continue
        manifest[key] = key_step
        if text is None:
            missing.append(f"{key!r}@{key_step}")
        else:
            texts[key] = text
    if missing:
        raise LedgerError(
            f"Checkpoint run_id={run_id!r} step={step} names values the ledger does not "
            f"hold: {', '.join(missing[:10])}"
        )
    return manifest, texts, None
