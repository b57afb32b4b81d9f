"""The monitor's reads: small SQLAlchemy Core queries on the ledger, each bounded.

Every query here returns one page (``LIMIT``/``OFFSET`` on an indexed order) or one
aggregate, never a whole table, so the monitor's cost follows what is on the screen, not
how many runs the ledger keeps (issue 8: 100,000 runs, 1,000,000 events). They run on
SQLite and PostgreSQL alike through ``WorkflowDB``'s read transactions; where
``WorkflowDB`` already has the call (``get_run``, ``load_store``, ``get_usage``...) the
monitor uses it instead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, and_, cast, func, literal, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from pocoflow.db import WorkflowDB
from pocoflow.ledger.migrate import schema_version
from pocoflow.ledger.tables import (
    LIVE_RUN_STATUSES,
    RUN_STATUSES,
    literal_in,
    pf_attempts,
    pf_checkpoints,
    pf_events,
    pf_items,
    pf_runs,
    pf_steps,
    pf_usage,
    pf_workers,
)

__all__ = [
    "FAILURE_EVENTS",
    "MonitorError",
    "Page",
    "RunFilter",
    "attempts_page",
    "checkpoint_range",
    "diff_stores",
    "events_after",
    "events_page",
    "flow_names",
    "item_counts",
    "open_ledger",
    "runs_page",
    "stuck_runs",
    "usage_by_node_model",
    "workers_seen",
]

FAILURE_EVENTS = ("node_error", "node_retry", "commit_refused", "message_malformed")
"""Events "failures only" keeps, besides every event that carries an error message."""


class MonitorError(Exception):
    """Something the page should say in one sentence instead of a traceback."""


@dataclass(frozen=True)
class Page:
    """One page of rows and the total count of rows matching the same filter."""

    rows: list[dict[str, Any]]
    total: int
    offset: int
    limit: int


# ── opening ──────────────────────────────────────────────────────────────────


def open_ledger(db: str | os.PathLike[str] | WorkflowDB) -> WorkflowDB:
    """A ``WorkflowDB`` on an existing PocoFlow ledger, or ``MonitorError`` saying why not.

    Unlike ``WorkflowDB(path)``, which creates a ledger where there is none, a monitor
    must not leave an empty database behind a typo, nor add tables to somebody else's
    database: a missing SQLite file and a database without the ledger's tables are refused
    before ``WorkflowDB`` is opened.
    """
    if isinstance(db, WorkflowDB):
        return db
    location = os.fspath(db)
    if not location:
        raise MonitorError("No ledger given: pass a SQLite path or a database URL")
    from pocoflow.ledger.engine import mask_url, resolve_url, shared_engine, sqlite_file

    path = sqlite_file(location)
    if path is not None and not path.is_file():
        raise MonitorError(
            f"No ledger at {path}: the file does not exist (run a flow with "
            "db_path=..., or pass the right --db)"
        )
    label = mask_url(location)
    try:
        ledger = shared_engine(resolve_url(location))
        with ledger.reader.connect() as conn:
            version, has_tables = schema_version(conn)
    except (ValueError, SQLAlchemyError) as exc:
        reason = exc.orig if isinstance(exc, DBAPIError) else exc
        raise MonitorError(f"Cannot read {label} as a database: {reason}") from None
    if version is None and not has_tables:
        raise MonitorError(f"{label} is not a PocoFlow ledger: it has no pf_runs table")
    try:
        return WorkflowDB(location)
    except Exception as exc:  # a newer schema, a migration refused: say it on the page
        raise MonitorError(f"Cannot open the ledger {label}: {exc}") from None


# ── runs ─────────────────────────────────────────────────────────────────────

_r = pf_runs.c
RUN_COLUMNS = (
    _r.run_id,
    _r.flow_name,
    _r.status,
    _r.started_at,
    _r.completed_at,
    _r.total_steps,
    _r.current_node,
    _r.error_msg,
)


@dataclass(frozen=True)
class RunFilter:
    """What the runs page shows; kept in the URL query (``to_params``/``from_params``)."""

    statuses: tuple[str, ...] = ()
    flows: tuple[str, ...] = ()
    since: str | None = None  # ISO date or time, inclusive
    until: str | None = None  # ISO date or time, exclusive
    text: str = ""  # in the run id or the error message

    def to_params(self) -> dict[str, str]:
        out = {
            "status": ",".join(self.statuses),
            "flow": ",".join(self.flows),
            "since": self.since or "",
            "until": self.until or "",
            "q": self.text,
        }
        return {k: v for k, v in out.items() if v}

    @classmethod
    def from_params(cls, params: Any) -> RunFilter:
        """From a query-param mapping; unknown statuses and bad dates are dropped, not
        raised, because a hand-edited URL must still show a page."""

        def get(name: str) -> str:
            value = params.get(name) if hasattr(params, "get") else None
            return str(value or "").strip()

        statuses = tuple(s for s in get("status").split(",") if s in RUN_STATUSES)
        flows = tuple(f for f in get("flow").split(",") if f)
        return cls(
            statuses, flows, _iso_or_none(get("since")), _iso_or_none(get("until")), get("q")
        )

    def where(self) -> list[Any]:
        terms: list[Any] = []
        if self.statuses:
            terms.append(_r.status.in_(self.statuses))
        if self.flows:
            terms.append(_r.flow_name.in_(self.flows))
        if self.since:
            terms.append(_r.started_at >= self.since)
        if self.until:
            terms.append(_r.started_at < self.until)
        if self.text:
            terms.append(
                or_(
                    _r.run_id.contains(self.text, autoescape=True),
                    _r.error_msg.contains(self.text, autoescape=True),
                )
            )
        return terms


def _iso_or_none(text: str) -> str | None:
    """A date or datetime as the ledger's ISO text (UTC), None if it does not parse."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def runs_page(db: WorkflowDB, filt: RunFilter, *, limit: int = 50, offset: int = 0) -> Page:
    """Runs matching ``filt``, newest first (``ix_pf_runs_started_at``), and their count."""
    terms = filt.where()
    rows_q = (
        select(*RUN_COLUMNS)
        .where(*terms)
        .order_by(_r.started_at.desc(), _r.run_id.desc())
        .limit(limit)
        .offset(offset)
    )
    count_q = select(func.count()).select_from(pf_runs).where(*terms)

    def body(conn: Connection) -> Page:
        rows = [dict(r) for r in conn.execute(rows_q).mappings()]
        total = int(conn.execute(count_q).scalar() or 0)
        return Page(rows, total, offset, limit)

    return db._read(body)


