"""Queries on ``pf_items`` and ``pf_joins``: the distributed fan-out of a MapNode.

A map step's task runs ``prep`` once and, in one transaction, writes a ``pf_items`` row
per item (the outbox: ``sent_at`` NULL until the item's message is published), the
step's ``pf_joins`` row (``total``, ``done = 0``) and parks the step (``lease_owner =
PARKED_OWNER``, no lease: no step sweep takes it over, no step claim re-runs ``prep``).

Each item is claimed, renewed, committed and taken over exactly as a step is (G1, G3):
``attempt`` is bumped by every take-over and retry, ``lease_owner`` holds the claim's
holder token, and the commit lands only under both. An item's commit is one batch: its
result row, ``done = done + 1`` on the join row and, when that makes ``done`` reach
``total``, the step row re-queued under a new attempt: the join's outbox entry. The row
lock on ``pf_joins`` serialises the item commits of one step (and a resume's look at it,
``reopen``), so exactly one commit sees the count complete. ``pf_runs`` is not written
on an item's commit: a thousand items do not contend on one run row.

Times are epoch seconds from the database's clock (``common.NOW``); ``now`` replaces it
for tests, as in ``steps``. The sweeper's queries on the same tables are in
``itemrecovery``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, case, insert, or_, select, update
from sqlalchemy.engine import Connection

from pocoflow.commit import PARKED_OWNER
from pocoflow.ledger import events, pipeline, runs
from pocoflow.ledger.common import NOW
from pocoflow.ledger.pipeline import Op
from pocoflow.ledger.tables import pf_items, pf_joins, pf_runs, pf_steps

_i = pf_items.c
_j = pf_joins.c
_s = pf_steps.c
_r = pf_runs.c

_STEP = and_(_i.run_id == bindparam("b_run_id"), _i.step == bindparam("b_step"))
_KEY = and_(_STEP, _i.idx == bindparam("b_idx"))
#: One item under one attempt (with ``item_key``): what every item transition names.
ITEM_FENCE = and_(_KEY, _i.attempt == bindparam("b_attempt"))
_HELD = and_(ITEM_FENCE, _i.status == "running", _i.lease_owner == bindparam("b_holder"))
_JOIN = and_(_j.run_id == bindparam("b_run_id"), _j.step == bindparam("b_step"))
_STEP_ROW = and_(_s.run_id == bindparam("b_run_id"), _s.step == bindparam("b_step"))
_EXPIRES = NOW + bindparam("lease_s")

# ── fan-out ──────────────────────────────────────────────────────────────────

_INSERT_ITEM = insert(pf_items).values(queued_at=NOW)
_INSERT_JOIN = insert(pf_joins).values(created_at=NOW)
# The step holder hands the step to its items: no owner a sweep could find dead, no lease
# that could expire; only while this holder's claim of this attempt holds it (G1).
_PARK = (
    update(pf_steps)
    .where(
        _STEP_ROW,
        _s.attempt == bindparam("b_attempt"),
        _s.status == "running",
        _s.lease_owner == bindparam("b_holder"),
    )
    .values(lease_owner=PARKED_OWNER, lease_expires_at=None)
)

# ── item claim, renewal, commit ──────────────────────────────────────────────

# The run may go on (G4: cancel and pause take effect between items), decided by the
# claim's own statement as a step claim's is, and the step runs the node the message
# names (the ledger, not a message, chooses what runs).
_RUN_GOES_ON = (
    select(_r.run_id)
    .where(_r.run_id == _i.run_id, or_(_r.status == "queued", _r.status == "running"))
    .where(_r.control.is_(None))
    .exists()
)
_NODE_IS = (
    select(_s.run_id)
    .where(_s.run_id == _i.run_id, _s.step == _i.step, _s.node_id == bindparam("b_node_id"))
    .exists()
)
_CLAIM = (
    update(pf_items)
    .where(
        ITEM_FENCE,
        or_(
            _i.status == "queued",
            and_(
                _i.status == "running",
                or_(_i.lease_owner == bindparam("b_holder"), _i.lease_expires_at < NOW),
            ),
        ),
        _RUN_GOES_ON,
        _NODE_IS,
    )
    .values(
        status="running",
        lease_owner=bindparam("b_holder"),
        lease_expires_at=_EXPIRES,
        received_by=None,
        task_id=bindparam("b_task_id"),
    )
)
_CLAIMED_ITEM = select(_i.item_json, _i.try_number).where(_HELD)
_CLAIM_RETURNING = _CLAIM.returning(_i.item_json, _i.try_number)  # PostgreSQL
_RENEW = update(pf_items).where(_HELD).values(lease_expires_at=_EXPIRES)
# The holder keeps its token on the row (the proof a lost COMMIT's retry looks for).
_FINISH = (
    update(pf_items)
    .where(_HELD)
    .values(
        status=bindparam("b_status"),
        result_json=bindparam("b_result"),
        error_json=bindparam("b_error"),
        lease_expires_at=None,
    )
)
# The same for a failure that is the item's last crash (the crash budget's verdict):
# counted, so ``crashes`` says what the run's error says.
_FINISH_CRASHED = _FINISH.values(crashes=_i.crashes + 1)
_COUNT = (
    update(pf_joins)
    .where(_JOIN)
    .values(done=_j.done + 1, ready_at=case((_j.done + 1 >= _j.total, NOW), else_=_j.ready_at))
)
# PostgreSQL: the result and its count in one statement, so that a batch that also
# carries its COMMIT (``pipeline.run_reading(commit=True)``) counts only an item this very
# statement finished: a holder that lost its claim writes nothing at all.
_FINISHED_NOW = _FINISH.returning(_i.idx).cte("finished_now")
#: ... and the count it brought the join to, or no row when the claim was lost.
_FINISH_AND_COUNT = _COUNT.where(select(_FINISHED_NOW.c.idx).exists()).returning(_j.done)
_COMPLETE = (
    select(_j.run_id).where(_j.run_id == _s.run_id, _j.step == _s.step, _j.done >= _j.total)
).exists()
# The join's outbox entry: the parked step queued again under a new attempt, leased from
# now (G3), iff its count is complete. A step a resumer holds instead is joined by it.
REQUEUE_JOIN_STEP = (
    update(pf_steps)
    .where(_STEP_ROW, _s.status == "running", _s.lease_owner == PARKED_OWNER, _COMPLETE)
    .values(
        status="queued",
        attempt=_s.attempt + 1,
        lease_owner=None,
        lease_expires_at=_EXPIRES,
        sent_at=None,
        task_id=None,
        received_by=None,
        queued_at=NOW,
    )
)
# The join row locked before anything else (a group of item commits, a resume). A read
# that locks, not a no-op UPDATE: PostgreSQL wrote a new version of the row for each
# group's UPDATE, a thousand dead versions of one row per thousand-item map. (SQLite
# renders no FOR UPDATE; its write transactions hold the whole file.)
_LOCK_JOIN = select(_j.run_id).where(_JOIN).with_for_update()
_JOIN_STATE = (
    select(_j.done, _j.total, _s.status, _s.attempt, _s.node_id, _s.lease_owner)
    .join(pf_steps, and_(_s.run_id == _j.run_id, _s.step == _j.step))
    .where(_JOIN)
)
_RETRY = (
    update(pf_items)
    .where(_HELD)
    .values(
        attempt=_i.attempt + 1,
        status="queued",
        try_number=bindparam("b_try"),
        lease_owner=None,
        lease_expires_at=None,
        sent_at=None,
        received_by=None,
        queued_at=NOW + bindparam("b_due_in"),
        # The delivery ran the item to an outcome of its own (a retry, a limit wait):
        # the crashes before it were not "in a row" with any after it.
        crashes=0,
        error_json=None,
    )
)
# The same after the holder's delivery crashed in the executor: counted toward the
# item's crash budget, as a worker death is (``itemrecovery.take_over``), and the worker
# processes its crashes came on kept (``crashed_on``) while the item waits: a queued
# item has no error of its own in ``error_json``.
_RETRY_CRASHED = _RETRY.values(crashes=_i.crashes + 1, error_json=bindparam("b_error"))
_MARK_SENT = update(pf_items).where(ITEM_FENCE, _i.sent_at.is_(None)).values(sent_at=NOW)


def item_key(run_id: str, step: int, idx: int, attempt: int) -> dict[str, Any]:
    """The bound parameters of ``ITEM_FENCE``."""
    return {"b_run_id": run_id, "b_step": step, "b_idx": idx, "b_attempt": attempt}


@dataclass(frozen=True)
class ItemClaim:
    """One delivery's claim of an item: which item, under which attempt, by which
    holder token. Renewing, committing, retrying and failing the item must name it (G1)."""

    run_id: str
    step: int
    idx: int
    attempt: int
    holder: str
    #: The broker task that delivered the claim (what a terminate revokes).
    task_id: str | None = None

    def params(self, **more: Any) -> dict[str, Any]:
        """The fence's bound parameters (``_HELD``), plus ``more``."""
        return {
            **item_key(self.run_id, self.step, self.idx, self.attempt),
            "b_holder": self.holder,
            **more,
        }


