"""Queries on ``pf_signals``: values sent to runs and the steps that wait for them.

Parking a waiting step and sending its value race each other: the value may arrive
between the node raising ``WaitingFor`` and the run being marked ``waiting``. Both
transactions therefore begin by writing the run row, which serialises them on its row
lock (PostgreSQL) or the write lock (SQLite), and only then read ``pf_signals`` in a
statement of their own, whose snapshot (READ COMMITTED) is taken after the lock was
granted. So whichever commits second sees the first: a park that comes second finds the
value and does not park (the node runs again at once); a send that comes second finds the
run waiting on its key and wakes it. Never a value stored beside a run that sleeps on.

A parked step keeps its ``pf_steps`` row, queued under a new attempt (fencing out the
delivery that parked it) with no lease and ``sent_at`` set, which no sweep selects: no
worker holds it and nothing re-sends it while the run waits. Waking writes it back as an
unsent outbox row leased from now, so a waker that dies before publishing is covered by
the sweeper's unsent pass (G3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, bindparam, case, func, insert, select, update
from sqlalchemy.engine import Connection

from pocoflow.ledger import events, runs, steps
from pocoflow.ledger.common import NOW
from pocoflow.ledger.tables import (
    LIVE_RUN_STATUSES,
    literal_in,
    pf_runs,
    pf_signals,
    pf_steps,
)
from pocoflow.waiting import LOST, PARKED, SIGNALLED, STOPPED

#: Outcome of the attempt that parked its step (``pf_attempts.outcome``).
WAITING_OUTCOME = "waiting"
#: The runs a send is accepted for: every run that may still go on. A failed run is
#: resumable, and one that failed because its wait timed out can only succeed on resume
#: with the value it lacked; completed and cancelled runs take none.
TAKES_VALUES = ("queued", "running", "paused", "waiting", "failed")

_g = pf_signals.c
_r = pf_runs.c
_s = pf_steps.c
_KEY = (_g.run_id == bindparam("b_run_id")) & (_g.key == bindparam("b_key"))
_TIMEOUT = bindparam("timeout", type_=Float)
_GET = select(
    _g.value_json,
    _g.waiting_step,
    _g.wait_until,
    case((_g.wait_until <= NOW, 1), else_=0).label("expired"),
).where(_KEY)
_RUN = update(pf_runs).where(_r.run_id == bindparam("b_run_id"))
_TO_WAITING = _RUN.where(_r.status == "running", _r.control.is_(None)).values(
    status="waiting", updated_at=bindparam("stamp")
)
# Takes the run row's lock without changing it: ``updated_at`` is the write token of the
# run's transitions (``WorkflowDB.update_run_if``), which a send must not wipe.
_LOCK_UNFINISHED = _RUN.where(_r.status.in_(TAKES_VALUES)).values(status=_r.status)
_TO_RUNNING = _RUN.where(_r.status == "waiting").values(
    status="running", updated_at=bindparam("stamp")
)
_INSERT_WAIT = insert(pf_signals).values(
    run_id=bindparam("b_run_id"),
    key=bindparam("b_key"),
    waiting_step=bindparam("step"),
    wait_until=NOW + _TIMEOUT,
    created_at=NOW,
)
# A wait keeps the deadline of the first wait on the key: a run woken by its timeout
# whose node waits again raises TimeoutError, not a fresh wait.
_REWAIT = (
    update(pf_signals)
    .where(_KEY)
    .values(waiting_step=bindparam("step"), wait_until=func.coalesce(_g.wait_until, NOW + _TIMEOUT))
)
_INSERT_VALUE = insert(pf_signals).values(
    run_id=bindparam("b_run_id"),
    key=bindparam("b_key"),
    value_json=bindparam("value"),
    sent_at=NOW,
    created_at=NOW,
)
_SET_VALUE = (
    update(pf_signals)
    .where(_KEY, _g.value_json.is_(None))
    .values(value_json=bindparam("value"), sent_at=NOW, waiting_step=None)
)
_UNPARK = update(pf_signals).where(_KEY).values(waiting_step=None)
_STEP = (_s.run_id == bindparam("b_run_id")) & (_s.step == bindparam("b_step"))
# The delivery that parks hands its step over to a new attempt nobody holds: no lease (an
# expiry sweep ignores NULL), marked sent (the unsent sweep ignores it), nobody received.
_PARK_STEP = (
    update(pf_steps)
    .where(
        _STEP,
        _s.attempt == bindparam("b_attempt"),
        _s.status == "running",
        _s.lease_owner == bindparam("holder"),
    )
    .values(
        attempt=_s.attempt + 1,
        status="queued",
        lease_owner=None,
        lease_expires_at=None,
        sent_at=NOW,
        task_id=None,
        received_by=None,
        queued_at=NOW,
    )
)
# Waking makes it an unsent outbox row leased from now: published by the waker, or by
# the sweeper's unsent pass if the waker dies first (G3).
_UNPARK_STEP = (
    update(pf_steps)
    .where(_STEP, _s.status == "queued")
    .values(
        lease_expires_at=NOW + bindparam("lease_s", type_=Float),
        sent_at=None,
        queued_at=NOW,
    )
)
# Waits of distributed runs whose deadline passed: the sweeper wakes them. From the live
# runs (partial index ix_pf_runs_live), as every sweeper query.
_EXPIRED_WAITS = (
    select(_g.run_id, _g.key)
    .join(pf_runs, _r.run_id == _g.run_id)
    .where(
        literal_in(_r.status, LIVE_RUN_STATUSES),
        _r.status == "waiting",
        _r.queue.is_not(None),
        _g.waiting_step.is_not(None),
        _g.value_json.is_(None),
        _g.wait_until <= NOW,
    )
    .limit(bindparam("limit"))
)
_LIST = select(pf_signals).where(_g.run_id == bindparam("b_run_id")).order_by(_g.created_at)


@dataclass(frozen=True)
class StepFence:
    """The claim a distributed delivery holds on its step: parking hands the step over
    only while this claim still holds it (G1)."""

    attempt: int
    holder: str
    worker: str


@dataclass(frozen=True)
class Wake:
    """A distributed run set running again: the step message to publish (its outbox row
    is written, unsent, in the same transaction). ``outboxed`` False: the parked step row
    was not found as parked; the caller sends the run's outstanding step afresh."""

    run_id: str
    flow: str
    step: int
    node_id: str
    attempt: int
    queue: str | None
    outboxed: bool = True


