"""Queries on ``pf_steps`` and ``pf_attempts``: outbox, leases and fencing for the
distributed executor (G1, G3).

A ``pf_steps`` row is written when a step is enqueued (the outbox row, ``sent_at`` NULL
until its message is published) and carries a lease from that moment, so a message lost
anywhere (publisher crash, dead worker's prefetch buffer) shows up as an expired lease.
Two fencing tokens guard it: ``attempt``, bumped by every take-over, and the holder token
every claim writes into ``lease_owner``. Renewals, the commit and the failure of a step
name both, so a worker that lost its lease changes nothing, even when another delivery of
the *same* attempt claimed the step after it froze (G1).

Every time is epoch seconds from the database's clock (``common.NOW``): a ``now`` given
to a function replaces it, so the sweeper and lease logic are tested without sleeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy import Text, and_, bindparam, case, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Insert

from pocoflow.commit import NextStep, StepFailure
from pocoflow.ledger import events, pipeline, runs
from pocoflow.ledger.common import DB_CLOCK, NOW, insert_ignore, iso_now
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
_r = pf_runs.c
_KEY = and_(_s.run_id == bindparam("b_run_id"), _s.step == bindparam("b_step"))
_FENCE = and_(_KEY, _s.attempt == bindparam("b_attempt"))
# The claim holding the step now: its attempt and its holder token.
_HELD = and_(_FENCE, _s.status == "running", _s.lease_owner == bindparam("holder"))
_EXPIRES = NOW + bindparam("lease_s")
_LEASE_OVER = or_(_s.lease_expires_at.is_(None), _s.lease_expires_at < NOW)

# An outbox row's lease: the absolute time given (a run's first step), else lease_s on NOW.
_OUTBOX_TIMES = {
    "lease_expires_at": func.coalesce(bindparam("expires"), _EXPIRES),
    "queued_at": NOW,
    "created_at": NOW,
}


# The attempt row of a claim, copied from the step row only while this holder's claim of
# this attempt holds it: run right after the claim in its batch, it inserts iff the claim
# took the step, so the batch needs no round trip between them (PostgreSQL sends the
# whole batch at once) and never inserts for a claim that missed, or for a missing run.
def _attempt_row(step: Any, worker: str, task_id: str) -> Any:
    """The ``pf_attempts`` row (``_ATTEMPT_COLUMNS``) of a claim of the step whose
    columns ``step`` names, with ``worker`` and ``task_id`` as parameter names."""
    return select(
        step.run_id,
        step.step,
        step.attempt,
        bindparam(worker, type_=Text),
        step.lease_owner,
        NOW,
        bindparam(task_id, type_=Text),
    )


_ATTEMPT_OF_CLAIM = _attempt_row(_s, "worker", "task_id").where(_HELD)
_ATTEMPT_COLUMNS = ["run_id", "step", "attempt", "worker", "holder", "started_at", "task_id"]
_INSERT_ATTEMPT = insert(pf_attempts).from_select(_ATTEMPT_COLUMNS, _ATTEMPT_OF_CLAIM)
# The same, unless this claim's row of the attempt is open already: a claim retried after
# its COMMIT's outcome was lost wins again (its own holder holds the row) and must not open
# a second row, which the sweeper would count as a second crash or retry.
_INSERT_ATTEMPT_ONCE = insert(pf_attempts).from_select(
    _ATTEMPT_COLUMNS,
    _ATTEMPT_OF_CLAIM.where(
        ~select(_a.id)
        .where(
            _a.run_id == _s.run_id,
            _a.step == _s.step,
            _a.attempt == _s.attempt,
            _a.holder == _s.lease_owner,
            _a.ended_at.is_(None),
        )
        .exists()
    ),
)
_MARK_SENT = (
    update(pf_steps)
    .where(_FENCE, _s.sent_at.is_(None))
    .values(sent_at=NOW, task_id=bindparam("task_id"))
)
_COMMIT = update(pf_steps).where(_HELD).values(status="committed", lease_expires_at=None)
_FAIL = update(pf_steps).where(_HELD).values(status="failed", lease_expires_at=None)


def _run_is(live: bool, flow: bool) -> Any:
    """The step's run row as the claim requires it: ``live``, the run may go on (checked
    by the claim's own statement, so a cancel or pause committed after the guard read the
    run row, PostgreSQL READ COMMITTED, still stops it, G4); ``flow``, it is a run of the
    flow the message names (a message cannot choose the graph a step runs)."""
    terms = [_r.run_id == _s.run_id]
    if live:
        terms += [or_(_r.status == "queued", _r.status == "running"), _r.control.is_(None)]
    if flow:
        terms.append(_r.flow_name == bindparam("b_flow"))
    return select(_r.run_id).where(*terms).exists()


_CLAIM_ANY = (
    update(pf_steps)
    .where(
        _FENCE,
        or_(
            _s.status == "queued",
            and_(
                _s.status == "running",
                or_(_s.lease_owner == bindparam("holder"), _s.lease_expires_at < NOW),
            ),
        ),
    )
    # Started, no longer held unstarted (as an item's claim): ``received_by`` is set on
    # queued rows only, so its partial index never holds the history (0014).
    .values(
        status="running",
        lease_owner=bindparam("holder"),
        lease_expires_at=_EXPIRES,
        received_by=None,
    )
)
_BOTH = (False, True)
# (only while the run goes on, only for the node the ledger recorded, only for the flow
# of the run) -> statement
_CLAIMS = {
    (live, node, flow): _CLAIM_ANY.where(
        *([_run_is(live, flow)] if live or flow else []),
        *([_s.node_id == bindparam("b_node_id")] if node else []),
    )
    for live in _BOTH
    for node in _BOTH
    for flow in _BOTH
}


def _claim_opening(claim: Any) -> Any:
    """PostgreSQL: ``claim`` and the attempt row it opens as one statement, whose one row
    is the number of steps claimed (0 or 1). The INSERT takes its row from the UPDATE's
    RETURNING, so it opens a row iff this very statement claimed the step (not merely
    because this holder held it already), and the batch may carry its COMMIT. Its own
    parameter names (``b_worker``, ``b_task_id``): not columns of ``pf_steps``, which the
    UPDATE would SET."""
    claimed = claim.returning(_s.run_id, _s.step, _s.attempt, _s.lease_owner).cte("claimed")
    rows = _attempt_row(claimed.c, "b_worker", "b_task_id")
    opened = insert(pf_attempts).from_select(_ATTEMPT_COLUMNS, rows).cte("opened")
    return select(func.count()).select_from(claimed).add_cte(opened)


# The same keys as ``_CLAIMS`` -> statement (PostgreSQL)
_CLAIMS_OPENING = {key: _claim_opening(claim) for key, claim in _CLAIMS.items()}
_RENEW = update(pf_steps).where(_HELD).values(lease_expires_at=_EXPIRES)
_TAKE_OVER = (
    update(pf_steps)
    .where(_FENCE, _s.status != "committed")
    .values(
        attempt=_s.attempt + 1,
        status="queued",
        lease_owner=None,
        lease_expires_at=_EXPIRES,
        sent_at=None,
        task_id=None,
        queued_at=NOW,
        # A new attempt's message is held by nobody yet: a mark left by the old one's
        # receiver would have the sweeper count the new one as held by a live worker.
        received_by=None,
    )
)
_TAKE_OVER_EXPIRED = _TAKE_OVER.where(_s.status.in_(("queued", "running")), _LEASE_OVER)
# The holder itself hands its step to a new attempt (a retry): only while it holds it.
# Its ``queued_at`` is when the retry is due (after its backoff), so whoever sends it
# again (a broker loss, a dead receiver, an unsent row) sends it with what is left of
# that wait, and the queue backstop counts from then.
_TAKE_OVER_HELD = _TAKE_OVER.where(_HELD).values(queued_at=NOW + bindparam("due_in"))
# A queued step whose lease ran out was sent but never claimed (a message lost in a dead
# worker's prefetch buffer or a Redis restart, or still waiting in a long queue): nobody
# holds it, so it is sent again under the same attempt; the claim lets one copy run.
_RELEASE_QUEUED = (
    update(pf_steps)
    .where(_FENCE, _s.status == "queued", _LEASE_OVER)
    .values(lease_expires_at=_EXPIRES, queued_at=NOW)
)
_END_ANY_ATTEMPT = (
    update(pf_attempts)
    .where(
        _a.run_id == bindparam("b_run_id"),
        _a.step == bindparam("b_step"),
        _a.attempt == bindparam("b_attempt"),
        _a.ended_at.is_(None),
    )
    .values(ended_at=NOW, outcome=bindparam("outcome"), error_msg=bindparam("err"))
)
_END_ATTEMPT = _END_ANY_ATTEMPT.where(_a.worker == bindparam("b_worker"))
# Only the row of one claim: two deliveries of one attempt in one process share the
# worker id, and the outcome of one (its commit, its loss) is not the other's. A row
# opened before revision 0013 has no holder: its worker's is the best match it has.
_MINE = or_(
    _a.holder == bindparam("b_holder"),
    and_(_a.holder.is_(None), _a.worker == bindparam("b_worker")),
)
_END_HELD_ATTEMPT = _END_ANY_ATTEMPT.where(_MINE)
# The commit or failure of one claim closes every open row of its attempt: the claim's
# own with its outcome, and any other (another delivery of the attempt in the same
# process, frozen, whose claim this one fences out) as ``lost``. One statement, because
# every step commit runs it.
_END_ATTEMPT_FENCING = _END_ANY_ATTEMPT.values(
    outcome=case((_MINE, bindparam("outcome")), else_="lost"),
    error_msg=case((_MINE, bindparam("err")), else_=bindparam("fenced_err")),
)
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
    _SWEEPABLE.where(_s.lease_expires_at < NOW)
    .order_by(_s.lease_expires_at)
    .limit(bindparam("limit"))
)
_UNSENT = (
    _SWEEPABLE.where(
        _s.status == "queued",
        _s.sent_at.is_(None),
        _s.queued_at <= NOW - bindparam("older_than"),
    )
    .order_by(_s.queued_at)
    .limit(bindparam("limit"))
)


def _key(run_id: str, step: int, attempt: int) -> dict[str, Any]:
    return {"b_run_id": run_id, "b_step": step, "b_attempt": attempt}


@cache
def _insert_outbox(dialect: str) -> Insert:
    return insert_ignore(dialect, pf_steps, "run_id", "step").values(_OUTBOX_TIMES)


def insert_step(
    conn: Connection,
    dialect: str,
    run_id: str,
    step: int,
    node_id: str,
    attempt: int,
    lease_s: float | None,
    now: float | None,
) -> bool:
    """The outbox row of a step about to be sent; False if the step has a row already."""
    row = _row(run_id, step, node_id, attempt, None, lease_s, now)
    return conn.execute(_insert_outbox(dialect), row).rowcount == 1


def successor_op(dialect: str, run_id: str, nxt: NextStep, now: float | None) -> Op:
    """The successor's outbox row, inside the commit of its predecessor. Guarded, not a
    plain insert: a stale commit's successor meets the winner's row, and on PostgreSQL
    the batch is sent whole before the fence's row count is seen; the conflict must then
    be a clean loss (rolled back, reported False), not a primary-key error."""
    row = _row(run_id, nxt.step, nxt.node_id, nxt.attempt, nxt.lease_expires_at, nxt.lease_s, now)
    row["queue"] = nxt.queue
    return Op(_insert_outbox(dialect), row, must_hit_one=True)


def _row(
    run_id: str,
    step: int,
    node_id: str,
    attempt: int,
    expires: float | None,
    lease_s: float | None,
    now: float | None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "step": step,
        "node_id": node_id,
        "status": "queued",
        "attempt": attempt,
        "lease_owner": None,
        "sent_at": None,
        "task_id": None,
        "expires": expires,
        "lease_s": lease_s,
        "now": now,
        "queue": None,
    }


def fence_op(run_id: str, step: int, attempt: int, holder: str) -> Op:
    """Mark the step committed iff ``holder``'s claim of ``attempt`` still holds it (G1)."""
    params = _key(run_id, step, attempt)
    params["holder"] = holder
    return Op(_COMMIT, params, must_hit_one=True)