def flow_names(db: WorkflowDB, limit: int = 200) -> list[str]:
    """Distinct flow names (for the filter), at most ``limit``."""
    q = select(_r.flow_name).distinct().order_by(_r.flow_name).limit(limit)
    return db._read(lambda conn: [r[0] for r in conn.execute(q) if r[0]])


def stuck_runs(
    db: WorkflowDB, threshold_s: float, *, now: datetime | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Running runs whose last commit (or start, before any) is older than ``threshold_s``.

    Starts from the live runs' partial index, so its cost follows the runs in flight; each
    run's newest checkpoint is one seek on ``uq_pf_checkpoints_run_step``.
    """
    c = pf_checkpoints.c
    last = (
        select(c.created_at)
        .where(c.run_id == _r.run_id)
        .order_by(c.step.desc())
        .limit(1)
        .scalar_subquery()
    )
    q = (
        select(_r.run_id, _r.flow_name, _r.started_at, _r.current_node, last.label("last_commit"))
        .where(literal_in(_r.status, LIVE_RUN_STATUSES), _r.status == "running")
        .limit(limit)
    )
    cutoff = (now or datetime.now(UTC)).timestamp() - threshold_s
    out = []
    for row in db._read(lambda conn: [dict(r) for r in conn.execute(q).mappings()]):
        seen = row["last_commit"] or row["started_at"]
        if _epoch(seen) < cutoff:
            row["idle_s"] = round(cutoff + threshold_s - _epoch(seen), 1)
            out.append(row)
    return sorted(out, key=lambda r: -r["idle_s"])


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


# ── one run ──────────────────────────────────────────────────────────────────

_e = pf_events.c
EVENT_COLUMNS = (
    _e.id,
    _e.step,
    _e.node_name,
    _e.event,
    _e.action,
    _e.elapsed_ms,
    _e.attempt,
    _e.error_msg,
    _e.ts,
)


def _failures() -> Any:
    return or_(_e.error_msg.is_not(None), _e.event.in_(FAILURE_EVENTS))


def events_page(
    db: WorkflowDB, run_id: str, *, failures_only: bool = False, limit: int = 100, offset: int = 0
) -> Page:
    """A run's events in order (``ix_pf_events_run_id``), optionally only failures."""
    terms = [_e.run_id == run_id]
    if failures_only:
        terms.append(_failures())
    rows_q = select(*EVENT_COLUMNS).where(*terms).order_by(_e.id).limit(limit).offset(offset)
    count_q = select(func.count()).select_from(pf_events).where(*terms)

    def body(conn: Connection) -> Page:
        rows = [dict(r) for r in conn.execute(rows_q).mappings()]
        return Page(rows, int(conn.execute(count_q).scalar() or 0), offset, limit)

    return db._read(body, run_id)


def events_after(
    db: WorkflowDB, run_id: str, after_id: int, limit: int = 200
) -> list[dict[str, Any]]:
    """Events newer than ``after_id``: what a live refresh reads, only what is new."""
    q = (
        select(*EVENT_COLUMNS)
        .where(_e.run_id == run_id, _e.id > after_id)
        .order_by(_e.id)
        .limit(limit)
    )
    return db._read(lambda conn: [dict(r) for r in conn.execute(q).mappings()], run_id)


def last_event_id(db: WorkflowDB, run_id: str) -> int:
    q = select(func.max(_e.id)).where(_e.run_id == run_id)
    return int(db._read(lambda conn: conn.execute(q).scalar(), run_id) or 0)


def attempts_page(db: WorkflowDB, run_id: str, *, limit: int = 100, offset: int = 0) -> Page:
    """Attempts of a run's steps (worker, the claim's holder token, outcome, error), by
    step and attempt: two deliveries of one attempt in one process differ by holder."""
    from pocoflow.ledger.steps import RESUMED_OUTCOME

    a = pf_attempts.c
    cols = (a.step, a.attempt, a.worker, a.holder, a.outcome, a.started_at, a.ended_at, a.error_msg)
    # A resume's marker row (it starts crash counts afresh) ran nothing: not an attempt.
    tried = and_(a.run_id == run_id, or_(a.outcome.is_(None), a.outcome != RESUMED_OUTCOME))
    rows_q = (
        select(*cols).where(tried).order_by(a.step, a.attempt, a.id).limit(limit).offset(offset)
    )
    count_q = select(func.count()).select_from(pf_attempts).where(tried)

    def body(conn: Connection) -> Page:
        rows = []
        for r in conn.execute(rows_q).mappings():
            row = dict(r)
            start, end = row.pop("started_at"), row.pop("ended_at")
            row["started"], row["ended"] = _from_epoch(start), _from_epoch(end)
            row["ms"] = None if end is None or start is None else round((end - start) * 1000, 1)
            rows.append(row)
        return Page(rows, int(conn.execute(count_q).scalar() or 0), offset, limit)

    return db._read(body, run_id)


def _from_epoch(value: float | None) -> str | None:
    return None if value is None else datetime.fromtimestamp(value, UTC).isoformat()


def checkpoint_range(db: WorkflowDB, run_id: str) -> tuple[int, int, int] | None:
    """(first step, last step, count) of a run's checkpoints (-1 = the initial Store)."""
    c = pf_checkpoints.c
    q = select(func.min(c.step), func.max(c.step), func.count()).where(c.run_id == run_id)
    low, high, count = db._read(lambda conn: conn.execute(q).one(), run_id)
    return None if not count else (int(low), int(high), int(count))


def checkpoint_node(db: WorkflowDB, run_id: str, step: int) -> str | None:
    """The node that wrote the checkpoint of ``step`` (None: no such checkpoint)."""
    c = pf_checkpoints.c
    q = select(c.node_name).where(c.run_id == run_id, c.step == step)
    return db._read(lambda conn: conn.execute(q).scalar(), run_id)


@dataclass(frozen=True)
class DiffRow:
    key: str
    change: str  # added, removed, changed
    before: Any = None
    after: Any = None


def diff_stores(before: dict[str, Any], after: dict[str, Any]) -> list[DiffRow]:
    """Key by key, what differs between two Store snapshots (unchanged keys left out)."""
    out: list[DiffRow] = []
    for key in sorted(set(before) | set(after)):
        if key not in before:
            out.append(DiffRow(key, "added", None, after[key]))
        elif key not in after:
            out.append(DiffRow(key, "removed", before[key], None))
        elif _canon(before[key]) != _canon(after[key]):
            out.append(DiffRow(key, "changed", before[key], after[key]))
    return out


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr)