def _params(run_id: str, key: str, now: float | None, **more: Any) -> dict[str, Any]:
    return {"b_run_id": run_id, "b_key": key, "now": now, **more}


def get(conn: Connection, run_id: str, key: str, now: float | None) -> dict[str, Any] | None:
    """``value_json``, ``waiting_step``, ``wait_until`` and ``expired`` (1 once the wait's
    deadline passed on the database's clock) of one key, or None."""
    row = conn.execute(_GET, _params(run_id, key, now)).mappings().first()
    return dict(row) if row is not None else None


def park(
    conn: Connection,
    run_id: str,
    key: str,
    step: int,
    timeout_s: float | None,
    stamp: str,
    now: float | None,
    fence: StepFence | None,
    event_rows: list[dict[str, Any]],
) -> str:
    """Mark the run ``waiting`` for ``key`` at ``step`` (see the module docstring for the
    order of the statements). Returns PARKED, or why not (SIGNALLED, STOPPED, LOST:
    ``pocoflow.waiting``); the caller rolls back then."""
    params = _params(run_id, key, now, stamp=stamp, step=step, timeout=timeout_s)
    if conn.execute(_TO_WAITING, params).rowcount != 1:
        return STOPPED
    row = get(conn, run_id, key, now)  # after the run row's lock: sees any send before
    if row is not None and row["value_json"] is not None:
        return SIGNALLED
    conn.execute(_INSERT_WAIT if row is None else _REWAIT, params)
    if fence is not None:
        held = {
            "b_run_id": run_id,
            "b_step": step,
            "b_attempt": fence.attempt,
            "holder": fence.holder,
            "now": now,
        }
        if conn.execute(_PARK_STEP, held).rowcount != 1:
            return LOST
        steps.end_attempt(
            conn,
            run_id,
            step,
            fence.attempt,
            fence.worker,
            WAITING_OUTCOME,
            None,
            now,
            fence.holder,
        )
    events.insert_rows(conn, events.rows_of(run_id, event_rows))
    return PARKED


