"""Recovery queries on ``pf_items`` and ``pf_joins`` for the sweeper (G3): items never
published, items whose holder or receiver died or whose lease ran out, sent items nobody
reported holding, complete joins whose step is still parked, and the bulk re-send after a
broker loss. Like ``liveness`` for steps, every query starts from the live runs and seeks
their active items (``ix_pf_items_active``), so finished runs cost nothing; every
transition is a compare-and-set on the item's attempt, so of several sweepers one acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Float, and_, bindparam, case, func, literal, or_, select, tuple_, update
from sqlalchemy.engine import Connection

from pocoflow.commit import PARKED_OWNER
from pocoflow.ledger import common
from pocoflow.ledger.common import NOW, DbEpoch
from pocoflow.ledger.items import ITEM_FENCE, REQUEUE_JOIN_STEP, item_key, join_state
from pocoflow.ledger.tables import (
    ACTIVE_ITEM_STATUSES,
    LIVE_RUN_STATUSES,
    literal_in,
    pf_items,
    pf_joins,
    pf_runs,
    pf_steps,
    pf_workers,
)

#: How long the process publishing a step's items (``sending_by``) is trusted to be
#: doing so while it beats: ten thousand messages take a few seconds, so a minute means
#: the publish never happened (the process failed between the commit and its publish,
#: yet lives on), and the sweeper sends them; a copy too many is refused by the claim.
PUBLISH_WINDOW_S = 60.0

_i = pf_items.c
_j = pf_joins.c
_s = pf_steps.c
_r = pf_runs.c
_w = pf_workers.c

# When an item was last handed out: now, or its due time if later (a retry's backoff).
_SENT_ANEW = case((_i.queued_at > DbEpoch(), _i.queued_at), else_=DbEpoch())

_LIVE_RUN_IDS = select(_r.run_id).where(literal_in(_r.status, LIVE_RUN_STATUSES))
_LIVE_ITEMS = and_(
    _i.run_id.in_(_LIVE_RUN_IDS),
    literal_in(_i.status, ACTIVE_ITEM_STATUSES),
)
_WITH_RUN = (
    select(pf_items.c.run_id, _i.step, _i.idx, _i.attempt, _i.try_number, _i.status, _i.crashes)
    .add_columns(_i.lease_owner, _i.received_by, _i.queued_at, _i.sent_at, _i.error_json)
    # The step's queue (its node's ``queue``), else the run's: where its items go too.
    .add_columns(_r.flow_name, func.coalesce(_s.queue, _r.queue).label("queue"))
    .add_columns(_s.node_id)
    .join(pf_runs, _r.run_id == _i.run_id)
    .join(pf_steps, and_(_s.run_id == _i.run_id, _s.step == _i.step))
)


def unsent(
    conn: Connection, older_than_s: float, dead_after_s: float, now: float | None, limit: int
) -> list[dict[str, Any]]:
    """Queued items of live runs whose message was never published (the fan-out's or a
    retry's publisher died, the broker was down), due more than ``older_than_s`` ago,
    unless the process publishing the step's items (``sending_by``) still beats and they
    were queued less than ``PUBLISH_WINDOW_S`` ago: a thousand messages take longer than
    the grace, and re-sending them would double them."""
    clock = DbEpoch() if now is None else literal(float(now), Float)
    publishing = (
        select(_j.run_id)
        .join(pf_workers, _w.worker_id == _j.sending_by)
        .where(_j.run_id == _i.run_id, _j.step == _i.step, _w.beat_at >= clock - dead_after_s)
        .where(_i.queued_at >= clock - PUBLISH_WINDOW_S)
        .exists()
    )
    stmt = (
        _WITH_RUN.where(
            _LIVE_ITEMS,
            _i.status == "queued",
            _i.sent_at.is_(None),
            _i.queued_at <= NOW - bindparam("older_than"),
            ~publishing,
        )
        .order_by(_i.run_id, _i.step, _i.idx)
        .limit(limit)
    )
    return [
        dict(r) for r in conn.execute(stmt, {"older_than": older_than_s, "now": now}).mappings()
    ]


def _silent(match: Any, dead_after_s: float, now: float | None) -> Any:
    """Some worker process matched by ``match`` stopped beating ``dead_after_s`` ago."""
    clock = DbEpoch() if now is None else literal(float(now), Float)
    return select(_w.worker_id).where(match, _w.beat_at < clock - dead_after_s).exists()


# A claim's holder token is ``<worker id>#<n>`` (see the executor).
_HOLDER_IS_WORKER = or_(
    _i.lease_owner == _w.worker_id,
    func.substr(_i.lease_owner, 1, func.length(_w.worker_id) + 1) == _w.worker_id + "#",
)


def orphaned(
    conn: Connection, dead_after_s: float, now: float | None, limit: int
) -> list[dict[str, Any]]:
    """Items of live runs nobody works on: running under a lease that expired or a
    holder whose process stopped beating, or queued in a dead process's prefetch buffer
    (``received_by``): the sweeper takes them over or sends them again (G3)."""
    expired = and_(_i.status == "running", _i.lease_expires_at < NOW)
    holder_dead = and_(_i.status == "running", _silent(_HOLDER_IS_WORKER, dead_after_s, now))
    receiver_dead = and_(
        _i.status == "queued",
        _i.received_by.is_not(None),
        _silent(_w.worker_id == _i.received_by, dead_after_s, now),
    )
    stmt = _WITH_RUN.where(_LIVE_ITEMS, or_(expired, holder_dead, receiver_dead))
    stmt = stmt.order_by(_i.run_id, _i.step, _i.idx).limit(limit)
    return [dict(r) for r in conn.execute(stmt, {"now": now}).mappings()]


def take_over(
    conn: Connection,
    run_id: str,
    step: int,
    idx: int,
    attempt: int,
    owner: str | None,
    crashed: bool = False,
) -> int | None:
    """Re-queue a running item whose holder is gone under ``attempt + 1`` (fencing the
    holder out, G1), counting a crash if its process died; None if it moved on meanwhile
    (committed, renewed by a new claim)."""
    stmt = (
        update(pf_items)
        .where(ITEM_FENCE, _i.status == "running", _i.lease_owner == bindparam("b_owner"))
        .values(
            attempt=_i.attempt + 1,
            status="queued",
            lease_owner=None,
            lease_expires_at=None,
            sent_at=None,
            received_by=None,
            queued_at=NOW,
            crashes=_i.crashes + bindparam("b_crashed"),
        )
    )
    params = {**item_key(run_id, step, idx, attempt), "b_owner": owner, "now": None}
    params["b_crashed"] = int(crashed)
    return attempt + 1 if conn.execute(stmt, params).rowcount == 1 else None


def release_received(
    conn: Connection, run_id: str, step: int, idx: int, attempt: int, receiver: str
) -> bool:
    """A dead process held the item's message unstarted: forget it, for a re-send under
    the same attempt (one sweeper wins)."""
    stmt = (
        update(pf_items)
        .where(ITEM_FENCE, _i.status == "queued", _i.received_by == bindparam("b_receiver"))
        .values(received_by=None, queued_at=_SENT_ANEW)
    )
    return (
        conn.execute(
            stmt, {**item_key(run_id, step, idx, attempt), "b_receiver": receiver}
        ).rowcount
        == 1
    )


_MARK_RECEIVED = (
    update(pf_items)
    .where(ITEM_FENCE, _i.status == "queued")
    .where(or_(_i.received_by.is_(None), _i.received_by != bindparam("b_worker")))
    .values(received_by=bindparam("b_worker"))
)


def mark_received(
    conn: Connection, worker: str, received: Sequence[tuple[str, int, int, int]]
) -> None:
    """``worker`` holds these item messages unstarted (its heartbeat tells)."""
    if received:
        conn.execute(_MARK_RECEIVED, [{**item_key(*key), "b_worker": worker} for key in received])


def unmark_received(
    conn: Connection, worker: str, released: Sequence[tuple[str, int, int, int]]
) -> None:
    """``worker`` no longer holds these item messages (started, or lost inside it)."""
    key = ("run_id", "step", "idx", "attempt")
    common.unmark_received(conn, pf_items, key, worker, list(released))


# Some live run fanned out: its items, and only they, are what an item sweep looks at.
_ANY_LIVE_JOIN = select(_j.run_id).where(_j.run_id.in_(_LIVE_RUN_IDS)).limit(1)


def any_live_fan_out(conn: Connection) -> bool:
    """Some live run has a join row. A fan-out writes its items and its join in one
    transaction and neither goes away while the run lives, so without one there is no
    item to sweep: one seek instead of the item sweep's four queries."""
    return conn.execute(_ANY_LIVE_JOIN).first() is not None


def stranded_joins(conn: Connection, limit: int) -> list[dict[str, Any]]:
    """Parked steps of live runs whose count is complete (a backstop: a commit that
    completed it always re-queues the step or finds it held by a resumer, who joins)."""
    stmt = (
        select(_s.run_id, _s.step)
        .join(pf_joins, and_(_j.run_id == _s.run_id, _j.step == _s.step))
        .where(
            _s.run_id.in_(_LIVE_RUN_IDS),
            _s.status == "running",
            _s.lease_owner == PARKED_OWNER,
            _j.done >= _j.total,
        )
        .limit(limit)
    )
    return [dict(r) for r in conn.execute(stmt).mappings()]


def requeue_join(
    conn: Connection, run_id: str, step: int, lease_s: float, now: float | None
) -> dict[str, Any] | None:
    """Re-queue a stranded join's step (see ``stranded_joins``); its state if it did."""
    params = {"b_run_id": run_id, "b_step": step, "lease_s": lease_s, "now": now}
    if conn.execute(REQUEUE_JOIN_STEP, params).rowcount != 1:
        return None
    return join_state(conn, run_id, step)


def queued_page(
    conn: Connection, after: tuple[str, int, int] | None, limit: int
) -> list[dict[str, Any]]:
    """Queued items of live runs whose message went to the broker, in key order after
    ``after``: what a broker that lost its messages must get again (keyset pages)."""
    stmt = _WITH_RUN.where(_LIVE_ITEMS, _i.status == "queued", _i.sent_at.is_not(None))
    if after is not None:
        stmt = stmt.where(
            tuple_(_i.run_id, _i.step, _i.idx)
            > tuple_(literal(after[0]), literal(after[1]), literal(after[2]))
        )
    stmt = stmt.order_by(_i.run_id, _i.step, _i.idx).limit(limit)
    return [dict(r) for r in conn.execute(stmt, {"now": None}).mappings()]


def stale_queued(
    conn: Connection, older_than_s: float, now: float | None, limit: int
) -> list[dict[str, Any]]:
    """Queued items of live runs that no live process reported holding, sent more than
    ``older_than_s`` ago: lost with a process killed within a beat of receiving them,
    before its heartbeat could tell (or in a broker that lost them)."""
    stmt = _WITH_RUN.where(
        _LIVE_ITEMS,
        _i.status == "queued",
        _i.received_by.is_(None),
        _i.sent_at <= NOW - bindparam("older_than"),
    )
    stmt = stmt.order_by(_i.sent_at).limit(limit)
    params = {"older_than": older_than_s, "now": now}
    return [dict(r) for r in conn.execute(stmt, params).mappings()]


def unsend(
    conn: Connection,
    run_id: str,
    step: int,
    idx: int,
    attempt: int,
    sent_at: float,
    settled_s: float,
) -> bool:
    """A message a gone worker took unrecorded (``distributed.orphans``): make the item an
    outbox row again (``sent_at`` NULL, handed out now: the unsent pass keeps its grace),
    so that whoever sends it marks it sent and, if nobody does, the unsent pass sends it;
    one sweeper wins (compare-and-set on the ``sent_at`` it read). Not an item handed out
    in the last ``settled_s``: its old entry is only an old copy."""
    stmt = (
        update(pf_items)
        .where(
            ITEM_FENCE,
            _i.status == "queued",
            _i.received_by.is_(None),
            _i.sent_at == bindparam("b_seen"),
            _i.queued_at <= DbEpoch() - bindparam("b_settled"),
        )
        .values(sent_at=None, queued_at=_SENT_ANEW)
    )
    params = {**item_key(run_id, step, idx, attempt), "b_seen": sent_at, "b_settled": settled_s}
    return conn.execute(stmt, params).rowcount == 1


def resend(
    conn: Connection, run_id: str, step: int, idx: int, attempt: int, sent_at: float
) -> bool:
    """Undo ``unsend`` (another sweeper owned the message after all): the item is marked
    sent again as it was, unless someone sent it meanwhile."""
    stmt = (
        update(pf_items).where(ITEM_FENCE, _i.sent_at.is_(None)).values(sent_at=bindparam("b_seen"))
    )
    params = {**item_key(run_id, step, idx, attempt), "b_seen": sent_at}
    return conn.execute(stmt, params).rowcount == 1


def touch_queued(
    conn: Connection, run_id: str, step: int, idx: int, attempt: int, sent_at: float
) -> bool:
    """Restart a stale item's clock (``sent_at``) for its re-send under the same attempt;
    one sweeper wins (compare-and-set on the ``sent_at`` it read)."""
    stmt = (
        update(pf_items)
        .where(ITEM_FENCE, _i.status == "queued", _i.sent_at == bindparam("b_seen"))
        .values(sent_at=NOW, queued_at=_SENT_ANEW)
    )
    params = {**item_key(run_id, step, idx, attempt), "b_seen": sent_at, "now": None}
    return conn.execute(stmt, params).rowcount == 1