def usage_by_node_model(db: WorkflowDB, run_id: str) -> list[dict[str, Any]]:
    """Calls, tokens and cost of a run per (node, model), from ``report_usage`` rows."""
    u = pf_usage.c
    q = (
        select(
            u.node_name,
            u.model,
            func.count().label("calls"),
            func.coalesce(func.sum(u.input_tokens), 0).label("input_tokens"),
            func.coalesce(func.sum(u.output_tokens), 0).label("output_tokens"),
            func.sum(u.cost_usd).label("cost_usd"),
        )
        .where(u.run_id == run_id)
        .group_by(u.node_name, u.model)
        .order_by(u.node_name, u.model)
    )
    return db._read(lambda conn: [dict(r) for r in conn.execute(q).mappings()], run_id)


# ── workers ──────────────────────────────────────────────────────────────────


def workers_seen(
    db: WorkflowDB, dead_after_s: float = 30.0, *, limit: int = 200
) -> list[dict[str, Any]]:
    """Worker processes the ledger knows: last heartbeat, stale flag, last step run.

    Times are the database's clock, as the sweeper judges them. The last step is the
    newest attempt naming the worker, read newest-first, so it stops at once for a worker
    that is busy now.
    """
    w, a = pf_workers.c, pf_attempts.c
    workers_q = (
        select(w.worker_id, w.host, w.pid, w.started_at, w.beat_at)
        .order_by(w.beat_at.desc())
        .limit(limit)
    )

    def body(conn: Connection) -> list[dict[str, Any]]:
        from pocoflow.ledger.steps import clock

        now = clock(conn)
        out = []
        for r in conn.execute(workers_q).mappings():
            row = dict(r)
            last = conn.execute(
                select(a.run_id, a.step)
                .where(a.worker == row["worker_id"])
                .order_by(a.id.desc())
                .limit(1)
            ).first()
            out.append(
                {
                    "worker": row["worker_id"],
                    "host": row["host"],
                    "pid": row["pid"],
                    "started": _from_epoch(row["started_at"]),
                    "last_seen": _from_epoch(row["beat_at"]),
                    "seen_s_ago": round(now - row["beat_at"], 1),
                    "stale": now - row["beat_at"] > dead_after_s,
                    "last_step": None if last is None else f"{last[0]} #{last[1]}",
                }
            )
        return out

    return db._read(body)


