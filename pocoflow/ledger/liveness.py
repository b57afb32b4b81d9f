"""Queries for fast, bounded recovery (G3): worker heartbeats, the steps a dead worker
held (running or only received), poison counting and the bulk re-send after a broker
lost its messages.

Every time compared across hosts is the database's clock (``db_clock``), never a host's:
a worker whose clock runs ahead must not declare live workers dead. Tests inject ``now``
(a number) instead, exactly as the ``pf_steps`` functions take it.

Called through the ``LedgerClient`` plumbing of the ``WorkflowDB`` a worker already holds
(one transaction per call, lock retries, errors naming the run): see the facade
functions at the bottom.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import Float, and_, bindparam, case, func, literal, or_, select, tuple_, update
from sqlalchemy.engine import Connection

from pocoflow.ledger import itemrecovery, steps
from pocoflow.ledger.common import DbEpoch, insert_ignore, unmark_received
from pocoflow.ledger.tables import (
    ACTIVE_STEP_STATUSES,
    LIVE_RUN_STATUSES,
    literal_in,
    pf_runs,
    pf_steps,
    pf_workers,
)

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

    from pocoflow.ledger.client import LedgerClient

_s = pf_steps.c
_w = pf_workers.c
_r = pf_runs.c
# Every per-sweep query starts from the live runs and seeks their unfinished steps
# (ix_pf_runs_live, ix_pf_steps_active, predicates repeated literally so the planners
# use the partial indexes), as steps.py's sweeper queries do: their cost follows the
# runs in flight, not the finished and parked runs the ledger keeps.
_SWEEPABLE = and_(
    _s.run_id.in_(select(_r.run_id).where(literal_in(_r.status, LIVE_RUN_STATUSES))),
    literal_in(_s.status, ACTIVE_STEP_STATUSES),
)

#: The row a resume writes for the attempt it replaces (``steps.take_over``).
RESUMED_OUTCOME = steps.RESUMED_OUTCOME
#: Outcomes after which a step only goes on through a resume, which starts afresh: crash
#: counting (and the try number) restart after them.
FRESH_START_AFTER = frozenset({"failed", "refused", "cancelled", "terminated", RESUMED_OUTCOME})
#: The outcome ``take_over`` records for the attempt of a holder that stopped answering.
CRASHED_OUTCOME = "lost"
#: The ``error_msg`` of an attempt lost because its worker process stopped beating: only
#: those count toward the poison limit. An attempt lost while its worker lived on (a
#: ledger error, a connection killed mid-commit, a refused late commit) says nothing
#: about the node, and counting it failed healthy runs under pg_terminate_backend.
WORKER_DIED = "its worker process stopped beating"
#: The outcome of an attempt that the executor ended on an exception of its own (not the
#: node's): a Store that cannot be loaded, a codec error. It would fail the same way on
#: every worker, so it counts toward the poison limit as a worker death does.
EXECUTOR_CRASHED = "crashed"


def db_clock(now: float | None) -> ColumnElement[float]:
    """``now`` as a bound number when a test injects it, else the database's clock."""
    return DbEpoch() if now is None else literal(float(now), Float)


# ── heartbeats ───────────────────────────────────────────────────────────────

_KEY = and_(
    _s.run_id == bindparam("b_run_id"),
    _s.step == bindparam("b_step"),
    _s.attempt == bindparam("b_attempt"),
)
_MARK_RECEIVED = (
    update(pf_steps)
    .where(
        _KEY, _s.status == "queued", or_(_s.received_by.is_(None), _s.received_by != bindparam("w"))
    )
    .values(received_by=bindparam("w"))
)