def mark_sent_op(sent: Sequence[tuple[str, int, int, str | None, float | None]]) -> Op:
    """``mark_sent`` for many ``(run_id, step, attempt, task_id, now)`` as one
    executemany (one round trip on PostgreSQL, in a pipeline)."""
    rows = []
    for run_id, step, attempt, task_id, now in sent:
        params = _key(run_id, step, attempt)
        params.update(now=now, task_id=task_id)
        rows.append(params)
    return Op(_MARK_SENT, rows)


def mark_sent_one_op(
    run_id: str, step: int, attempt: int, task_id: str | None, now: float | None
) -> Op:
    """Close the outbox entry: the message of this attempt is with the broker. A guard:
    it misses when the attempt is stale or its message was marked sent already."""
    params = _key(run_id, step, attempt)
    params.update(now=now, task_id=task_id)
    return Op(_MARK_SENT, params, must_hit_one=True)


def claim_reading_run(
    conn: Connection,
    run_id: str,
    step: int,
    attempt: int,
    worker: str,
    holder: str,
    lease_s: float,
    now: float | None,
    task_id: str | None = None,
    *,
    node_id: str | None = None,
    flow: str | None = None,
    if_runnable: bool = False,
    read_run: bool = True,
    retried: bool = False,
    then_read: Op | None = None,
) -> tuple[bool, dict[str, Any] | None, list[tuple[Any, ...]]]:
    """Take the lease for ``attempt`` as ``holder`` and open its ``pf_attempts`` row (of
    ``worker``), in one transaction; with ``read_run``, the run's guard columns
    (``runs.GUARD_COLUMNS``) are read in the same batch first.

    Wins when the row is queued with this attempt, or running under this attempt with an
    expired lease (the broker redelivered a dead worker's message) or under this holder
    (a retried transaction). With ``node_id`` (``flow``), only if the ledger recorded
    that node for the step (that flow for the run): a message cannot choose what runs;
    with ``if_runnable``, only while the run may go on, decided by this statement (G4).
    ``retried``: a try of the same call went before, whose COMMIT may have landed; its
    attempt row is then not opened twice. ``then_read``: a read for the same batch (what
    the step needs once claimed: its Store), whose rows come back when the claim won.

    Returns ``(claimed, run, then_read's rows)``, run None for an unknown run or without
    ``read_run``. One round trip on PostgreSQL for the reads, the claim, the attempt row
    and the COMMIT, because every step makes it (G1, G4)."""
    params = _key(run_id, step, attempt)
    params.update(holder=holder, now=now, lease_s=lease_s, b_node_id=node_id, b_flow=flow)
    key = (if_runnable, node_id is not None, flow is not None)
    ops = [runs.guard_op(run_id)] if read_run else []
    if conn.dialect.name == "postgresql" and not retried:
        # One statement for the claim and its attempt row, and the COMMIT in the batch:
        # a claim that missed wrote nothing at all (``_claim_opening``). Not for a retry:
        # its first try may still be running on the server, and a retry that waited for
        # that try's row lock would win the step again, while one statement's snapshot
        # (the "row open already?" test) predates that try's attempt row.
        opening = _CLAIMS_OPENING[key]
        claim_at = len(ops)
        ops += [Op(opening, {**params, "b_worker": worker, "b_task_id": task_id})]
    else:
        # Its own dict: an UPDATE compiled for parameter names that are column names
        # (task_id) would SET those columns too.
        attempt_params = {**params, "worker": worker, "task_id": task_id}
        claim_at = None
        ops += [Op(_CLAIMS[key], params, must_hit_one=True)]
        ops += [Op(_INSERT_ATTEMPT_ONCE if retried else _INSERT_ATTEMPT, attempt_params)]
    if then_read is not None:
        ops.append(then_read)
    # SQLite stops at a claim that missed (``must_hit_one``), so the read is not run.
    ok, rows = pipeline.run_reading(conn, ops, commit=claim_at is not None)
    claimed = rows[claim_at] == [(1,)] if claim_at is not None else ok
    run = runs.guard_row(rows[0]) if read_run else None
    return claimed, run, rows[-1] if claimed and then_read is not None else []