def fan_out_ops(
    run_id: str,
    step: int,
    attempt: int,
    holder: str,
    worker: str,
    item_texts: Sequence[str],
    step_events: list[dict[str, Any]],
    end_attempt: Op,
    now: float | None,
    prep_store: str | None = None,
) -> list[Op]:
    """The fan-out's batch: park the step (fenced on ``holder``'s claim), the join row
    (with what prep wrote to the Store), every item row in one executemany, the step's
    events and its attempt row closed."""
    park = {"b_run_id": run_id, "b_step": step, "b_attempt": attempt, "b_holder": holder}
    join = {"run_id": run_id, "step": step, "total": len(item_texts), "done": 0, "now": now}
    join.update(sending_by=worker, prep_store=prep_store)
    rows = [
        {
            "run_id": run_id,
            "step": step,
            "idx": idx,
            "item_json": text,
            "status": "queued",
            "attempt": 1,
            "try_number": 1,
            "now": now,
        }
        for idx, text in enumerate(item_texts)
    ]
    return [
        Op(_PARK, park, must_hit_one=True),
        Op(_INSERT_JOIN, join),
        Op(_INSERT_ITEM, rows),
        events.insert_op(events.rows_of(run_id, step_events)),
        end_attempt,
    ]


def claim(
    conn: Connection, c: ItemClaim, node_id: str, lease_s: float, now: float | None
) -> tuple[bool, dict[str, Any] | None, tuple[str, int] | None]:
    """Read the run's guard columns, claim the item for ``c`` (only while the run goes
    on, for the node the ledger recorded) and read its value and try: one batch, one
    round trip on PostgreSQL. ``(claimed, run, (item_json, try_number))``."""
    params = c.params(b_node_id=node_id, b_task_id=c.task_id, now=now, lease_s=lease_s)
    if conn.dialect.name == "postgresql":
        # Two statements, each its own transaction, one round trip: the claim reads its
        # item back (RETURNING); the claim's UPDATE checks the run itself. Not atomic,
        # so the guard read may predate the claim: a pause or cancel that landed between
        # them refused the claim while the row read said the run goes on, and the caller
        # would take the refusal for a duplicate delivery and leave the pause standing.
        # A refused claim therefore reads the guard again (a round trip on that path
        # only): the run as it was when the claim was refused, or later.
        ops = [
            runs.guard_op(c.run_id),
            Op(_CLAIM_RETURNING, params, must_hit_one=True, returns_rows=True),
        ]
        claimed, rows = pipeline.run_reading(conn, ops, autocommit=True)
        if not claimed:
            rows[0] = pipeline.run_reading(conn, [runs.guard_op(c.run_id)], autocommit=True)[1][0]
        item = rows[1][0] if claimed and rows[1] else None
        run = runs.guard_row(rows[0])
        return claimed, run, (str(item[0]), int(item[1])) if item is not None else None
    ops = [
        runs.guard_op(c.run_id),
        Op(_CLAIM, params, must_hit_one=True),
        Op(_CLAIMED_ITEM, c.params()),
    ]
    claimed, rows = pipeline.run_reading(conn, ops)
    run = runs.guard_row(rows[0])
    item = rows[2][0] if claimed and rows[2] else None
    return claimed, run, (str(item[0]), int(item[1])) if item is not None else None