def beat(
    conn: Connection,
    dialect: str,
    worker: str,
    host: str,
    pid: int,
    received: list[tuple[Any, ...]],
    now: float | None,
    released: list[tuple[Any, ...]] = (),  # type: ignore[assignment]
) -> None:
    """Record that ``worker`` is alive, that it holds the (not started) messages
    ``received`` = ``[(run_id, step, attempt)]`` of steps and ``[(run_id, step, idx,
    attempt)]`` of map items, and no longer holds ``released`` (started, or lost inside
    the process: handed to a pool child that died): one transaction, off the step's path.
    A mark left on a message the process lost would have the sweeper take it for held by
    a live worker, and wait for the queue backstop."""
    clock = db_clock(now)
    hit = conn.execute(
        update(pf_workers).where(_w.worker_id == worker).values(beat_at=clock)
    ).rowcount
    if not hit:
        row = {"worker_id": worker, "host": host, "pid": pid, "started_at": clock, "beat_at": clock}
        conn.execute(insert_ignore(dialect, pf_workers, "worker_id").values(**row))
    held_steps = [
        {"b_run_id": r, "b_step": st, "b_attempt": a, "w": worker}
        for r, st, a in (key for key in received if len(key) == 3)
    ]
    if held_steps:
        conn.execute(_MARK_RECEIVED, held_steps)
    itemrecovery.mark_received(conn, worker, [key for key in received if len(key) == 4])
    released_steps = [key for key in released if len(key) == 3]
    unmark_received(conn, pf_steps, ("run_id", "step", "attempt"), worker, released_steps)
    itemrecovery.unmark_received(conn, worker, [key for key in released if len(key) == 4])


def bury(conn: Connection, worker: str) -> None:
    """A worker stopping cleanly: dead at once, so what it received is sent again now."""
    conn.execute(update(pf_workers).where(_w.worker_id == worker).values(beat_at=0.0))


def prune(conn: Connection, older_than_s: float, now: float | None) -> int:
    """Forget workers silent for ``older_than_s`` (their steps were recovered long ago)."""
    stmt = pf_workers.delete().where(_w.beat_at < db_clock(now) - older_than_s)
    return conn.execute(stmt).rowcount


# ── what dead workers held ───────────────────────────────────────────────────


def _dead(is_worker: Any, dead_after_s: float, now: float | None) -> Any:
    silent = select(_w.worker_id).where(is_worker, _w.beat_at < db_clock(now) - dead_after_s)
    return silent.exists()


# A running step's lease owner is the claim's holder token, ``<worker id>#<n>`` (one per
# delivery, see executor), or the worker id itself (``claim_step`` without a holder).
_HOLDER_IS_WORKER = or_(
    _s.lease_owner == _w.worker_id,
    func.substr(_s.lease_owner, 1, func.length(_w.worker_id) + 1) == _w.worker_id + "#",
)


def dead_holder_queries(dead_after_s: float, now: float | None) -> tuple[Any, Any]:
    """(running steps whose holder is silent, queued steps whose receiver is silent)."""
    running = select(pf_steps).where(
        _SWEEPABLE, _s.status == "running", _dead(_HOLDER_IS_WORKER, dead_after_s, now)
    )
    received = select(pf_steps).where(
        _SWEEPABLE,
        _s.status == "queued",
        _s.received_by.is_not(None),
        _dead(_w.worker_id == _s.received_by, dead_after_s, now),
    )
    return running, received


def dead_holders(
    conn: Connection, dead_after_s: float, now: float | None, limit: int
) -> list[dict[str, Any]]:
    """Steps of live runs that a silent worker process was running (lease owner) or held
    unstarted (received), whatever their lease says: the sweeper recovers them now."""
    running, received = dead_holder_queries(dead_after_s, now)
    rows = [dict(r) for r in conn.execute(running.limit(limit)).mappings()]
    rows += [dict(r) for r in conn.execute(received.limit(limit)).mappings()]
    return rows


def take_over_dead(
    conn: Connection, run_id: str, step: int, attempt: int, owner: str, lease_s: float
) -> int | None:
    """Re-queue a step whose lease ``owner`` died under ``attempt + 1`` (fencing it out,
    G1) and end its attempt as lost; None if the step moved on meanwhile."""
    clock = DbEpoch()
    stmt = (
        update(pf_steps)
        .where(
            _s.run_id == run_id,
            _s.step == step,
            _s.attempt == attempt,
            _s.status == "running",
            _s.lease_owner == owner,
        )
        .values(
            attempt=_s.attempt + 1,
            status="queued",
            lease_owner=None,
            lease_expires_at=clock + lease_s,
            sent_at=None,
            task_id=None,
            received_by=None,
            queued_at=clock,
        )
    )
    if conn.execute(stmt).rowcount != 1:
        return None
    steps.end_attempt(
        conn, run_id, step, attempt, None, CRASHED_OUTCOME, WORKER_DIED, steps.clock(conn)
    )
    return attempt + 1


