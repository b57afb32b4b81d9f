"""Retention: delete finished runs older than a cutoff, with every row keyed by them.

A run is old when its last change (``updated_at``; 0.2 rows: ``completed_at``, else
``started_at``) is before the cutoff; only finished runs (completed, failed, cancelled)
are ever deleted, never a queued, running, paused or waiting one.

Built so a prune of a large ledger never holds up the steps running beside it:

* candidates are listed by a read (no lock on either backend), a batch at a time in
  ``run_id`` order (a keyset walk, one pass over the table in all);
* each batch is deleted in its own short write transaction, which first re-reads the
  batch's run rows (PostgreSQL: ``FOR UPDATE``, so a resume racing the prune either
  lands first and keeps its run, or waits and finds it gone) and deletes only those still
  finished and old; then the rows of every table keyed by ``run_id``, then the runs.

The tables are found in the schema (every table with a ``run_id`` column besides
``pf_runs``), so a table added later is pruned too without touching this module.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, select
from sqlalchemy.engine import Connection

from pocoflow.ledger.tables import metadata, pf_items, pf_runs

FINISHED = ("completed", "failed", "cancelled")
"""The run statuses a prune may delete."""

DEFAULT_BATCH = 50
"""Runs per delete transaction: a 20-step run has about 120 rows, so a batch holds the
SQLite write lock for tens of milliseconds at most (what a step beside it may wait), and
a prune of 100,000 runs is 2,000 transactions."""

MAX_ITEM_ROWS = 20_000
"""Map item rows (``pf_items``) per delete transaction: a run of a map step has one per
item, so 50 runs of 2,000 items held the SQLite write lock for most of a second; runs
that pass this between them are deleted in transactions of their own."""

_r = pf_runs.c
# Because 0.2 rows have no updated_at and some finished runs no completed_at.
_LAST_CHANGE = func.coalesce(_r.updated_at, _r.completed_at, _r.started_at)
_OLD_AND_FINISHED = (
    _r.status.in_(bindparam("statuses", expanding=True)),
    _LAST_CHANGE < bindparam("cutoff"),  # noqa: SIM300 (an expression, not a constant)
)
_CANDIDATES = (
    select(_r.run_id)
    .where(*_OLD_AND_FINISHED, _r.run_id > bindparam("after"))
    .order_by(_r.run_id)
    .limit(bindparam("limit"))
)
_COUNT = select(func.count()).select_from(pf_runs).where(*_OLD_AND_FINISHED)
_IDS: Any = bindparam("ids", expanding=True)
_RECHECK = select(_r.run_id).where(_r.run_id.in_(_IDS), *_OLD_AND_FINISHED)


def _keyed_tables() -> list[Table]:
    """Every table with rows of a run, children first (they point at ``pf_runs``)."""
    tables = [t for t in reversed(metadata.sorted_tables) if "run_id" in t.c and t is not pf_runs]
    return [*tables, pf_runs]


def cutoff_iso(older_than_s: float, now: float) -> str:
    """The cutoff as the 0.2 time columns store it (UTC ISO-8601 text, which sorts)."""
    return datetime.fromtimestamp(now - older_than_s, UTC).isoformat()


def check_statuses(statuses: tuple[str, ...]) -> tuple[str, ...]:
    """Reject a status that is not finished: a prune must never touch a live run."""
    wrong = [s for s in statuses if s not in FINISHED]
    if wrong or not statuses:
        raise ValueError(
            f"Prune deletes finished runs only; status {', '.join(wrong) or '(none)'} is "
            f"not one of {', '.join(FINISHED)}"
        )
    return tuple(dict.fromkeys(statuses))


def count(conn: Connection, statuses: tuple[str, ...], cutoff: str) -> int:
    return int(conn.execute(_COUNT, {"statuses": list(statuses), "cutoff": cutoff}).scalar() or 0)


def candidates(
    conn: Connection, statuses: tuple[str, ...], cutoff: str, after: str, limit: int
) -> list[str]:
    """The next ``limit`` old finished run ids after ``after`` (a read: takes no lock)."""
    params = {"statuses": list(statuses), "cutoff": cutoff, "after": after, "limit": limit}
    return list(conn.execute(_CANDIDATES, params).scalars())


_ITEM_ROWS = (
    select(pf_items.c.run_id, func.count())
    .where(pf_items.c.run_id.in_(_IDS))
    .group_by(pf_items.c.run_id)
)


def by_item_rows(conn: Connection, ids: list[str]) -> list[list[str]]:
    """``ids`` cut, in order, into groups whose map item rows stay within
    ``MAX_ITEM_ROWS`` together (a run with more is a group of its own): one delete
    transaction each."""
    if not ids:
        return []
    rows = {run_id: int(n) for run_id, n in conn.execute(_ITEM_ROWS, {"ids": ids})}
    groups: list[list[str]] = [[]]
    held = 0
    for run_id in ids:
        n = rows.get(run_id, 0)
        if groups[-1] and held + n > MAX_ITEM_ROWS:
            groups.append([])
            held = 0
        groups[-1].append(run_id)
        held += n
    return groups


def delete_runs(
    conn: Connection, dialect: str, ids: list[str], statuses: tuple[str, ...], cutoff: str
) -> int:
    """Inside one write transaction: delete those of ``ids`` still finished and old, with
    all their rows. Returns how many runs went."""
    recheck: Any = _RECHECK
    if dialect == "postgresql":
        recheck = recheck.with_for_update()
    params = {"ids": ids, "statuses": list(statuses), "cutoff": cutoff}
    keep = list(conn.execute(recheck, params).scalars())
    if not keep:
        return 0
    for table in _keyed_tables():
        conn.execute(delete(table).where(table.c.run_id.in_(_IDS)), {"ids": keep})
    return len(keep)


PRUNE_EVERY_S = 3600.0
"""How often a sweeper prunes once it has caught up: retention is counted in days."""
PRUNE_BATCHES_PER_PASS = 10
"""Batches one sweeper pass deletes at most, so the pass that also re-sends lost steps
(G3) is never held up for long; a backlog is worked off over the next passes."""


class Pruner:
    """Prunes from the sweeper thread now and then (``POCOFLOW_PRUNE_OLDER_THAN``).

    ``tick`` is called after every sweep: it prunes at most ``PRUNE_BATCHES_PER_PASS``
    batches, comes back at the next sweep while old runs remain, and otherwise waits
    ``every_s``. Several workers pruning at once is safe (each batch re-checks its runs
    under its write lock), only redundant."""

    def __init__(self, older_than_s: float, *, every_s: float = PRUNE_EVERY_S) -> None:
        self.older_than_s = older_than_s
        self.every_s = every_s
        self._next = 0.0

    def tick(self, db: Any, now: float) -> int:
        """Prune if due at monotonic time ``now``; returns the runs deleted."""
        if now < self._next:
            return 0
        deleted = db.prune_runs(self.older_than_s, max_batches=PRUNE_BATCHES_PER_PASS)
        more = deleted >= PRUNE_BATCHES_PER_PASS * DEFAULT_BATCH
        self._next = now if more else now + self.every_s
        return deleted