def renew(conn: Connection, c: ItemClaim, lease_s: float, now: float | None = None) -> bool:
    return conn.execute(_RENEW, c.params(lease_s=lease_s, now=now)).rowcount == 1


def commit(
    conn: Connection,
    c: ItemClaim,
    result_json: str | None,
    error_json: str | None,
    lease_s: float,
    now: float | None = None,
) -> tuple[bool, dict[str, Any] | None]:
    """SQLite: an item's result (or collected error), its count on the join and, if it
    completes the count, the step re-queued for its join: one batch (G1: only under
    ``c``). PostgreSQL commits items in groups (``commit_many``).

    Returns ``(committed, join state)``; the state's ``done == total`` tells the one
    commit that completed the join."""
    params = c.params(b_status="done", b_result=result_json, b_error=error_json)
    step = {"b_run_id": c.run_id, "b_step": c.step}
    join = {**step, "now": now, "lease_s": lease_s}
    ops = [
        Op(_FINISH, params, must_hit_one=True),
        Op(_COUNT, join, must_hit_one=True),
        Op(REQUEUE_JOIN_STEP, join),
        Op(_JOIN_STATE, step),
    ]
    committed, rows = pipeline.run_reading(conn, ops)
    return committed, _state(rows[3]) if committed else None


@dataclass(frozen=True)
class ItemCommit:
    """One item commit of a group (``commit_many``)."""

    claim: ItemClaim
    result_json: str | None
    error_json: str | None
    lease_s: float
    now: float | None = None