def renew(
    conn: Connection,
    run_id: str,
    step: int,
    attempt: int,
    holder: str,
    lease_s: float,
    now: float | None,
) -> bool:
    params = _key(run_id, step, attempt)
    params.update(holder=holder, lease_s=lease_s, now=now)
    return conn.execute(_RENEW, params).rowcount == 1


def fail(conn: Connection, f: StepFailure, now: float | None) -> bool:
    """Fail the step and its run in one batch: the step row (iff ``f.holder``'s claim of
    ``f.attempt`` holds it), the attempt row, the events and the run's status, which
    changes only while the run is live (a cancel that landed meanwhile stands, G4).
    False = the claim was lost; the caller rolls back, so nothing of it lands.

    One transaction, as the step commit: a crash half way cannot leave a failed step
    under a run still marked running, which nothing would ever finish.
    """
    params = _key(f.run_id, f.step, f.attempt)
    params["holder"] = f.holder
    ops = [
        Op(_FAIL, params, must_hit_one=True),
        close_attempt_op(
            f.run_id, f.step, f.attempt, f.worker, f.holder, f.outcome, now, f.error_msg
        ),
        events.insert_op(events.rows_of(f.run_id, f.events)),
        *runs.step_update_ops(
            f.run_id, {"status": "failed", "error_msg": f.error_msg, "completed_at": iso_now()}
        ),
    ]
    return pipeline.run(conn, ops)