# ── map items (pf_items, when the ledger has it) ─────────────────────────────


# Per ledger URL: pf_items reflected once per process (None: the ledger has none).
def item_counts(db: WorkflowDB, run_id: str) -> dict[str, dict[str, int]]:
    """Map items of a run by node and status: ``{node id: {status: n}}``.

    An item row names its step; the step's node is the one ``pf_steps`` recorded for it
    (a distributed step), else the node the checkpoint before it named as next (a local
    run's step, in flight or done: a local run has no ``pf_steps`` rows); else the label
    is ``step N``.
    """
    i, s = pf_items.c, pf_steps.c
    counted = (
        select(i.step, i.status, func.count().label("n"))
        .where(i.run_id == run_id)
        .group_by(i.step, i.status)
        .subquery()
    )
    before = pf_checkpoints.alias("before")
    node = func.coalesce(
        s.node_id, before.c.next_node, literal("step ") + cast(counted.c.step, Text)
    )
    q = select(node, counted.c.status, counted.c.n).select_from(
        counted.outerjoin(pf_steps, and_(s.run_id == run_id, s.step == counted.c.step)).outerjoin(
            before, and_(before.c.run_id == run_id, before.c.step == counted.c.step - 1)
        )
    )
    out: dict[str, dict[str, int]] = {}
    for where, status, n in db._read(lambda conn: list(conn.execute(q)), run_id):
        by_status = out.setdefault(str(where), {})
        by_status[str(status)] = by_status.get(str(status), 0) + int(n)
    return out