def commit_many(
    conn: Connection, commits: Sequence[ItemCommit]
) -> list[tuple[bool, dict[str, Any] | None]]:
    """PostgreSQL: the item commits of several threads in one transaction and one round
    trip, its COMMIT included; for each, what ``commit`` returns for it alone.

    Because every item commit of a step moves the same ``pf_joins`` row, whose lock each
    one held through its COMMIT's WAL flush: a thousand items took turns on one lock
    for one flush each. A group takes the lock once per flush. Each item's finish is its
    own guard (a lost claim writes nothing, the others commit), its count is moved by the
    same statement, and the join row sees the counts in order, so the one item that
    brought ``done`` to ``total`` is told so (its state's ``done``): it publishes the
    join. Rows are locked in key order, so two processes' groups cannot deadlock on the
    joins of two steps."""
    order = sorted(range(len(commits)), key=lambda i: _item_order(commits[i].claim))
    # The join rows first, in key order, as ``reopen`` takes them: a commit that locked
    # its item row first and then waited for the join would deadlock with a resume that
    # holds the join and re-opens that item (its lease expired).
    steps = sorted({(c.claim.run_id, c.claim.step) for c in commits})
    ops = [Op(_LOCK_JOIN, {"b_run_id": run_id, "b_step": step}) for run_id, step in steps]
    first = len(ops)
    for i in order:
        c = commits[i]
        params = c.claim.params(b_status="done", b_result=c.result_json, b_error=c.error_json)
        params.update(now=c.now, lease_s=c.lease_s)
        ops.append(Op(_FINISH_AND_COUNT, params, returns_rows=True))
    joins: dict[tuple[str, int], int] = {}
    for i in order:
        c = commits[i]
        key = (c.claim.run_id, c.claim.step)
        if key not in joins:
            step = {"b_run_id": key[0], "b_step": key[1]}
            ops.append(Op(REQUEUE_JOIN_STEP, {**step, "now": c.now, "lease_s": c.lease_s}))
            joins[key] = len(ops)
            ops.append(Op(_JOIN_STATE, step))
    _ok, rows = pipeline.run_reading(conn, ops, commit=True)
    out: list[tuple[bool, dict[str, Any] | None]] = [(False, None)] * len(commits)
    for position, i in enumerate(order, start=first):
        claim = commits[i].claim
        counted = rows[position]
        state = _state(rows[joins[(claim.run_id, claim.step)]])
        if counted and state is not None:
            out[i] = (True, {**state, "done": counted[0][0]})
    return out