def failed_by(conn: Connection, f: StepFailure) -> bool:
    """The step row shows ``f`` landed: failed under ``f.attempt`` by ``f.holder`` (only
    that holder's claim can fail the step, and the failure leaves its token in place)."""
    row = get(conn, f.run_id, f.step)
    return (
        row is not None
        and row["status"] == "failed"
        and row["attempt"] == f.attempt
        and row["lease_owner"] == f.holder
    )


#: The outcome of the row a resume writes for the attempt it replaces: a resume of a
#: paused, cancelled or failed run is a new start for the step's crash and try counts
#: (``liveness.crashes``), and a pause or cancel met at the guard, before any claim,
#: leaves no attempt row of its own to say so.
RESUMED_OUTCOME = "resumed"
_RESUMED_NOTE = "the run was resumed: the step's crash and try counts start afresh"


def take_over(
    conn: Connection,
    run_id: str,
    step: int,
    old_attempt: int,
    lease_s: float,
    now: float | None,
    force: bool,
    holder: str | None = None,
    due_in: float = 0.0,
    note: str | None = None,
    fresh_start: bool = False,
) -> int | None:
    """Re-queue the step under ``old_attempt + 1`` (fencing out the old holder). With
    ``holder``: only while that claim holds the step (its own retry, due in ``due_in``
    seconds: ``queued_at``). ``fresh_start`` (a resume): a closed ``resumed`` row of the
    old attempt marks where the step's counts start again."""
    params = _key(run_id, step, old_attempt)
    params.update(now=now, lease_s=lease_s, holder=holder)
    if holder is not None:
        params["due_in"] = due_in
        stmt = _TAKE_OVER_HELD
    else:
        stmt = _TAKE_OVER if force else _TAKE_OVER_EXPIRED
    if conn.execute(stmt, params).rowcount != 1:
        return None
    end_attempt(conn, run_id, step, old_attempt, None, "lost", note, now)
    if fresh_start:
        at = clock(conn) if now is None else now
        marker = {"run_id": run_id, "step": step, "attempt": old_attempt, "started_at": at}
        marker.update(ended_at=at, outcome=RESUMED_OUTCOME, error_msg=_RESUMED_NOTE)
        conn.execute(insert(pf_attempts).values(**marker))
    return old_attempt + 1


