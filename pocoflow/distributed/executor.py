"""The distributed step: what one Celery task does for one node step (ARCHITECTURE §3).

    decode -> guard -> claim -> load -> run -> commit -> enqueue

Every stage that can meet another process's work is fenced by the ledger: the claim
takes the step's lease for the message's attempt, the commit lands only if that attempt
still holds it, so whatever the broker delivers twice, and whichever worker wakes up
late, at most one transition per step is committed (G1). A step's lease is renewed by a
heartbeat while it runs; if its worker dies the sweeper re-runs it (G3). Nothing here
sleeps: a node retry is a new message with a countdown, scheduled by Celery.

``execute_step`` never raises: a Celery task that raised could be retried by the broker
in a loop; every failure is recorded on the run (or logged, when there is no run to
record it on) and the ledger decides what happens next.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pocoflow.batchflow import map_node_of
from pocoflow.codec import CodecError
from pocoflow.commit import NextStep, StepCommit
from pocoflow.delta import StoreTracker
from pocoflow.distributed import lifecycle
from pocoflow.distributed.control import FlagReader, redis_client
from pocoflow.distributed.graphs import GraphCache, mismatch_message
from pocoflow.distributed.lease import Holding, LeaseKeeper
from pocoflow.distributed.limiter import RedisLimiter, forget_waiters
from pocoflow.distributed.liveness import dead_after
from pocoflow.distributed.mapstep import run_map_step
from pocoflow.distributed.message import ItemMessage, MalformedMessage, StepMessage
from pocoflow.hooks import COMMIT_REFUSED, FLOW_END, MESSAGE_MALFORMED, NODE_RETRY
from pocoflow.ledger import liveness
from pocoflow.ledger.signals import StepFence
from pocoflow.ledger.tables import LIVE_RUN_STATUSES
from pocoflow.limits import Limiter, LimitGate, LimitWait, use_limiter
from pocoflow.logging import get_logger
from pocoflow.registry import UnknownFlowError
from pocoflow.settings import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_MAX_CRASHES, Settings
from pocoflow.step import RetryLater, RunCancelled, StepError, run_step, utc_now
from pocoflow.store import Store
from pocoflow.usage import BUDGET_EXCEEDED, Budget, LedgerSink, budget_message
from pocoflow.waiting import LOST as PARK_LOST, PARKED, SIGNALLED, Signal, WaitingFor

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from pocoflow.db import WorkflowDB
    from pocoflow.distributed.publish import Publisher
    from pocoflow.flow import Flow
    from pocoflow.graph import Graph
    from pocoflow.node import Node

_log = get_logger("distributed.executor")

# What ``execute_step`` returns (and ``pf_attempts.outcome`` records where there is a row).
COMMITTED = "committed"
DUPLICATE = "duplicate"  # stale attempt, already committed, or leased by another worker
LOST = "lost"  # the lease was taken over while this attempt ran: nothing committed
RETRY = "retry"
#: The node's limits (rate, concurrency, tokens) said wait: sent again for later, no try spent.
LIMITED = "limited"
FAILED = "failed"
REFUSED = "refused"  # unknown flow or another graph version: the run failed, resumable
STOPPED = "stopped"  # the run had finished
CANCELLED = "cancelled"
PAUSED = "paused"
WAITING = "waiting"  # the node waits for a value (``wait_for``): the run is parked
MALFORMED = "malformed"
UNKNOWN_RUN = "unknown_run"
CRASHED = "crashed"
#: The ledger could not be reached before the step was claimed: nothing in the ledger
#: knows this delivery, so the message itself must come back (``redelivery_delay``).
LEDGER_UNREACHABLE = "ledger_unreachable"
#: Outcomes of a delivery that stopped its run or found it stopped: the run's steps and
#: items waiting for their limits will not ask again (``WorkerContext.forget_waiters``).
RUN_STOPPED = frozenset({CANCELLED, PAUSED, FAILED, REFUSED, STOPPED})

#: Because a node may wait for several keys in turn and each value may land just as it
#: parks: a step re-runs its node in place at most this often before it lets go.
MAX_WAKEUPS_IN_STEP = 20
#: Stores kept for the next step of runs this process just advanced (see keep()).
HANDOFF_SIZE = 64
#: A limit wait is stretched by up to this fraction at random, and at most by
#: LIMIT_JITTER_CAP_S (see _wait_for_limit).
LIMIT_JITTER = 0.1
LIMIT_JITTER_CAP_S = 0.1


def limit_delay(wait_s: float) -> float:
    """When a call the limits refused comes again: its wait plus a little jitter, so the
    waiters of one key do not all come back at one instant; capped, since the limiter
    gives each waiter its own turn: 10% of a long turn would leave its place unused
    meanwhile (a rate run below its limit)."""
    return wait_s + random.random() * min(wait_s * LIMIT_JITTER, LIMIT_JITTER_CAP_S)


def step_queue(run: dict[str, Any], node: Node | None) -> str | None:
    """The queue a step of ``node`` goes to: the node's ``queue``, else the run's."""
    return getattr(node, "queue", None) or run.get("queue")


def crash_queue(
    db: WorkflowDB, run: dict[str, Any], run_id: str, step: int, node: Node | None
) -> str | None:
    """The queue a step (or one of its map items) that crashed goes to again: its node's,
    else, when the crash came before the node was loaded, the queue the step's row keeps
    for it (``pf_steps.queue``, the node's when the step was sent), else the run's."""
    if node is not None:
        return step_queue(run, node)
    row = db.get_step(run_id, step) or {}
    return row.get("queue") or run.get("queue")


@dataclass
class WorkerContext:
    """What a worker process shares between its steps: ledger, publisher, control Redis,
    lease length, graph cache. Built once per process (after the fork)."""

    db: WorkflowDB
    publisher: Publisher
    redis: redis.Redis | None
    lease_s: float
    graphs: GraphCache = field(default_factory=GraphCache)
    #: Injected by tests; None = the ledger's (database) clock for leases and outbox rows.
    clock: Callable[[], float] | None = None
    #: The limiter shared by every worker (Redis); None without a control Redis, when a
    #: node with limits fails rather than run unlimited.
    limiter: Limiter | None = None
    #: The crash budget (``POCOFLOW_MAX_CRASHES``): a step or item whose deliveries end
    #: this many times in a row on an exception of the executor's own fails its run.
    max_crashes: int = DEFAULT_MAX_CRASHES
    #: Silence after which a worker process is taken for dead (``crash_verdict_due``
    #: counts the live ones).
    dead_after_s: float = dead_after(DEFAULT_HEARTBEAT_SECONDS)
    leases: LeaseKeeper = field(init=False)
    #: Where every step's ``report_usage`` calls go: a ledger row each, written at once,
    #: so a call made before this process is killed is kept.
    usage: LedgerSink = field(init=False)

    handoff: dict[tuple[str, str, int], tuple[Store, StoreTracker]] = field(
        init=False, default_factory=dict
    )
    #: Because a threads-pool worker keeps and takes from every pool thread at once:
    #: evicting the oldest entry while another thread takes it must not raise.
    _handoff_lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.leases = LeaseKeeper(self.db, self.lease_s)
        self.usage = LedgerSink(self.db)

    def crash_verdict_due(self, crashes: int, workers: set[str]) -> bool:
        """Do ``crashes`` in a row of the executor, seen on ``workers``, fail the run? At
        the budget (``max_crashes``), only if they span at least two worker processes, or
        every live one when fewer are alive (``liveness.spans_enough_workers``): a cause
        only some workers have must not fail a run a healthy worker would run. At twice
        the budget, whatever the workers: a re-sent message can keep landing on the same
        process (its queue's only consumer, the broker's order), and a crash must stay
        bounded."""
        if crashes < self.max_crashes:
            return False
        if len(workers) >= 2 or crashes >= 2 * self.max_crashes:
            return True  # no need to ask the ledger
        live = liveness.live_workers(self.db, self.dead_after_s)
        return liveness.spans_enough_workers(workers, live)

    def keep(self, run_id: str, flow: str, step: int, store: Store, tracker: StoreTracker) -> None:
        """Hold the Store this process just committed as step ``step``: when the same
        process gets the next step (often), it need not read it back. Taken once, so a
        retry or a second delivery reads the checkpoint from the ledger again."""
        with self._handoff_lock:
            if len(self.handoff) >= HANDOFF_SIZE:
                self.handoff.pop(next(iter(self.handoff)))
            self.handoff[(run_id, flow, step)] = (store, tracker)

    def take(self, run_id: str, flow: str, step: int) -> tuple[Store, StoreTracker] | None:
        with self._handoff_lock:
            return self.handoff.pop((run_id, flow, step), None)

    def forget_waiters(self, run_id: str, outcome: str | None = None) -> None:
        """Take the run's waiters out of the limits' queues when ``outcome`` (None: the
        run completed) says the run stopped. Every delivery that stops a run or meets a
        stopped one calls it, so a stop recorded by a process without Redis is cleared by
        the first of the run's waiting messages to come back (each waiter has one, due
        at its turn: about a poll after the stop for the first); no sweep is needed for
        those. Never raises: without an answer the waiters are forgotten after their
        turns."""
        if self.redis is None or not (outcome is None or outcome in RUN_STOPPED):
            return
        if outcome is not None and _live_again(self.db, run_id):
            # Resumed (or restarted) since this delivery saw it stop: its steps wait on
            # (their places stand), whatever stopped it (pause, cancel, failure).
            return
        forget_waiters(self.redis, run_id)

    @classmethod
    def from_settings(cls, settings: Settings, app: Celery | None = None) -> WorkerContext:
        from pocoflow.distributed.celery_app import create_app
        from pocoflow.distributed.publish import Publisher, SentMarker
        from pocoflow.recorder import open_ledger

        db = open_ledger(settings.db_url)
        app = app if app is not None else create_app(settings)
        client = redis_client(settings.redis_url) if settings.redis_url else None
        limiter = None
        if client is not None:
            limiter = RedisLimiter(client, lease_s=settings.lease_seconds)
            limiter.run_cancelled = lambda run_id: _cancelled_in_ledger(db, run_id)
            use_limiter(limiter)  # what a map item's gate asks in this process too
        return cls(
            db=db,
            publisher=Publisher(app, db, marker=SentMarker(db)),
            redis=client,
            lease_s=settings.lease_seconds,
            limiter=limiter,
            max_crashes=settings.max_crashes,
            dead_after_s=dead_after(settings.heartbeat_seconds),
        )


_context_lock = threading.Lock()
_context: tuple[int, WorkerContext] | None = None
_context_factory: Callable[[], WorkerContext] = lambda: WorkerContext.from_settings(  # noqa: E731
    Settings.from_env()
)


def configure(factory: Callable[[], WorkerContext]) -> None:
    """Set how this process builds its context (the worker app passes its own Celery app,
    so steps publish through the app whose connections Celery resets after a fork)."""
    global _context, _context_factory
    with _context_lock:
        _context_factory = factory
        _context = None


def default_context() -> WorkerContext:
    global _context
    with _context_lock:
        if _context is None or _context[0] != os.getpid():
            _context = (os.getpid(), _context_factory())
        return _context[1]


_worker_id: tuple[int, str] | None = None
#: Numbers the claims of this process: the holder token of each delivery (see _StepRun).
_claims = itertools.count(1)


def default_worker_id() -> str:
    """``hostname/nonce:pid`` of the process running the step: what ``pf_attempts.worker``
    records, so an operator (or a test) finds the host and the process to signal (the pid
    after the last colon). The random nonce, drawn once per process (again after a fork),
    tells apart processes that share a host name and a pid: containers, each its pid 1."""
    global _worker_id
    pid = os.getpid()
    if _worker_id is None or _worker_id[0] != pid:
        _worker_id = (pid, f"{socket.gethostname()}/{secrets.token_hex(4)}:{pid}")
    return _worker_id[1]


def execute_step(
    message: Any,
    *,
    worker_id: str | None = None,
    task_id: str | None = None,
    context: WorkerContext | None = None,
) -> str:
    """Run the step ``message`` names, following the step protocol; returns the outcome.

    Never raises (see module docstring). ``worker_id`` defaults to
    ``default_worker_id()``.
    """
    worker = worker_id or default_worker_id()
    try:
        msg = StepMessage.from_dict(message)
    except MalformedMessage as error:
        _record_malformed((context or default_context()).db, error)
        return MALFORMED
    step_run: _StepRun | None = None
    try:
        # Inside the try: a process's first step opens its ledger here.
        step_run = _StepRun(context or default_context(), msg, worker, task_id)
        outcome = step_run.run()
    except Exception as exc:
        if (step_run is None or not step_run.claimed) and _unreachable(exc):
            # Early ack took the message off the broker, and the ledger never saw this
            # delivery (no claim, no received mark): a PostgreSQL restart would lose the
            # step until the queue backstop. The task sends the message again instead.
            _log.warning(
                "Step %d of run %s: the ledger is unreachable before the claim (%s); "
                "the message will be delivered again",
                msg.step,
                msg.run_id,
                exc,
            )
            return LEDGER_UNREACHABLE
        if step_run is None or not step_run.claimed or _unreachable(exc):
            _log.exception(
                "Step %d of run %s (attempt %d) crashed in the executor; its lease will "
                "expire and the sweeper will re-run it",
                msg.step,
                msg.run_id,
                msg.attempt,
            )
            return CRASHED
        outcome = step_run.crashed(exc)
    # A failed or refused step, a budget pause, or a guard that met a cancel or pause:
    # the run's steps and items waiting for their limits ask no more.
    step_run.ctx.forget_waiters(msg.run_id, outcome)
    return outcome


def _cancelled_in_ledger(db: WorkflowDB, run_id: str) -> bool:
    """The ledger, not a Redis flag that may have outlived a resume, says cancelled."""
    try:
        run = db.get_run(run_id)
    except Exception:
        return True  # cannot tell: the flag stands (the purge costs at most a place)
    return run is None or run["status"] == "cancelled" or run.get("control") == "cancel"


def _live_again(db: WorkflowDB, run_id: str) -> bool:
    """The run goes on (a resume landed since a delivery parked it). A read that fails
    says no: the purge then costs the resumed run's places, never a stop's."""
    try:
        run = db.get_run(run_id)
    except Exception:
        return False
    return (
        run is not None
        and run["status"] in LIVE_RUN_STATUSES
        and run.get("control") != "cancel"  # a cancel not yet made the status is a stop
    )


def _unreachable(exc: BaseException) -> bool:
    """The ledger could not be reached or stayed locked: a reason to try the message
    again later, unlike a bug or a bad value, which would only fail again (and, after
    the claim, counts toward the crash budget: ``_StepRun.crashed``)."""
    from sqlalchemy.exc import (
        DBAPIError,
        InterfaceError,
        OperationalError,
        TimeoutError as PoolTimeout,
    )

    from pocoflow.ledger.errors import (
        LedgerConflictError,
        LedgerLockedError,
        LedgerOpenError,
        is_transient_state,
        sqlstate,
    )

    if isinstance(exc, LedgerOpenError):  # opening it: unreachable, or a bad URL?
        return isinstance(exc.__cause__, InterfaceError | OperationalError)
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True  # the connection died under the statement, whatever its class
    state = sqlstate(exc)
    if state is not None:  # PostgreSQL answered: its SQLSTATE says, not psycopg's class
        return is_transient_state(state)
    return isinstance(
        exc,
        InterfaceError | OperationalError | PoolTimeout | LedgerLockedError | LedgerConflictError,
    )


def crash_verdict(
    what: str, crashes: int, workers: set[str], error: str, *, worker_deaths: int = 0
) -> str:
    """The ``error_msg`` of a run failed because ``what`` (its step or item, naming the
    run, the step and the node) crashed ``crashes`` times in a row on ``workers``: in the
    executor, the last with ``error``, and ``worker_deaths`` of them with its worker
    process dying."""
    kinds = "in the executor"
    if worker_deaths:
        kinds = (
            f"({crashes - worker_deaths} in the executor, {worker_deaths} with its worker "
            "process dying)"
        )
    return (
        f"{what} crashed {kinds} {crashes} times in a row, on {len(workers)} worker "
        f"process(es): {', '.join(sorted(workers))}. Last: {error}. Not an exception of the "
        "node's own code but of loading or running it on a worker (a Store or item that "
        "cannot be decoded, the flow's graph, the ledger's data), which fails the same "
        "way every time. Fix the cause (or raise POCOFLOW_MAX_CRASHES), then resume the run."
    )


def recordable_error(cause: str, refusal: BaseException) -> str:
    """A node's failure ``cause`` that the ledger refused to record (``refusal``), as
    text any ledger keeps: ASCII with escapes, cut to 2000 characters."""
    return (
        f"{ascii(cause)[1:-1][:2000]} (the error as first given could not be recorded: "
        f"{type(refusal).__name__})"
    )


def redelivery_delay(redeliveries: int) -> float:
    """Seconds before a message that met an unreachable ledger is delivered again: 1, 2,
    4 ... up to 15, so a short outage costs a second and a long one a message per step
    every 15 s."""
    return float(min(2**redeliveries, 15))


def _record_malformed(db: WorkflowDB, error: MalformedMessage) -> None:
    _log.error("Dropped a malformed step message: %s", error)
    if error.run_id is None:
        return
    try:
        if db.get_run(error.run_id) is not None:
            db.save_event(error.run_id, MESSAGE_MALFORMED, error_msg=str(error), ts=utc_now())
    except Exception as exc:  # the ledger is down: the log line above is all we can do
        _log.warning("Could not record the malformed message on run %s: %s", error.run_id, exc)


class _Refused(Exception):
    """The step cannot run on this worker (unknown flow, other graph version, bad node)."""


def run_store(
    store: Store, flow: Flow, store_name: str | None, msg: StepMessage | ItemMessage
) -> Store:
    """The Store of a step (or of a pass) as its run has it: the name the run began with
    (the claim's read gives it) and the flow's schema. ``_Refused`` if the values no
    longer fit that schema: a crash would be re-run by the sweeper, forever."""
    name = store_name or store.name
    if not flow.schema and name == store.name:
        return store
    try:
        return Store(store.as_dict(), schema=flow.schema, name=name)
    except TypeError as exc:
        raise _Refused(
            f"Run {msg.run_id!r} step {msg.step}: its Store does not fit the schema "
            f"of flow {msg.flow!r} ({exc}); fix the schema and resume, or fork the "
            "run from an earlier step"
        ) from None


@dataclass
class _Loaded:
    flow: Flow
    graph: Graph
    node: Node
    store: Store
    tracker: StoreTracker


class _StepRun:
    """One delivery of one step message."""

    def __init__(self, ctx: WorkerContext, msg: StepMessage, worker: str, task_id: str | None):
        self.ctx = ctx
        self.db = ctx.db
        self.msg = msg
        self.worker = worker
        # This delivery's claim token: two deliveries of one attempt in one process (a
        # threads pool, a redelivery) are two holders, and only the current one may renew,
        # commit or fail the step (G1).
        self.holder = f"{worker}#{next(_claims)}"
        self.claimed = False
        self.task_id = task_id
        #: The run's guard columns as the claim read them, and the graph and Store once
        #: loaded: what a crash after the claim needs to send the step again.
        self.run_row: dict[str, Any] | None = None
        self.loaded: _Loaded | None = None
        self._prior: tuple[Store, dict[str, int], dict[str, str]] | None = None
        self._handed: tuple[Store, StoreTracker] | None = None
        #: The step's lease renewal while it runs (a map step releases it once parked).
        self.holding: Holding | None = None

    # ── the protocol ──────────────────────────────────────────────────────────

    def run(self) -> str:
        msg, db = self.msg, self.db
        self.ctx.leases.beating(self.worker)
        # The Store of step-1 is in memory when this process committed it (and the run's
        # flow was checked then); otherwise the claim's batch reads it.
        self._handed = self.ctx.take(msg.run_id, msg.flow, msg.step - 1)
        # Guard and claim in one transaction: a cancel or pause that lands after the check
        # cannot slip in before the claim (G4). A run that may not go on is handed to the
        # guard; if the guard finds nothing to stop for (a pause withdrawn meanwhile), one
        # more claim decides.
        run: dict[str, Any] | None = None
        for _ in range(2):
            claimed, run = self._claim()
            self.claimed = claimed
            if claimed or run is None:
                break
            if msg.flow != run["flow_name"]:  # forged or garbled: must not fail the run
                _record_malformed(
                    db,
                    MalformedMessage(
                        f"step message names flow {msg.flow!r} but run {msg.run_id!r} is a "
                        f"run of {run['flow_name']!r}",
                        run_id=msg.run_id,
                    ),
                )
                return MALFORMED
            stop = self._guard(run)
            if stop is not None:
                return stop
        if run is None:
            _log.error("Step message for unknown run %r dropped", msg.run_id)
            return UNKNOWN_RUN
        self.run_row = run
        if not claimed:
            if self._other_node():
                return MALFORMED
            _log.info(
                "Step %d of run %s attempt %d: already committed, stale or leased elsewhere; "
                "nothing to do",
                msg.step,
                msg.run_id,
                msg.attempt,
            )
            return DUPLICATE
        if run["status"] == "queued":
            db.update_run_if(msg.run_id, status_in=("queued",), status="running")
        max_steps = run.get("max_steps")
        if max_steps is not None and msg.step >= max_steps:
            return self._fail(
                f"Flow {msg.flow!r} exceeded max_steps={max_steps} at node {msg.node_id!r} "
                f"(run {msg.run_id}). Check for an unintended loop or raise max_steps.",
                refused=True,
            )
        if run.get("max_tokens") is not None or run.get("max_cost_usd") is not None:
            stop = self._over_budget(run)  # only runs with a budget pay for this read
            if stop is not None:
                return stop
        try:
            loaded = self.loaded = self._load(run)
        except _Refused as refusal:
            return self._fail(str(refusal), refused=True)
        with self.ctx.leases.hold(msg.run_id, msg.step, msg.attempt, self.holder) as held:
            self.holding = held
            return self._run_and_commit(run, loaded)

    def _claim(self) -> tuple[bool, dict[str, Any] | None]:
        msg = self.msg
        # The claim names the node and flow the message asks for: it wins only if the
        # ledger recorded them, so a message cannot choose what runs. Unless this process
        # has it in hand, the Store of step-1 comes back with a claim that won.
        load_step = msg.step - 1 if self._handed is None else None
        try:
            claimed, run, self._prior = self._claim_to_run(load_step)
        except Exception as exc:
            if load_step is None or _unreachable(exc):
                raise
            # The server refused the Store's read (corrupt rows), and with it the claim
            # in the same batch: claim without it, and meet the error under the claim,
            # where it counts toward the step's crash budget instead of coming back
            # with every re-send.
            _log.warning(
                "Step %d of run %s: its Store of step %d cannot be read (%s: %s)",
                msg.step,
                msg.run_id,
                load_step,
                type(exc).__name__,
                exc,
            )
            claimed, run, self._prior = self._claim_to_run(None)
        return claimed, run

    def _claim_to_run(
        self, load_step: int | None
    ) -> tuple[bool, dict[str, Any] | None, tuple[Store, dict[str, int], dict[str, str]] | None]:
        msg = self.msg
        return self.db.claim_to_run(
            msg.run_id,
            msg.step,
            msg.attempt,
            self.worker,
            self.ctx.lease_s,
            task_id=self.task_id,
            holder=self.holder,
            node_id=msg.node_id,
            flow=msg.flow,
            load_step=load_step,
        )

    def _other_node(self) -> bool:
        """After a lost claim (off the hot path): did the message name another node than
        the ledger recorded for its step? Then it is forged or garbled, recorded on the
        run as malformed; the run goes on with the step's real message."""
        msg = self.msg
        row = self.db.get_step(msg.run_id, msg.step)
        if row is None or row["node_id"] == msg.node_id:
            return False
        _record_malformed(
            self.db,
            MalformedMessage(
                f"step message names node {msg.node_id!r} for step {msg.step} of run "
                f"{msg.run_id!r}, but the ledger recorded node {row['node_id']!r}",
                run_id=msg.run_id,
            ),
        )
        return True

    def _guard(self, run: dict[str, Any]) -> str | None:
        """Stop before the node if the run finished, was cancelled or paused (G4).

        The ledger row decides: the Redis flags are a cache of it for ``exec``'s cancel
        probe, and a flag left over after a Redis outage must not stop a resumed run.
        """
        msg = self.msg
        stop = lifecycle.stopped(self.db, run, msg.step)
        if stop is not None:
            return stop
        if run.get("control") == "pause" and lifecycle.park(
            self.db, msg.run_id, msg.step, msg.attempt, self.holder
        ):
            _log.info("Run %s paused before step %d", msg.run_id, msg.step)
            return PAUSED
        return None

    def _over_budget(self, run: dict[str, Any]) -> str | None:
        """Pause the run before this step if it has reported more than its budget: the
        run parked (``paused``) with the step left for ``resume``, which may raise the
        budget, and the reason as a ``budget_exceeded`` event in the same write. None:
        within budget."""
        msg, db = self.msg, self.db
        budget = Budget(run.get("max_tokens"), run.get("max_cost_usd"))
        reason = budget.exceeded(*db.usage_totals(msg.run_id))
        if reason is None:
            return None
        message = budget_message(msg.run_id, reason, msg.step)
        said = [
            {"event": BUDGET_EXCEEDED, "step": msg.step, "attempt": msg.attempt,
             "error_msg": message},
        ]  # fmt: skip
        # Parking needs the run's pause request (the compare-and-set that keeps a racing
        # resume or cancel consistent); a cancel that landed meanwhile stands.
        lifecycle.request_pause(db, msg.run_id)
        if not lifecycle.park(db, msg.run_id, msg.step, msg.attempt, self.holder, said):
            # The run changed meanwhile. A resume withdrew the request (most likely with
            # a higher budget): this delivery still holds the step, so it runs it, as the
            # guard goes on when a pause is withdrawn; otherwise the guard says why not.
            # Returning PAUSED here would leave the claimed step to its lease's expiry.
            stop = self._guard(db.get_run(msg.run_id) or {"status": "cancelled"})
            if stop is None:
                _log.info("Run %s: budget pause withdrawn; step %d goes on", msg.run_id, msg.step)
                return None
            self._end(stop, message)
            return stop
        self._end(PAUSED, message)
        _log.warning("%s", message)
        return PAUSED

    def _load(self, run: dict[str, Any]) -> _Loaded:
        """Graph from the registry (G7), fingerprint check (G6), Store of step-1."""
        msg = self.msg
        try:
            flow, graph = self.ctx.graphs.get(msg.flow)
        except UnknownFlowError as exc:
            raise _Refused(f"Worker {self.worker} refused run {msg.run_id!r}: {exc}") from None
        recorded = run.get("fingerprint")
        if recorded and recorded != graph.fingerprint:
            # The whole row (graph_shape): the step's reads carry only the guard columns.
            full = self.db.get_run(msg.run_id) or run
            raise _Refused(mismatch_message(full, graph, run_id=msg.run_id, worker=self.worker))
        try:
            node = graph.node(msg.node_id)
        except KeyError as exc:
            raise _Refused(f"Run {msg.run_id!r}, flow {msg.flow!r}: {exc.args[0]}") from None
        if self._handed is not None:
            store, tracker = self._handed
            return _Loaded(flow, graph, node, store, tracker)
        store, tracker = self._read_store(flow, self._prior)
        return _Loaded(flow, graph, node, store, tracker)

    def _read_store(
        self, flow: Flow, prior: tuple[Store, dict[str, int], dict[str, str]] | None = None
    ) -> tuple[Store, StoreTracker]:
        """The Store of step-1 (``prior``: as already read) under the flow's schema, and
        its tracker."""
        msg = self.msg
        store, manifest, texts = prior or self.db.load_store(msg.run_id, msg.step - 1)
        store = run_store(store, flow, (self.run_row or {}).get("store_name"), msg)
        tracker = StoreTracker()
        tracker.seed(manifest, texts, store.as_dict())
        return store, tracker

    def _run_and_commit(self, run: dict[str, Any], loaded: _Loaded) -> str:
        msg, db = self.msg, self.db
        map_node = map_node_of(loaded.node)
        if map_node is not None:  # its items run as tasks of their own
            return run_map_step(self, run, loaded, map_node)
        probe = FlagReader(msg.run_id, self.ctx.redis, db)

        def signals(key: str) -> Signal:
            return db.read_signal(msg.run_id, key, now=self._now())

        for _ in range(MAX_WAKEUPS_IN_STEP):
            try:
                done = run_step(
                    loaded.node,
                    loaded.store,
                    step=msg.step,
                    hooks=loaded.flow._hooks,
                    run_id=msg.run_id,
                    attempt=msg.attempt,
                    cancel_probe=probe,
                    record=True,
                    try_number=msg.try_number,
                    usage_sink=self.ctx.usage,
                    signals=signals,
                    limit_gate=LimitGate(self.ctx.limiter, msg.flow, blocking=False),
                )
            except WaitingFor as waiting:
                stop = self._park(loaded, waiting)
                if stop is not None:
                    return stop
                # The value came meanwhile: run the node again from prep on a Store as
                # it was before the step (prep or post may have written to it).
                loaded = self._reload(loaded)
                continue
            except RetryLater as retry:
                return self._retry(run, loaded, retry)
            except LimitWait as wait:
                return self._wait_for_limit(run, loaded, wait)
            except RunCancelled:
                # A sub-flow (or an exec) stopped itself because the run was cancelled:
                # nothing is committed, the step stays for a resume (G4).
                self._end(CANCELLED, "the run was cancelled while the step ran")
                lifecycle.request_cancel(db, msg.run_id, step=msg.step)
                return CANCELLED
            except StepError as error:
                cause = f"{type(error.cause).__name__}: {error.cause}"
                return self._fail_node(cause, error.events)
            return self._commit(run, loaded, done.action, done.events)
        self._end(LOST, "woken too often in one step; the sweeper sends it again")
        return LOST

    def _park(self, loaded: _Loaded, waiting: WaitingFor) -> str | None:
        """The node waits for a value: park the run (``waiting``, the step handed over and
        held by nobody) and return WAITING; None if the value was sent meanwhile (run the
        node again). A cancel or pause that landed while the node ran is honoured here,
        as the guard would have before the next node (G4)."""
        msg = self.msg
        found = self.db.park_waiting(
            msg.run_id,
            waiting.key,
            step=msg.step,
            node_name=loaded.node.name,
            timeout=waiting.timeout,
            fence=StepFence(msg.attempt, self.holder, self.worker),
            now=self._now(),
        )
        if found == PARKED:
            _log.info("Run %s waits for %r at step %d", msg.run_id, waiting.key, msg.step)
            return WAITING
        if found == SIGNALLED:
            return None
        if found == PARK_LOST:
            self._end(LOST, "lease taken over before the run could wait")
            return LOST
        stop = self._guard(self.db.get_run(msg.run_id) or {"status": "cancelled"})
        if stop is None:
            return None  # the pause was withdrawn meanwhile: go on
        self._end(stop, f"the run was {stop} while the node waited for {waiting.key!r}")
        return stop

    def _reload(self, loaded: _Loaded) -> _Loaded:
        """The node runs again from prep: on the Store of step-1 read afresh, since the
        first run's prep may have written to the one in memory."""
        store, tracker = self._read_store(loaded.flow)
        return _Loaded(loaded.flow, loaded.graph, loaded.node, store, tracker)

    def _now(self) -> float | None:
        return self.ctx.clock() if self.ctx.clock is not None else None

    def _commit(
        self, run: dict[str, Any], loaded: _Loaded, action: str | None, events: list[dict]
    ) -> str:
        """One transaction: checkpoint, events, run row, successor's outbox row (§3.4);
        then publish the successor (§3.5). A refused commit enqueues nothing (G1)."""
        msg, db, node = self.msg, self.db, loaded.node
        following = node.next_node(action)
        next_id = loaded.graph.id_of(following) if following is not None else None
        try:
            manifest, changed = loaded.tracker.diff(loaded.store.as_dict(), msg.step)
        except CodecError as exc:  # G7: a value that would not round-trip, named by key
            error = f"Run {msg.run_id!r} step {msg.step} ({node.name}): {exc}"
            return self._fail(error, events)
        events = [{**e, "attempt": msg.attempt} for e in events]
        run_fields: dict[str, Any] = {"total_steps": msg.step + 1}
        now = self.ctx.clock() if self.ctx.clock is not None else None
        next_step = None
        if following is None:
            ts = utc_now()
            events.append(
                {"event": FLOW_END, "step": msg.step + 1, "ts": ts, "attempt": msg.attempt}
            )
            run_fields.update(status="completed", completed_at=ts, current_node=node.name)
        else:
            assert next_id is not None
            run_fields["current_node"] = following.name
            next_step = NextStep(
                msg.step + 1, next_id, 1, lease_s=self.ctx.lease_s, queue=following.queue
            )
        commit = StepCommit(
            run_id=msg.run_id,
            step=msg.step,
            node_name=node.name,
            action=action,
            next_node=next_id,
            manifest=manifest,
            changed=changed,
            events=events,
            run_fields=run_fields,
            attempt=msg.attempt,
            next_step=next_step,
            worker=self.worker,
            holder=self.holder,
        )
        if not db.commit_step(commit, now=now):
            why = (
                f"attempt {msg.attempt} on {self.worker} finished after its lease was taken "
                "over (or another attempt committed first); its result was discarded"
            )
            self._end(LOST, why)
            # The attempt row may be closed already (the sweeper's take-over): the event
            # is what tells the run's story of a late worker (a partition, a freeze).
            self._record(COMMIT_REFUSED, why)
            _log.warning("Step %d of run %s: %s", msg.step, msg.run_id, why)
            return LOST
        if next_step is not None:
            self.ctx.keep(msg.run_id, msg.flow, msg.step, loaded.store, loaded.tracker)
            successor = StepMessage(msg.run_id, msg.flow, next_step.step, next_step.node_id, 1)
            self.ctx.publisher.send(successor, queue=step_queue(run, following))
        else:
            loaded.flow._hooks.fire(FLOW_END, msg.step + 1, loaded.store)
            # After the hook: a Redis round trip must not delay what the run's end calls.
            # A flow without limits has no record: its end costs no round trip.
            if loaded.graph.limited:
                self.ctx.forget_waiters(msg.run_id)  # none wait any more: only its record goes
        return COMMITTED

    def _retry(self, run: dict[str, Any], loaded: _Loaded, retry: RetryLater) -> str:
        """Schedule try ``retry.next_try`` under a new attempt with Celery's countdown;
        the lease covers the delay so the sweeper leaves the waiting step alone."""
        msg, db = self.msg, self.db
        error = f"{type(retry.cause).__name__}: {retry.cause}"
        db.save_event(
            msg.run_id,
            NODE_RETRY,
            step=msg.step,
            node_name=loaded.node.name,
            error_msg=error,
            attempt=msg.attempt,
            ts=utc_now(),
        )
        self._end(RETRY, error)
        queue = step_queue(run, loaded.node)
        new_attempt = self._send_again(retry.next_try, retry.delay, queue)
        if new_attempt is None:
            return LOST
        _log.info(
            "Step %d of run %s: try %d failed (%s); try %d in %.2fs as attempt %d",
            msg.step,
            msg.run_id,
            msg.try_number,
            error,
            retry.next_try,
            retry.delay,
            new_attempt,
        )
        return RETRY

    def _wait_for_limit(self, run: dict[str, Any], loaded: _Loaded, wait: LimitWait) -> str:
        """The node's limits refused the call: hold no worker, send the step again for
        when it may start, under a new attempt with the same try (no retry is spent)."""
        msg = self.msg
        self._end(LIMITED, str(wait))
        delay = limit_delay(wait.wait_s)
        if self._send_again(msg.try_number, delay, step_queue(run, loaded.node)) is None:
            return LOST
        _log.debug("Step %d of run %s: %s", msg.step, msg.run_id, wait)
        return LIMITED

    def _send_again(self, try_number: int, delay: float, queue: str | None) -> int | None:
        """Re-queue this step as try ``try_number`` under the next attempt, due in
        ``delay`` s, and send it to ``queue``; the lease covers the delay so the sweeper
        leaves the waiting step alone. None when this holder lost the step meanwhile."""
        msg = self.msg
        new_attempt = self.db.take_over(
            msg.run_id,
            msg.step,
            msg.attempt,
            self.ctx.lease_s + delay,
            holder=self.holder,
            due_in=delay,
        )
        if new_attempt is not None:
            self.ctx.publisher.send(
                msg.retry(try_number, new_attempt), queue=queue, countdown=delay
            )
        return new_attempt

    def crashed(self, exc: Exception) -> str:
        """This claimed delivery ended on an exception of the executor's own, not the
        node's (a Store that cannot be decoded, a codec or graph error): one that would
        come back on every worker, so it is bounded by the crash budget, as a step that
        kills its worker is (``ctx.max_crashes``). Below it, the attempt is closed as
        ``crashed`` and the step sent again under the next attempt after a short backoff
        (not left to its lease, which would re-send it for ever); at it, the run fails
        naming run, step, node and the exception. Never raises: if the ledger cannot say
        even this, the lease runs out and the sweeper re-sends the step, as before."""
        msg, db = self.msg, self.db
        error = f"{type(exc).__name__}: {exc}"
        _log.error(
            "Step %d of run %s (attempt %d) crashed in the executor",
            msg.step,
            msg.run_id,
            msg.attempt,
            exc_info=exc,
        )
        try:
            attempts = db.get_attempts(msg.run_id)
            crashes = liveness.crashes(attempts, msg.step)[0] + 1
            workers, deaths = liveness.crash_kinds(attempts, msg.step)
            workers.add(self.worker)
            if self.ctx.crash_verdict_due(crashes, workers):
                what = f"Step {msg.step} (node {msg.node_id!r}) of run {msg.run_id}"
                verdict = crash_verdict(what, crashes, workers, error, worker_deaths=deaths)
                return self._fail(verdict, node_name=msg.node_id)
            self._end(liveness.EXECUTOR_CRASHED, error)
            self._send_again(msg.try_number, redelivery_delay(crashes - 1), self._queue())
        except Exception as failure:
            _log.warning(
                "Step %d of run %s: could not record its crash (%s); its lease will expire "
                "and the sweeper will re-run it",
                msg.step,
                msg.run_id,
                failure,
            )
        return CRASHED

    def _queue(self) -> str | None:
        node = self.loaded.node if self.loaded is not None else None
        return crash_queue(self.db, self.run_row or {}, self.msg.run_id, self.msg.step, node)

    def _fail(
        self,
        error_msg: str,
        events: list[dict[str, Any]] | None = None,
        *,
        refused: bool = False,
        node_name: str | None = None,
    ) -> str:
        """Fail the step and its run in one transaction, fenced on this holder's claim; a
        refusal (G5, G6, G7: the step cannot run here) names the node and is recorded as
        ``refused``. The run stays resumable either way."""
        msg = self.msg
        outcome = REFUSED if refused else FAILED
        if not lifecycle.fail_run(
            self.db,
            msg.run_id,
            error_msg,
            step=msg.step,
            attempt=msg.attempt,
            holder=self.holder,
            worker=self.worker,
            events=events,
            node_name=msg.node_id if refused else node_name,
            outcome=outcome,
        ):
            self._end(LOST, "lease taken over before the failure could be recorded")
            return LOST
        _log.error("Run %s failed at step %d: %s", msg.run_id, msg.step, error_msg)
        return outcome

    def _fail_node(self, cause: str, events: list[dict[str, Any]]) -> str:
        """The node failed for good: fail its run with ``cause``. If the ledger refuses to
        record that (its text, an event's value), that is still the node's failure, not a
        crash of the executor (which would run the node again and blame the worker): the
        run fails with the cause cleaned to ASCII and without the node's events."""
        try:
            return self._fail(cause, events)
        except Exception as exc:
            if _unreachable(exc):
                raise
            _log.warning(
                "Step %d of run %s: the node's failure could not be recorded as it is (%s)",
                self.msg.step,
                self.msg.run_id,
                exc,
            )
            return self._fail(recordable_error(cause, exc), node_name=self.msg.node_id)

    def _record(self, event: str, error_msg: str) -> None:
        """An event on the run for what happened to this delivery; the ledger blinking
        must not turn a refused commit into a crash, so a failed write is only logged."""
        msg = self.msg
        try:
            self.db.save_event(
                msg.run_id, event, step=msg.step, attempt=msg.attempt, error_msg=error_msg
            )
        except Exception as exc:
            _log.warning("Could not record %s on run %s: %s", event, msg.run_id, exc)

    def _end(self, outcome: str, error_msg: str | None = None) -> None:
        msg = self.msg
        self.db.end_attempt(
            msg.run_id, msg.step, msg.attempt, self.worker, outcome, error_msg, holder=self.holder
        )