def release_received(
    conn: Connection, run_id: str, step: int, attempt: int, receiver: str, lease_s: float
) -> bool:
    """A dead worker's unstarted message: forget the receiver and lease the step afresh
    for its re-send under the same attempt; one sweeper wins. A retry not yet due stays
    queued as of its due time, its lease covering the rest of its backoff."""
    stmt = (
        update(pf_steps)
        .where(*_queued(run_id, step, attempt), _s.received_by == receiver)
        .values(received_by=None, **_handed_out_anew(lease_s))
    )
    return conn.execute(stmt).rowcount == 1


def _queued(run_id: str, step: int, attempt: int) -> tuple[Any, ...]:
    """The step row of this attempt, while it waits in the queue."""
    return (_s.run_id == run_id, _s.step == step, _s.attempt == attempt, _s.status == "queued")


def _handed_out_anew(lease_s: float) -> dict[str, Any]:
    """Queued as of now (or of its due time, a retry's backoff), leased from then."""
    clock = case((_s.queued_at > DbEpoch(), _s.queued_at), else_=DbEpoch())
    return {"queued_at": clock, "lease_expires_at": clock + lease_s}


def unsend_unrecorded(
    conn: Connection,
    run_id: str,
    step: int,
    attempt: int,
    sent_at: float,
    lease_s: float,
    settled_s: float,
) -> bool:
    """A message a gone worker took unrecorded (``distributed.orphans``): make the step an
    outbox row again (``sent_at`` NULL, leased afresh), so that whoever sends it marks it
    sent and, if nobody does, the unsent pass sends it; one sweeper wins (compare-and-set
    on the ``sent_at`` it read). A retry not yet due keeps its due time. Not a step
    handed out in the last ``settled_s`` (a dead receiver's, sent again by another
    sweeper): its old entry is only an old copy."""
    stmt = (
        update(pf_steps)
        .where(
            *_queued(run_id, step, attempt),
            _s.received_by.is_(None),
            _s.sent_at == sent_at,
            _s.queued_at <= DbEpoch() - settled_s,
        )
        .values(sent_at=None, **_handed_out_anew(lease_s))
    )
    return conn.execute(stmt).rowcount == 1


def resend_unrecorded(
    conn: Connection, run_id: str, step: int, attempt: int, sent_at: float
) -> bool:
    """Undo ``unsend_unrecorded`` (another sweeper owned the message after all): the step
    is marked sent again as it was, unless someone sent it meanwhile."""
    stmt = (
        update(pf_steps)
        .where(
            _s.run_id == run_id,
            _s.step == step,
            _s.attempt == attempt,
            _s.sent_at.is_(None),
        )
        .values(sent_at=sent_at)
    )
    return conn.execute(stmt).rowcount == 1


def _hold_expired_queued(
    conn: Connection, waited_under_s: float, new_lease: Any, now: float | None
) -> int:
    """Push the lease of every expired queued step of a live run that has waited less
    than ``waited_under_s`` to ``new_lease(clock)``, without a re-send: one statement for
    the whole backlog, so a deep queue costs one write per sweep (no duplicate storm)."""
    clock = db_clock(now)
    stmt = (
        update(pf_steps)
        .where(
            _SWEEPABLE,
            _s.status == "queued",
            _s.lease_expires_at < clock,
            _s.queued_at + waited_under_s > clock,
        )
        .values(lease_expires_at=new_lease(clock))
    )
    return conn.execute(stmt).rowcount


def hold_waiting(conn: Connection, requeue_after_s: float, now: float | None) -> int:
    """Expired queued steps that waited less than ``requeue_after_s`` are most likely
    behind a long queue: leased until ``queued_at + requeue_after_s``."""
    return _hold_expired_queued(
        conn, requeue_after_s, lambda clock: _s.queued_at + requeue_after_s, now
    )


def hold_busy(conn: Connection, requeue_after_s: float, cap_s: float, now: float | None) -> int:
    """The broker still has messages waiting: expired queued steps that waited less than
    ``cap_s`` are most likely among them, leased ``requeue_after_s`` from now."""
    return _hold_expired_queued(conn, cap_s, lambda clock: clock + requeue_after_s, now)


