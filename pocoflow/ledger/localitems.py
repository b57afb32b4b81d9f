"""Queries on ``pf_items`` for a LOCAL run's map steps: each finished item kept as it ends.

A MapNode step of a local run with a ledger (``Flow(db_path=...).run``) writes one
``pf_items`` row per item whose ``exec`` returned, written once, ``status = 'done'`` with
its ``result_json``; a resume of the step reads them back and runs only the other items.
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

from sqlalchemy import delete
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Insert

from pocoflow.ledger.common import NOW, insert_ignore
from pocoflow.ledger.pipeline import Op
from pocoflow.ledger.tables import pf_items

_i = pf_items.c


def keep_op(dialect: str, run_id: str, step: int, rows: Sequence[tuple[int, str, str]]) -> Op:
    """Finished items ``(idx, item codec text, result codec text)`` as ``done`` rows, in
    one executemany. ``ON CONFLICT DO NOTHING``: a row is written once; a second runner of
    the same step (two resumes racing) keeps the first one's result."""
    params = [
        {
            "run_id": run_id,
            "step": step,
            "idx": idx,
            "item_json": item,
            "result_json": result,
            "status": "done",
            "attempt": 1,
            "try_number": 1,
            "now": None,
        }
        for idx, item, result in rows
    ]
    return Op(_keep_stmt(dialect), params)


@cache
def _keep_stmt(dialect: str) -> Insert:
    """One statement object per dialect: the batch's compiled plan is cached by it."""
    return insert_ignore(dialect, pf_items, "run_id", "step", "idx").values(queued_at=NOW)


def drop(conn: Connection, run_id: str, step: int, idxs: Sequence[int]) -> int:
    """Forget the kept items ``idxs`` of a step (their item changed since: prep returned
    another list on the resume); returns how many rows went."""
    if not idxs:
        return 0
    stmt = delete(pf_items).where(_i.run_id == run_id, _i.step == step, _i.idx.in_(list(idxs)))
    return int(conn.execute(stmt).rowcount)