def parked_by(conn: Connection, run_id: str, key: str, step: int, now: float | None) -> bool:
    """After a park whose COMMIT outcome was lost: does the ledger show it landed?"""
    run = runs.get(conn, run_id)
    row = get(conn, run_id, key, now)
    return (
        run is not None
        and run["status"] == "waiting"
        and row is not None
        and row["value_json"] is None
        and row["waiting_step"] == step
    )


def send(
    conn: Connection,
    run_id: str,
    key: str,
    text: str,
    stamp: str,
    lease_s: float,
    now: float | None,
    event_rows: list[dict[str, Any]],
) -> tuple[str, Wake | None]:
    """Store ``text`` as the value of ``key``; wake the run if it waits on that key.

    Returns ``("sent", wake)`` (``wake`` None: nobody waited on the key, or the run ran
    in a process, which ``flow.resume`` continues), else ``("unknown", None)``,
    ``("finished", None)`` or ``("duplicate", None)``, nothing written.
    """
    params = _params(run_id, key, now, stamp=stamp, value=text)
    if conn.execute(_LOCK_UNFINISHED, params).rowcount != 1:  # locks the run row
        return ("finished" if runs.exists(conn, run_id) else "unknown"), None
    row = get(conn, run_id, key, now)
    if row is None:
        conn.execute(_INSERT_VALUE, params)
    elif row["value_json"] is not None:
        return "duplicate", None
    else:
        conn.execute(_SET_VALUE, params)
    events.insert_rows(conn, events.rows_of(run_id, event_rows))
    if row is None or row["waiting_step"] is None:
        return "sent", None
    return "sent", _wake(conn, run_id, row["waiting_step"], stamp, lease_s, now)


def wake_expired(
    conn: Connection,
    run_id: str,
    key: str,
    stamp: str,
    lease_s: float,
    now: float | None,
    event_rows: list[dict[str, Any]],
) -> Wake | None:
    """Wake a run whose wait for ``key`` passed its deadline with no value (the sweeper);
    its node runs again and ``wait_for`` raises TimeoutError. None if a send or another
    sweeper came first (the caller rolls back)."""
    params = _params(run_id, key, now, stamp=stamp)
    if conn.execute(_TO_RUNNING, params).rowcount != 1:  # locks the run row
        return None
    row = get(conn, run_id, key, now)
    if (
        row is None
        or row["value_json"] is not None
        or row["waiting_step"] is None
        or not row["expired"]
    ):
        return None
    conn.execute(_UNPARK, params)
    events.insert_rows(conn, events.rows_of(run_id, event_rows))
    return _wake(conn, run_id, row["waiting_step"], stamp, lease_s, now, running=True)


def _wake(
    conn: Connection,
    run_id: str,
    step: int,
    stamp: str,
    lease_s: float,
    now: float | None,
    *,
    running: bool = False,
) -> Wake | None:
    """A waiting distributed run: running again, its parked step an unsent outbox row.
    A run that ran in a process (no queue) stays ``waiting`` for ``flow.resume``."""
    run = runs.get(conn, run_id)
    if run is None or not run.get("queue"):
        return None
    if not running:
        if run["status"] != "waiting":
            return None
        conn.execute(_TO_RUNNING, {"b_run_id": run_id, "stamp": stamp})
    moved = conn.execute(
        _UNPARK_STEP, {"b_run_id": run_id, "b_step": step, "lease_s": lease_s, "now": now}
    )
    row = steps.get(conn, run_id, step)
    if moved.rowcount != 1 or row is None:
        return Wake(run_id, run["flow_name"], step, "", 0, run["queue"], outboxed=False)
    return Wake(run_id, run["flow_name"], step, row["node_id"], row["attempt"], run["queue"])


def expired_waits(conn: Connection, now: float | None, limit: int) -> list[tuple[str, str]]:
    rows = conn.execute(_EXPIRED_WAITS, {"now": now, "limit": limit})
    return [(r.run_id, r.key) for r in rows]


def list_rows(conn: Connection, run_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(_LIST, {"b_run_id": run_id}).mappings()]