def renew_queued(
    conn: Connection, run_id: str, step: int, attempt: int, lease_s: float, now: float | None
) -> bool:
    """Lease an expired, never-claimed step again for its resend (one sweeper wins)."""
    params = _key(run_id, step, attempt)
    params.update(now=now, lease_s=lease_s)
    return conn.execute(_RELEASE_QUEUED, params).rowcount == 1


def _end_attempt(
    run_id: str,
    step: int,
    attempt: int,
    worker: str | None,
    outcome: str,
    now: float | None,
    error_msg: str | None,
    holder: str | None,
) -> Op:
    """The statement closing the open row(s) of this attempt: ``holder``'s claim's, else
    every row of ``worker``, else every row."""
    params = _key(run_id, step, attempt)
    params.update(now=now, outcome=outcome, err=error_msg, b_worker=worker, b_holder=holder)
    if holder is not None:
        return Op(_END_HELD_ATTEMPT, params)
    return Op(_END_ANY_ATTEMPT if worker is None else _END_ATTEMPT, params)


def end_attempt_op(
    run_id: str,
    step: int,
    attempt: int,
    worker: str,
    outcome: str,
    now: float | None,
    error_msg: str | None = None,
    *,
    holder: str | None = None,
) -> Op:
    """Closing an attempt's row as part of a batch (the step commit or failure): the row
    of ``holder``'s claim (default: the claim made without a holder token, ``worker``)."""
    return _end_attempt(run_id, step, attempt, worker, outcome, now, error_msg, holder or worker)