def _item_order(c: ItemClaim) -> tuple[str, int, int]:
    return (c.run_id, c.step, c.idx)


def _state(rows: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    if not rows:
        return None
    done, total, status, attempt, node_id, owner = rows[0]
    return {
        "done": done,
        "total": total,
        "step_status": status,
        "step_attempt": attempt,
        "node_id": node_id,
        "lease_owner": owner,
    }


def committed_by(conn: Connection, c: ItemClaim) -> bool:
    """A lost COMMIT's retry missed: did the first try land (the row is finished under
    this attempt and holder, which only its commit or failure writes)?"""
    row = get(conn, c.run_id, c.step, c.idx)
    return (
        row is not None
        and row["status"] in ("done", "failed")
        and row["attempt"] == c.attempt
        and row["lease_owner"] == c.holder
    )


def fail_ops(
    c: ItemClaim,
    error_json: str,
    error_msg: str,
    fail_events: list[dict[str, Any]],
    crashed: bool = False,
) -> list[Op]:
    """An item out of tries under ``on_item_error = "raise"`` (or, ``crashed``, at its
    crash budget: one crash more): the item failed and its run failed naming it (only
    while live: a cancel that landed stands), one batch. The step stays parked: a resume
    re-opens the failed and unfinished items (``reopen``)."""
    from pocoflow.ledger.common import iso_now

    params = c.params(b_status="failed", b_result=None, b_error=error_json)
    ending = {"status": "failed", "error_msg": error_msg, "completed_at": iso_now()}
    return [
        Op(_FINISH_CRASHED if crashed else _FINISH, params, must_hit_one=True),
        events.insert_op(events.rows_of(c.run_id, fail_events)),
        *runs.step_update_ops(c.run_id, ending),
    ]


def retry(
    conn: Connection,
    c: ItemClaim,
    next_try: int,
    due_in: float,
    now: float | None = None,
    crashed_on: list[str] | None = None,
) -> int | None:
    """The holder hands its item to a new attempt for try ``next_try``, due in
    ``due_in`` seconds (``crashed_on``: after a crash of the executor, one crash more,
    and the worker processes of its crashes in a row, the last this one's); None if its
    claim no longer holds the item."""
    params = c.params(b_try=next_try, b_due_in=due_in, now=now)
    stmt = _RETRY
    if crashed_on is not None:
        stmt = _RETRY_CRASHED
        params["b_error"] = json.dumps({"crashed_on": crashed_on})
    return c.attempt + 1 if conn.execute(stmt, params).rowcount == 1 else None


def crashed_on(row: dict[str, Any]) -> list[str]:
    """The worker processes a queued item's crashes of the executor in a row came on
    (``retry`` keeps them in ``error_json``), as many as its ``crashes`` count at most:
    the crashes of worker deaths are counted, not kept."""
    try:
        kept = json.loads(row.get("error_json") or "{}").get("crashed_on", [])
    except (ValueError, AttributeError):
        return []
    crashes = int(row.get("crashes") or 0)
    return [str(w) for w in kept][-crashes:] if crashes else []


def mark_sent_op(sent: Sequence[tuple[str, int, int, int]], now: float | None) -> Op:
    """Close the outbox entries of published ``(run_id, step, idx, attempt)``: one
    executemany (a fan-out marks all its items in one statement)."""
    return Op(_MARK_SENT, [{**item_key(*key), "now": now} for key in sent])


def running(conn: Connection, run_id: str, step: int) -> list[dict[str, Any]]:
    """The items of a step that a worker runs now (idx, attempt, holder, task id)."""
    stmt = (
        select(_i.idx, _i.attempt, _i.lease_owner, _i.task_id)
        .where(_i.run_id == run_id, _i.step == step, _i.status == "running")
        .order_by(_i.idx)
    )
    return [dict(r) for r in conn.execute(stmt).mappings()]


def get(conn: Connection, run_id: str, step: int, idx: int) -> dict[str, Any] | None:
    stmt = select(pf_items).where(_i.run_id == run_id, _i.step == step, _i.idx == idx)
    row = conn.execute(stmt).mappings().first()
    return dict(row) if row is not None else None


def all_items(
    conn: Connection, run_id: str, step: int, *, values_only: bool = False
) -> list[dict[str, Any]]:
    """Every item of a step in item order; ``values_only``: the columns the join reads
    (index, value, result, error), so 10,000 results cost only their own size."""
    columns = (_i.idx, _i.item_json, _i.result_json, _i.error_json) if values_only else (pf_items,)
    stmt = select(*columns).where(_i.run_id == run_id, _i.step == step).order_by(_i.idx)
    return [dict(r) for r in conn.execute(stmt).mappings()]


def prep_store(conn: Connection, run_id: str, step: int) -> str | None:
    """What the step's ``prep`` wrote to the Store at the fan-out (JSON), or None."""
    stmt = select(_j.prep_store).where(_j.run_id == run_id, _j.step == step)
    return conn.execute(stmt).scalar()


def join_state(conn: Connection, run_id: str, step: int) -> dict[str, Any] | None:
    """The join of a map step with its step row, or None: the step never fanned out."""
    return _state(
        [tuple(r) for r in conn.execute(_JOIN_STATE, {"b_run_id": run_id, "b_step": step})]
    )


_SENDING = update(pf_joins).where(_JOIN).values(sending_by=bindparam("b_worker"))
_SENT_ALL = (
    update(pf_joins).where(_JOIN, _j.sending_by == bindparam("b_worker")).values(sending_by=None)
)


def sent_all(conn: Connection, run_id: str, step: int, worker: str) -> bool:
    """``worker`` published every item message of the step: from now on the sweeper
    re-sends any of them still unsent."""
    params = {"b_run_id": run_id, "b_step": step, "b_worker": worker}
    return conn.execute(_SENT_ALL, params).rowcount == 1


_REOPEN = (
    update(pf_items)
    .where(
        _STEP,
        or_(
            _i.status.in_(("queued", "failed")),
            and_(_i.status == "running", _i.lease_expires_at < NOW),
        ),
    )
    .values(
        attempt=_i.attempt + 1,
        status="queued",
        try_number=case((_i.status == "failed", 1), else_=_i.try_number),
        # A resume is a new start: every item re-opened (a poison item failed after its
        # crashes, one queued after a crash when the run paused) gets its full count of
        # crashes again, as a failed item's tries start again at 1.
        crashes=0,
        error_json=None,
        lease_owner=None,
        lease_expires_at=None,
        sent_at=None,
        received_by=None,
        queued_at=NOW,
    )
)


def reopen(
    conn: Connection,
    run_id: str,
    step: int,
    attempt: int,
    holder: str,
    worker: str,
    now: float | None = None,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """A fanned-out step claimed again (a resume, or a copy of its message): lock the
    join row first, as every item commit does (``commit_many``), so a commit that
    completes the count either lands before (the count is complete: the caller joins, holding the step) or
    after the step is parked again (that commit re-queues it). When not complete: the
    step parked again and every unfinished item that nobody holds (queued, failed, lease
    expired) re-opened under a new attempt; returns ``(join, items to send)``."""
    key = {"b_run_id": run_id, "b_step": step}
    conn.execute(_LOCK_JOIN, key)
    state = join_state(conn, run_id, step)
    if state is None or state["done"] >= state["total"]:
        return state, []
    park = {**key, "b_attempt": attempt, "b_holder": holder}
    if conn.execute(_PARK, park).rowcount != 1:
        return state, []
    conn.execute(_REOPEN, {**key, "now": now})
    conn.execute(_SENDING, {**key, "b_worker": worker})
    stmt = select(_i.idx, _i.attempt, _i.try_number).where(
        _i.run_id == run_id, _i.step == step, _i.status == "queued", _i.sent_at.is_(None)
    )
    return state, [dict(r) for r in conn.execute(stmt.order_by(_i.idx)).mappings()]
