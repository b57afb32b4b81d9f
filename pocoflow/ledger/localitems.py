"""Queries on ``pf_items`` for a LOCAL run's map steps: each finished item kept as it ends.

A MapNode step of a local run with a ledger (``Flow(db_path=...).run``) writes one
``pf_items`` row per item whose ``exec`` returned, ``status = 'done'`` with its
``result_json`` and, in ``item_json``, a digest of the item (``itemlog.digest``), not its
text; a resume of the step reads them back and runs only the other items.
No join row, no outbox, no lease: the rows are never ``queued`` or ``running``, so the
sweeper's queries (active items of live runs, ``itemrecovery``) never see them, and a
distributed step's rows are never written here (a submitted run does not resume
locally). A failed item (collected, or the one that failed its run) has no row: it runs
again on a resume with all its tries.

The distributed fan-out's queries on the same table are in ``items``; the read back is
theirs (``items.all_items``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import Integer, Text, bindparam, delete, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Insert

from pocoflow.ledger.common import NOW
from pocoflow.ledger.pipeline import Op
from pocoflow.ledger.tables import pf_items

_i = pf_items.c


def keep_op(dialect: str, run_id: str, step: int, rows: Sequence[tuple[int, str, str]]) -> Op:
    """Finished items ``(idx, item digest, result codec text)`` as ``done`` rows, in one
    statement. An upsert on ``(run_id, step, idx)`` that replaces only a row of another
    item (one a changed list left there): a row of the same item is kept, so of two
    resumes racing the first one's result stays.

    On PostgreSQL the rows go as three arrays unnested by one INSERT ... SELECT, because
    an executemany is one statement per row there: 500 rows took 12-14 ms this way
    against 19-22 ms (``bench.local_map``'s machine), and arrays have no parameter limit.
    SQLite's executemany is cheaper than building anything else."""
    if dialect == "postgresql":
        idxs, items, results = (list(column) for column in zip(*rows, strict=True))
        params = {"run_id": run_id, "step": step, "idxs": idxs, "items": items}
        return Op(_keep_unnested(), {**params, "results": results, "now": None})
    key = {"run_id": run_id, "step": step, "now": None}
    many = [{**key, "idx": i, "item_json": item, "result_json": result} for i, item, result in rows]
    return Op(_keep_rows(), many)


_DONE = {"status": "done", "attempt": 1, "try_number": 1}


def _replacing_another_item(stmt: Any) -> Any:
    """``ON CONFLICT (run_id, step, idx) DO UPDATE`` the item and its result, only where
    the row holds another item."""
    new = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=["run_id", "step", "idx"],
        set_={"item_json": new.item_json, "result_json": new.result_json, "error_json": None},
        where=_i.item_json != new.item_json,
    )


@cache
def _keep_rows() -> Insert:
    """One statement object: the batch's compiled plan is cached by it."""
    return _replacing_another_item(sqlite.insert(pf_items).values(queued_at=NOW, **_DONE))


@cache
def _keep_unnested() -> Insert:
    """``INSERT INTO pf_items ... SELECT ... FROM unnest(:idxs, :items, :results)``."""
    rows = (
        func.unnest(
            bindparam("idxs", type_=postgresql.ARRAY(Integer)),
            bindparam("items", type_=postgresql.ARRAY(Text)),
            bindparam("results", type_=postgresql.ARRAY(Text)),
        )
        .table_valued("idx", "item_json", "result_json", name="kept")
        .render_derived()
    )
    columns = ["run_id", "step", "idx", "item_json", "result_json", *_DONE, "queued_at"]
    values = select(
        bindparam("run_id", type_=Text),
        bindparam("step", type_=Integer),
        rows.c.idx,
        rows.c.item_json,
        rows.c.result_json,
        *(literal(value) for value in _DONE.values()),
        NOW,
    )
    return _replacing_another_item(postgresql.insert(pf_items).from_select(columns, values))


def drop_from(conn: Connection, run_id: str, step: int, first_idx: int) -> int:
    """Forget the kept items of a step from index ``first_idx`` on (prep returned a
    shorter list on the resume); returns how many rows went. A range, not a list of
    indexes: any number of rows in one statement of three parameters."""
    stmt = delete(pf_items).where(_i.run_id == run_id, _i.step == step, _i.idx >= first_idx)
    return int(conn.execute(stmt).rowcount)