def close_attempt_op(
    run_id: str,
    step: int,
    attempt: int,
    worker: str | None,
    holder: str,
    outcome: str,
    now: float | None,
    error_msg: str | None = None,
) -> Op:
    """Closing, in the batch that commits or fails the step for ``holder``'s claim, the
    claim's attempt row with ``outcome``, and every other row of the same attempt still
    open as ``lost``: another delivery of the attempt in the same process, frozen, whose
    claim this commit fences out (G1). It may never wake to close its row itself, and
    the sweeper looks only at steps not yet committed: left open, the monitor would show
    it running for ever. ``lost``, not a crash: its worker lives on."""
    params = _key(run_id, step, attempt)
    params.update(
        now=now,
        outcome=outcome,
        err=error_msg,
        b_worker=worker,
        b_holder=holder,
        fenced_err=f"fenced out by {holder}",
    )
    return Op(_END_ATTEMPT_FENCING, params)


def end_attempt(
    conn: Connection,
    run_id: str,
    step: int,
    attempt: int,
    worker: str | None,
    outcome: str,
    error_msg: str | None,
    now: float | None,
    holder: str | None = None,
) -> bool:
    """Close the open ``pf_attempts`` row of ``holder``'s claim of this attempt; without a
    holder, every open row of ``worker`` (or of anyone, if None too): a take-over ends
    whichever claims it fenced out."""
    op = _end_attempt(run_id, step, attempt, worker, outcome, now, error_msg, holder)
    return conn.execute(op.stmt, op.params).rowcount > 0


def get(conn: Connection, run_id: str, step: int) -> dict[str, Any] | None:
    row = conn.execute(_GET, {"b_run_id": run_id, "b_step": step}).mappings().first()
    return dict(row) if row is not None else None


def task_ids(conn: Connection, run_id: str) -> list[str]:
    return list(conn.execute(_TASK_IDS, {"run_id": run_id}).scalars())


def attempts(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(_GET_ATTEMPTS, {"run_id": run_id}).mappings()]


def clock(conn: Connection) -> float:
    return float(conn.execute(DB_CLOCK).scalar_one())


def expired(conn: Connection, now: float | None, limit: int) -> list[dict[str, Any]]:
    rows = conn.execute(_EXPIRED, {"now": now, "limit": limit}).mappings()
    return [dict(r) for r in rows]


def unsent(
    conn: Connection, older_than_s: float, now: float | None, limit: int
) -> list[dict[str, Any]]:
    params = {"older_than": older_than_s, "now": now, "limit": limit}
    return [dict(r) for r in conn.execute(_UNSENT, params).mappings()]