def queued_page(
    conn: Connection, after: tuple[str, int] | None, limit: int
) -> list[dict[str, Any]]:
    """Queued steps of live runs whose message went to the broker, with the run's flow
    and queue, in key order after ``after``: what a broker that lost its messages must
    get again. Keyset pages, so 10,000 lost messages cost a few queries, not 10,000."""
    stmt = (
        select(
            *(c for c in pf_steps.c if c.name != "queue"),
            _r.flow_name,
            func.coalesce(_s.queue, _r.queue).label("queue"),  # the step's own, else the run's
        )
        .join(pf_runs, _r.run_id == _s.run_id)
        .where(
            _s.status == "queued",
            _s.sent_at.is_not(None),
            # Not the step of a waiting run: parked with no lease, it has no message.
            _s.lease_expires_at.is_not(None),
            literal_in(_r.status, LIVE_RUN_STATUSES),
        )
        .order_by(_s.run_id, _s.step)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(tuple_(_s.run_id, _s.step) > tuple_(literal(after[0]), literal(after[1])))
    return [dict(r) for r in conn.execute(stmt).mappings()]


def queue_names(conn: Connection, default: str) -> list[str]:
    """Broker queues the queued steps of live runs went to (``default`` for NULL): the
    runs' queues, and the queues of nodes that name their own (``Node.queue``)."""
    live = _r.status.in_(("queued", "running"))
    runs = (
        select(func.coalesce(_r.queue, default))
        .where(
            live,
            select(_s.run_id).where(_s.run_id == _r.run_id, _s.status == "queued").exists(),
        )
        .distinct()
    )
    own = (
        select(_s.queue)
        .join(pf_runs, _r.run_id == _s.run_id)
        .where(live, _s.status == "queued", _s.queue.is_not(None))
        .distinct()
    )
    return sorted({default, *conn.execute(runs).scalars(), *conn.execute(own).scalars()})


def is_crash(row: dict[str, Any]) -> bool:
    """An attempt row that counts toward the poison limit: lost with its worker process
    (``WORKER_DIED``), or ended by an exception of the executor's own (``EXECUTOR_CRASHED``:
    loading the Store, the graph, a codec), which would only fail the same way again."""
    if row["outcome"] == EXECUTOR_CRASHED:
        return True
    return row["outcome"] == CRASHED_OUTCOME and row.get("error_msg") == WORKER_DIED


def _says_nothing(row: dict[str, Any]) -> bool:
    """A row that neither crashed nor ran the node to an outcome: still open, or lost while
    its worker lived on (a lease that ran out, a claim fenced out, a ledger error)."""
    return row["outcome"] is None or row["outcome"] == CRASHED_OUTCOME


def _crashes_in_a_row(
    attempts: list[dict[str, Any]], step: int
) -> tuple[list[dict[str, Any]], set[Any]]:
    """(the rows of ``step``'s crashes in a row, newest first; the attempt numbers of its
    retries) since the step last ended for good or was resumed."""
    crashed: list[dict[str, Any]] = []
    retries: set[Any] = set()
    in_a_row = True
    for row in reversed([a for a in attempts if a["step"] == step]):
        if row["outcome"] in FRESH_START_AFTER:
            break
        if is_crash(row):
            if in_a_row:
                crashed.append(row)
        elif not _says_nothing(row):
            in_a_row = False
        if row["outcome"] == "retry":
            retries.add(row.get("attempt"))
    return crashed, retries


def crashes(attempts: list[dict[str, Any]], step: int) -> tuple[int, int]:
    """(attempts of ``step`` that crashed in a row, retries) since the step last ended for
    good or was resumed: what the poison limit and the try number count (pure; takes the
    rows). Any outcome of the node's own (a retry, a limit wait, a park) ends the row of
    crashes; attempts lost while their worker lived on are not crashes (``is_crash``) and
    do not end it. Counted by attempt number, not by row: two deliveries of one attempt
    (a threads pool) each have a row, and one worker death or one retry ends both."""
    crashed, retries = _crashes_in_a_row(attempts, step)
    return len({row.get("attempt") for row in crashed}), len(retries)


def crash_kinds(attempts: list[dict[str, Any]], step: int) -> tuple[set[str], int]:
    """(the worker processes ``step``'s crashes in a row happened on, how many of those
    crashes were worker deaths rather than exceptions of the executor)."""
    crashed, _ = _crashes_in_a_row(attempts, step)
    workers = {row["worker"] for row in crashed if row.get("worker")}
    died = {row.get("attempt") for row in crashed if row["outcome"] == CRASHED_OUTCOME}
    return workers, len(died)


def spans_enough_workers(workers: set[str], live_workers: int) -> bool:
    """May crashes of the executor seen on ``workers`` fail their run? Only if they came
    on at least two worker processes, or on every one alive when fewer are (one worker,
    or none heard from: a test's in-process executor): a cause that only some workers
    have (a type registered on some, an optional import missing on one host) must not
    fail a run that a healthy worker would have run."""
    return len(workers) >= min(2, live_workers)


def count_workers(conn: Connection, dead_after_s: float, now: float | None) -> int:
    """Worker processes heard from within ``dead_after_s``."""
    stmt = select(func.count()).where(_w.beat_at >= db_clock(now) - dead_after_s)
    return int(conn.execute(stmt).scalar_one())


# ── facade: the calls workers and sweepers make ──────────────────────────────


def record_beat(
    db: LedgerClient,
    worker: str,
    host: str,
    pid: int,
    received: list[tuple[Any, ...]] = (),  # type: ignore[assignment]
    *,
    now: float | None = None,
    released: list[tuple[Any, ...]] = (),  # type: ignore[assignment]
) -> None:
    dialect = db.dialect
    db._write(
        lambda conn: beat(conn, dialect, worker, host, pid, list(received), now, list(released)),
        f"recording the heartbeat of worker {worker}",
        None,
    )


def record_stop(db: LedgerClient, worker: str) -> None:
    db._write(lambda conn: bury(conn, worker), f"recording worker {worker} stopped", None)


def prune_workers(db: LedgerClient, older_than_s: float, now: float | None = None) -> int:
    return db._write(lambda conn: prune(conn, older_than_s, now), "pruning workers", None)


def held_by_dead(
    db: LedgerClient, dead_after_s: float, now: float | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    return db._read(lambda conn: dead_holders(conn, dead_after_s, now, limit))


def recover_running(
    db: LedgerClient, run_id: str, step: int, attempt: int, owner: str, lease_s: float
) -> int | None:
    return db._write(
        lambda conn: take_over_dead(conn, run_id, step, attempt, owner, lease_s),
        f"taking over step {step} from dead worker {owner}",
        run_id,
    )


def recover_received(
    db: LedgerClient, run_id: str, step: int, attempt: int, receiver: str, lease_s: float
) -> bool:
    return db._write(
        lambda conn: release_received(conn, run_id, step, attempt, receiver, lease_s),
        f"releasing step {step} from dead worker {receiver}",
        run_id,
    )


def release_unrecorded(
    db: LedgerClient,
    run_id: str,
    step: int,
    attempt: int,
    sent_at: float,
    lease_s: float,
    settled_s: float,
) -> bool:
    return db._write(
        lambda conn: unsend_unrecorded(conn, run_id, step, attempt, sent_at, lease_s, settled_s),
        f"releasing step {step}, taken by a gone worker",
        run_id,
    )


def keep_sent(db: LedgerClient, run_id: str, step: int, attempt: int, sent_at: float) -> bool:
    return db._write(
        lambda conn: resend_unrecorded(conn, run_id, step, attempt, sent_at),
        f"marking step {step} sent again",
        run_id,
    )


def postpone_while_busy(
    db: LedgerClient, requeue_after_s: float, cap_s: float, now: float | None = None
) -> int:
    return db._write(
        lambda conn: hold_busy(conn, requeue_after_s, cap_s, now), "postponing queued steps", None
    )


def postpone_waiting(db: LedgerClient, requeue_after_s: float, now: float | None = None) -> int:
    return db._write(
        lambda conn: hold_waiting(conn, requeue_after_s, now), "postponing queued steps", None
    )


def queued_steps(
    db: LedgerClient, after: tuple[str, int] | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    return db._read(lambda conn: queued_page(conn, after, limit))


def queues_in_use(db: LedgerClient, default: str) -> list[str]:
    return db._read(lambda conn: queue_names(conn, default))


def live_workers(db: LedgerClient, dead_after_s: float, now: float | None = None) -> int:
    return db._read(lambda conn: count_workers(conn, dead_after_s, now))


def last_beats(db: LedgerClient) -> dict[str, float]:
    """``worker id -> last beat`` (database clock) of every worker with a heartbeat row."""
    return db._read(
        lambda conn: {w: float(b) for w, b in conn.execute(select(_w.worker_id, _w.beat_at))}
    )
