"""Queries on ``pf_steps`` and ``pf_attempts``: outbox, leases and fencing for the
distributed executor (G1, G3).

A ``pf_steps`` row is written when a step is enqueued (the outbox row, ``sent_at`` NULL
until its message is published) and carries a lease from that moment, so a message lost
anywhere (publisher crash, dead worker's prefetch buffer) shows up as an expired lease.
``attempt`` is the fencing token: every take-over bumps it, and claims, renewals and the
commit all name the attempt they hold, so a worker that lost its lease changes nothing.

Every time is epoch seconds and every function takes ``now`` (``None`` = wall clock) so
the sweeper and lease logic are tested without sleeping.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.engine import Connection

from pocoflow.commit import NextStep
from pocoflow.ledger import pipeline
from pocoflow.ledger.common import insert_ignore
from pocoflow.ledger.pipeline import Op
from pocoflow.ledger.tables import (
    ACTIVE_STEP_STATUSES,
    LIVE_RUN_STATUSES,
    literal_in,
    pf_attempts,
    pf_runs,
    pf_steps,
)

_s = pf_steps.c
_a = pf_attempts.c
_KEY = and_(_s.run_id == bindparam("b_run_id"), _s.step == bindparam("b_step"))
_FENCE = and_(_KEY, _s.attempt == bindparam("b_attempt"))

_INSERT = insert(pf_steps)
_INSERT_ATTEMPT = insert(pf_attempts)
_MARK_SENT = (
    update(pf_steps)
    .where(_FENCE, _s.sent_at.is_(None))
    .values(sent_at=bindparam("now"), task_id=bindparam("task_id"))
)
_COMMIT = (
    update(pf_steps)
    .where(_FENCE, _s.status != "committed")
    .values(status="committed", lease_expires_at=None)
)
_CLAIM = (
    update(pf_steps)
    .where(
        _FENCE,
        or_(
            _s.status == "queued",
            and_(
                _s.status == "running",
                or_(
                    _s.lease_owner == bindparam("worker"),
                    _s.lease_expires_at < bindparam("now"),
                ),
            ),
        ),
    )
    .values(
        status="running",
        lease_owner=bindparam("worker"),
        lease_expires_at=bindparam("expires"),
    )
)
_RENEW = (
    update(pf_steps)
    .where(_FENCE, _s.status == "running", _s.lease_owner == bindparam("worker"))
    .values(lease_expires_at=bindparam("expires"))
)
_FAIL = (
    update(pf_steps)
    .where(_FENCE, _s.status != "committed")
    .values(status="failed", lease_expires_at=None)
)
_TAKE_OVER = (
    update(pf_steps)
    .where(_FENCE, _s.status != "committed")
    .values(
        attempt=_s.attempt + 1,
        status="queued",
        lease_owner=None,
        lease_expires_at=bindparam("expires"),
        sent_at=None,
        task_id=None,
        queued_at=bindparam("now"),
    )
)
_TAKE_OVER_EXPIRED = _TAKE_OVER.where(
    _s.status.in_(("queued", "running")),
    or_(_s.lease_expires_at.is_(None), _s.lease_expires_at < bindparam("now")),
)
# A queued step whose lease ran out was sent but never claimed (a message lost in a dead
# worker's prefetch buffer or a Redis restart, or still waiting in a long queue): nobody
# holds it, so it is sent again under the same attempt; the claim lets one copy run.
_RELEASE_QUEUED = (
    update(pf_steps)
    .where(
        _FENCE,
        _s.status == "queued",
        or_(_s.lease_expires_at.is_(None), _s.lease_expires_at < bindparam("now")),
    )
    .values(lease_expires_at=bindparam("expires"), queued_at=bindparam("now"))
)
_END_ANY_ATTEMPT = (
    update(pf_attempts)
    .where(
        _a.run_id == bindparam("b_run_id"),
        _a.step == bindparam("b_step"),
        _a.attempt == bindparam("b_attempt"),
        _a.ended_at.is_(None),
    )
    .values(ended_at=bindparam("now"), outcome=bindparam("outcome"), error_msg=bindparam("err"))
)
_END_ATTEMPT = _END_ANY_ATTEMPT.where(_a.worker == bindparam("b_worker"))
_GET = select(pf_steps).where(_KEY)
_TASK_IDS = (
    select(_s.task_id)
    .where(
        _s.run_id == bindparam("run_id"),
        _s.status.in_(("queued", "running")),
        _s.task_id.is_not(None),
    )
    .order_by(_s.step)
)
_GET_ATTEMPTS = (
    select(pf_attempts).where(_a.run_id == bindparam("run_id")).order_by(_a.step, _a.attempt, _a.id)
)
# The sweeper's queries start from the live runs (partial index ix_pf_runs_live) and seek
# each one's unfinished steps (ix_pf_steps_active), so their cost follows the runs in
# flight, not the finished and parked runs the ledger keeps; the predicates repeat the
# partial indexes' own (literal_in), or the planners could not use them.
_SWEEPABLE = select(pf_steps).where(
    _s.run_id.in_(select(pf_runs.c.run_id).where(literal_in(pf_runs.c.status, LIVE_RUN_STATUSES))),
    literal_in(_s.status, ACTIVE_STEP_STATUSES),
)
_EXPIRED = (
    _SWEEPABLE.where(_s.lease_expires_at < bindparam("now"))
    .order_by(_s.lease_expires_at)
    .limit(bindparam("limit"))
)
_UNSENT = (
    _SWEEPABLE.where(
        _s.status == "queued",
        _s.sent_at.is_(None),
        _s.queued_at <= bindparam("cutoff"),
    )
    .order_by(_s.queued_at)
    .limit(bindparam("limit"))
)


def _key(run_id: str, step: int, attempt: int) -> dict[str, Any]:
    return {"b_run_id": run_id, "b_step": step, "b_attempt": attempt}


def insert_step(
    conn: Connection,
    dialect: str,
    run_id: str,
    step: int,
    node_id: str,
    attempt: int,
    lease_expires_at: float | None,
    now: float,
) -> bool:
    """The outbox row of a step about to be sent; False if the step has a row already."""
    stmt = insert_ignore(dialect, pf_steps, "run_id", "step")
    return (
        conn.execute(stmt, _row(run_id, step, node_id, attempt, lease_expires_at, now)).rowcount
        == 1
    )


def successor_op(run_id: str, nxt: NextStep, now: float) -> Op:
    """The successor's outbox row, inside the commit of its predecessor (plain insert: a
    conflict is a bug and rolls the commit back)."""
    return Op(_INSERT, _row(run_id, nxt.step, nxt.node_id, nxt.attempt, nxt.lease_expires_at, now))


def insert_successor(conn: Connection, run_id: str, nxt: NextStep, now: float) -> None:
    op = successor_op(run_id, nxt, now)
    conn.execute(op.stmt, op.params)


def _row(
    run_id: str, step: int, node_id: str, attempt: int, expires: float | None, now: float
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "step": step,
        "node_id": node_id,
        "status": "queued",
        "attempt": attempt,
        "lease_owner": None,
        "lease_expires_at": expires,
        "sent_at": None,
        "task_id": None,
        "queued_at": now,
        "created_at": now,
    }


def fence_op(run_id: str, step: int, attempt: int) -> Op:
    """Mark the step committed iff ``attempt`` still holds it and nobody committed it (G1)."""
    return Op(_COMMIT, _key(run_id, step, attempt), must_hit_one=True)


def fence_commit(conn: Connection, run_id: str, step: int, attempt: int) -> bool:
    op = fence_op(run_id, step, attempt)
    return conn.execute(op.stmt, op.params).rowcount == 1


def mark_sent(
    conn: Connection, run_id: str, step: int, attempt: int, task_id: str | None, now: float
) -> bool:
    """Close the outbox entry: the message of this attempt is with the broker."""
    params = _key(run_id, step, attempt)
    params.update(now=now, task_id=task_id)
    return conn.execute(_MARK_SENT, params).rowcount == 1


def claim(
    conn: Connection,
    run_id: str,
    step: int,
    attempt: int,
    worker: str,
    lease_s: float,
    now: float,
    task_id: str | None = None,
) -> bool:
    """Take the lease for ``attempt`` and open its ``pf_attempts`` row, in one transaction.

    Wins when the row is queued with this attempt, or running under this attempt with an
    expired lease (the broker redelivered a dead worker's message) or under this worker.
    """
    params = _key(run_id, step, attempt)
    params.update(worker=worker, now=now, expires=now + lease_s)
    attempt_row = _attempt_row(run_id, step, attempt, worker, now, task_id)
    # A batch because claiming is on every step's path (see pipeline.run).
    return pipeline.run(
        conn, [Op(_CLAIM, params, must_hit_one=True), Op(_INSERT_ATTEMPT, attempt_row)]
    )


def renew(
    conn: Connection, run_id: str, step: int, attempt: int, worker: str, lease_s: float, now: float
) -> bool:
    params = _key(run_id, step, attempt)
    params.update(worker=worker, expires=now + lease_s)
    return conn.execute(_RENEW, params).rowcount == 1


def fail(conn: Connection, run_id: str, step: int, attempt: int) -> bool:
    return conn.execute(_FAIL, _key(run_id, step, attempt)).rowcount == 1


def take_over(
    conn: Connection,
    run_id: str,
    step: int,
    old_attempt: int,
    lease_s: float,
    now: float,
    force: bool,
) -> int | None:
    """Re-queue the step under ``old_attempt + 1`` (fencing out the old holder)."""
    params = _key(run_id, step, old_attempt)
    params.update(now=now, expires=now + lease_s)
    stmt = _TAKE_OVER if force else _TAKE_OVER_EXPIRED
    if conn.execute(stmt, params).rowcount != 1:
        return None
    end_attempt(conn, run_id, step, old_attempt, None, "lost", None, now)
    return old_attempt + 1


def renew_queued(
    conn: Connection, run_id: str, step: int, attempt: int, lease_s: float, now: float
) -> bool:
    """Lease an expired, never-claimed step again for its resend (one sweeper wins)."""
    params = _key(run_id, step, attempt)
    params.update(now=now, expires=now + lease_s)
    return conn.execute(_RELEASE_QUEUED, params).rowcount == 1


def _attempt_row(
    run_id: str, step: int, attempt: int, worker: str | None, now: float, task_id: str | None
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "step": step,
        "attempt": attempt,
        "worker": worker,
        "started_at": now,
        "task_id": task_id,
    }


def end_attempt_op(
    run_id: str, step: int, attempt: int, worker: str, outcome: str, now: float
) -> Op:
    """Closing an attempt's row as part of a batch (the step commit)."""
    params = _key(run_id, step, attempt)
    params.update(now=now, outcome=outcome, err=None, b_worker=worker)
    return Op(_END_ATTEMPT, params)


def end_attempt(
    conn: Connection,
    run_id: str,
    step: int,
    attempt: int,
    worker: str | None,
    outcome: str,
    error_msg: str | None,
    now: float,
) -> bool:
    """Close the open ``pf_attempts`` row(s) of this attempt (of ``worker``, or any if None)."""
    params = _key(run_id, step, attempt)
    params.update(now=now, outcome=outcome, err=error_msg)
    if worker is None:
        return conn.execute(_END_ANY_ATTEMPT, params).rowcount > 0
    params["b_worker"] = worker
    return conn.execute(_END_ATTEMPT, params).rowcount > 0


def get(conn: Connection, run_id: str, step: int) -> dict[str, Any] | None:
    row = conn.execute(_GET, {"b_run_id": run_id, "b_step": step}).mappings().first()
    return dict(row) if row is not None else None


def task_ids(conn: Connection, run_id: str) -> list[str]:
    return list(conn.execute(_TASK_IDS, {"run_id": run_id}).scalars())


def attempts(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(_GET_ATTEMPTS, {"run_id": run_id}).mappings()]


def expired(conn: Connection, now: float, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(_EXPIRED, {"now": now, "limit": limit}).mappings()
    return [dict(r) for r in rows]


def unsent(conn: Connection, cutoff: float, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(_UNSENT, {"cutoff": cutoff, "limit": limit}).mappings()
    return [dict(r) for r in rows]
