"""The caller's side of distributed runs: ``submit``, ``attach``, ``resume_run``,
``fork_run``, ``send``.

``submit`` writes everything a worker needs into the ledger (run row with the initial
Store, fingerprint, graph shape, max_steps, queue; the step-0 outbox row leased from now)
*before* publishing, so a message can never name a run the ledger does not know, and a
publish that fails is repaired by the sweeper (G3). It returns at once.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pocoflow.commit import NextStep
from pocoflow.distributed import lifecycle
from pocoflow.distributed.celery_app import DEFAULT_QUEUE
from pocoflow.distributed.control import (
    CANCEL,
    PAUSE,
    LedgerControl,
    RemoteControl,
    clear_flag,
    redis_client,
)
from pocoflow.distributed.graphs import shape_text
from pocoflow.distributed.message import StepMessage
from pocoflow.errors import RunSetupError, UnknownRunError
from pocoflow.hooks import FLOW_START
from pocoflow.logging import get_logger
from pocoflow.recorder import open_ledger
from pocoflow.registry import UnknownFlowError, get_builder, import_flow_modules
from pocoflow.runner import RunHandle
from pocoflow.settings import Settings, mask_url
from pocoflow.step import utc_now
from pocoflow.store import Store
from pocoflow.usage import Budget

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from pocoflow.distributed.publish import Publisher
    from pocoflow.flow import Flow
    from pocoflow.graph import Graph

_log = get_logger("distributed.client")

RESUMABLE = ("failed", "cancelled", "paused")


def _settings(settings: Settings | None, db_url: str | None) -> Settings:
    if settings is None:
        return Settings.from_env(db_url=db_url)
    if db_url is not None:
        from dataclasses import replace

        return replace(settings, db_url=db_url)
    return settings


@functools.lru_cache(maxsize=8)
def _publisher(settings: Settings) -> Publisher:
    """One Celery app (and broker connection pool) per settings per process."""
    from pocoflow.distributed.celery_app import create_app
    from pocoflow.distributed.publish import Publisher

    return Publisher(create_app(settings), open_ledger(settings.db_url))


def _handle(
    run_id: str,
    db: WorkflowDB,
    settings: Settings,
    store: Store | None = None,
    *,
    on_workers: bool = True,
) -> RunHandle:
    if not on_workers:  # a run_background() run of some process: steer it by the ledger
        return RunHandle(run_id, db=db, control=LedgerControl(run_id, db), initial_store=store)
    control = RemoteControl(
        run_id,
        db,
        redis_url=settings.redis_url,
        publisher_factory=lambda: _publisher(settings),
        lease_s=settings.lease_seconds,
    )
    return RunHandle(run_id, db=db, control=control, initial_store=store)


def _registered_flow(flow_name: str, settings: Settings) -> Flow:
    """The flow a worker would build for ``flow_name``: from the registry, importing the
    configured flow modules (``POCOFLOW_FLOWS``) if the name is not registered yet."""
    try:
        builder = get_builder(flow_name)
    except UnknownFlowError:
        import_flow_modules(settings.flows)
        builder = get_builder(flow_name)
    return builder()


def submit(
    flow: Flow,
    store: Store | dict[str, Any],
    *,
    run_id: str | None = None,
    queue: str | None = None,
    db_url: str | None = None,
    settings: Settings | None = None,
) -> RunHandle:
    """Start ``flow`` on the workers and return its handle at once.

    The flow must be registered (``@flow("name")``) and its registered builder must build
    this very graph, because the workers rebuild it from the registry by name (G6, G7).
    A Store value that would not round-trip raises ``TypeError`` naming the key before
    anything is written (G7).
    """
    from pocoflow.flow import as_store

    settings = _settings(settings, db_url)
    store = as_store(store)
    db = open_ledger(settings.db_url)
    first = record_run(db, flow, store, run_id=run_id, queue=queue, lease_s=settings.lease_seconds)
    sent = _publisher(settings).send(first, queue=flow.start.queue or queue)
    if not sent:
        _log.warning(
            "Run %s is recorded but its first step could not be published to %s yet; a "
            "worker's sweeper will send it",
            first.run_id,
            mask_url(settings.broker_url),
        )
    _log.info("Flow %r submitted, run_id=%s", flow.flow_name, first.run_id)
    return _handle(first.run_id, db, settings, store)


def record_run(
    db: WorkflowDB,
    flow: Flow,
    store: Store,
    *,
    run_id: str | None = None,
    queue: str | None = None,
    lease_s: float,
) -> StepMessage:
    """The ledger half of ``submit``: check the flow is registered as is, write the run
    row (queued) with its initial Store and the step-0 outbox row leased from now;
    returns the message to publish. Nothing is written if a check fails (a Store that
    does not fit the flow's schema raises ``TypeError`` naming the key)."""
    from pocoflow.flow import make_run_id

    name = flow.flow_name
    graph = _registered_as_is(flow, ValueError, "submit the Flow the builder returns")
    if flow.schema:  # what every worker will check when it rebuilds the Store: now
        Store(store.as_dict(), schema=flow.schema, name=store.name)
    run_id = run_id or flow.run_id or make_run_id(name)
    created = db.create_run(
        run_id,
        name,
        status="queued",
        fingerprint=graph.fingerprint,
        max_steps=flow.max_steps,
        initial_store=store,
        start_node=graph.start_id,
        # Always set, so a distributed run is told from a local one by its queue.
        queue=queue or DEFAULT_QUEUE,
        graph_shape=shape_text(graph),
        start_events=[{"event": FLOW_START, "node_name": graph.start_id, "ts": utc_now()}],
        first_step=NextStep(0, graph.start_id, 1, lease_s=lease_s, queue=flow.start.queue),
        max_tokens=flow.budget.max_tokens,
        max_cost_usd=flow.budget.max_cost_usd,
    )
    if not created:
        raise ValueError(f"Run id {run_id!r} already exists in ledger {db.url}; pick another")
    flow._run_id = run_id
    return StepMessage(run_id, name, 0, graph.start_id, 1)


def _registered_as_is(flow: Flow, error: type[ValueError], advice: str, about: str = "") -> Graph:
    """``flow``'s graph, if the workers would build the same one: ``error`` (prefixed
    with ``about``) when its name is not registered, or its registered builder makes
    another graph (G6, G7)."""
    name = flow.flow_name
    graph = flow.graph()
    try:
        registered = get_builder(name)().graph()
    except UnknownFlowError:
        raise error(
            f"{about}Flow {name!r} is not registered, so no worker can find its graph: build "
            f"it with a function decorated @flow({name!r}) in a module the workers import "
            "(--flows / POCOFLOW_FLOWS)"
        ) from None
    if registered.fingerprint != graph.fingerprint:
        from pocoflow.graph import shape_difference

        raise error(
            f"{about}Flow {name!r} differs from the graph its registered builder makes, which "
            f"is what workers would run ({shape_difference(registered.shape(), graph.shape())}); "
            f"{advice}"
        )
    return graph


def _stranded(db: WorkflowDB, run_id: str, run: dict[str, Any]) -> bool:
    """A run still marked running whose next step failed or never got its row: a process
    stopped between two of its writes (failing a step, then its run). Nothing else will
    move it, so resume may."""
    if run["status"] != "running":
        return False
    latest = db.latest_checkpoint(run_id)
    if latest is None or latest.get("next_node") is None:
        return False
    row = db.get_step(run_id, latest["step"] + 1)
    return row is None or row["status"] == "failed"


def attach(
    run_id: str, db_url: str | None = None, *, settings: Settings | None = None
) -> RunHandle:
    """A handle on any recorded run, from any process; ``UnknownRunError`` (a
    ``KeyError``) naming an unknown id."""
    settings = _settings(settings, db_url)
    db = open_ledger(settings.db_url)
    run = db.get_run(run_id)
    if run is None:
        raise UnknownRunError(f"Unknown run id {run_id!r} in ledger {db.url}")
    # Submitted runs record their queue; in-process runs have none.
    return _handle(run_id, db, settings, on_workers=bool(run.get("queue")))


def resume_run(
    run_id: str,
    *,
    force: bool = False,
    db_url: str | None = None,
    settings: Settings | None = None,
    max_tokens: int | None = None,
    max_cost_usd: float | None = None,
) -> RunHandle:
    """Continue a failed, cancelled or paused distributed run: its outstanding step is
    sent again under a new attempt. ``max_tokens`` / ``max_cost_usd`` raise the run's
    budget first (a run paused on its budget pauses again while it is still over it).

    ``force`` accepts the flow's current graph (a run refused for a graph change, G6): the
    run's fingerprint and shape are re-recorded from this process's registry (the flow
    modules of ``POCOFLOW_FLOWS`` are imported if needed).
    """
    settings = _settings(settings, db_url)
    db = open_ledger(settings.db_url)
    run = db.get_run(run_id)
    if run is None:
        raise KeyError(f"Unknown run id {run_id!r} in ledger {db.url}")
    if run["status"] == "waiting":
        raise ValueError(
            f"Run {run_id!r} is waiting for a value (see `pocoflow show {run_id}`): send it "
            f"with `pocoflow send {run_id} KEY JSON` or handle.send(key, value), and the run "
            "goes on by itself"
        )
    if run["status"] not in RESUMABLE and not _stranded(db, run_id, run):
        raise ValueError(
            f"Run {run_id!r} is {run['status']}: only a failed, cancelled or paused run can "
            "be resumed"
        )
    if max_tokens is not None or max_cost_usd is not None:
        Budget(max_tokens, max_cost_usd)  # ValueError for a bad limit, before any write
        db.set_budget(run_id, max_tokens=max_tokens, max_cost_usd=max_cost_usd)
    if force:
        graph = _registered_flow(run["flow_name"], settings).graph()
        db.update_run(run_id, fingerprint=graph.fingerprint, graph_shape=shape_text(graph))
    if settings.redis_url:
        client = redis_client(settings.redis_url)
        for flag in (CANCEL, PAUSE):
            clear_flag(client, run_id, flag)
    publisher = _publisher(settings)
    # The status this call read, and only that one: a stopped run that another resumer
    # restarted meanwhile is running, and taking its step over again would only fence
    # out that resumer's fresh attempt.
    statuses = ("running",) if run["status"] == "running" else RESUMABLE
    if not lifecycle.restart(
        db, run_id, publisher, lease_s=settings.lease_seconds, status_in=statuses
    ):
        raise ValueError(f"Run {run_id!r} changed status while resuming; look again")
    return _handle(run_id, db, settings)


def fork_run(
    run_id: str,
    from_step: int,
    *,
    new_run_id: str | None = None,
    queue: str | None = None,
    db_url: str | None = None,
    settings: Settings | None = None,
) -> RunHandle:
    """Start a new run on the workers from checkpoint ``from_step`` of ``run_id`` and
    return its handle at once: the workers' twin of ``Flow.fork``.

    The run forked may have run on the workers or in a process; its flow must be
    registered under the name the ledger recorded (the flow modules of ``POCOFLOW_FLOWS``
    are imported if needed), because the workers rebuild the graph by that name. The fork
    keeps the step numbers (its first step is ``from_step + 1``), runs the node the
    checkpoint recorded as next, records ``parent_run_id`` / ``forked_from_step``, and
    starts its usage at zero under the flow's budget; the parent is only read. Its queue
    is ``queue``, else the parent's, else the default. ``UnknownRunError`` for an unknown
    run; ``RunSetupError`` (a ``ValueError``) naming run and step for a missing
    checkpoint, a checkpoint with nothing after it, or a flow no registered builder makes.
    """
    settings = _settings(settings, db_url)
    db = open_ledger(settings.db_url)
    first, first_queue = record_fork(
        db,
        run_id,
        from_step,
        _registered_flow_of(db, run_id, from_step, settings),
        new_run_id=new_run_id,
        queue=queue,
        lease_s=settings.lease_seconds,
    )
    if not _publisher(settings).send(first, queue=first_queue):
        _log.warning(
            "Fork %s of run %s is recorded but its first step could not be published to %s "
            "yet; a worker's sweeper will send it",
            first.run_id,
            run_id,
            mask_url(settings.broker_url),
        )
    _log.info("Run %s forked from step %d as %s", run_id, from_step, first.run_id)
    return _handle(first.run_id, db, settings)


def _registered_flow_of(db: WorkflowDB, run_id: str, from_step: int, settings: Settings) -> Flow:
    """The registered flow that runs ``run_id``'s graph on the workers: by the flow name
    the ledger recorded, never by a module the ledger names."""
    run = db.get_run(run_id)
    if run is None:
        raise UnknownRunError(f"Unknown run id {run_id!r} in ledger {db.url}")
    name = run["flow_name"]
    try:
        return _registered_flow(name, settings)
    except (UnknownFlowError, ImportError) as exc:
        raise RunSetupError(
            f"Run {run_id!r} step {from_step}: it is a run of flow {name!r}, which no "
            f"registered builder makes here ({exc}); the workers find a graph only by its "
            f"registered name: register it with @flow({name!r}) in a module named by --flows "
            "/ POCOFLOW_FLOWS"
        ) from None


def record_fork(
    db: WorkflowDB,
    run_id: str,
    from_step: int,
    flow: Flow,
    *,
    new_run_id: str | None = None,
    queue: str | None = None,
    lease_s: float,
) -> tuple[StepMessage, str | None]:
    """The ledger half of ``fork_run``: check the checkpoint, write the fork's run row
    (queued) with checkpoint ``from_step`` of ``run_id`` as its Store and the outbox row
    of its first step, leased from now, in one transaction. Returns the message to publish
    and its queue. ``flow`` is checked as ``record_run`` checks it (registered, built as
    its registered builder builds it) and must be of the run's flow name; which node runs
    first comes from the checkpoint, never from the caller. Nothing is written if a check
    fails."""
    from pocoflow.flow import _with_schema, fork_point, make_run_id

    run = db.get_run(run_id)
    if run is None:
        raise UnknownRunError(f"Unknown run id {run_id!r} in ledger {db.url}")
    about = f"Run {run_id!r} step {from_step}: "
    if new_run_id is not None and not new_run_id.strip():
        raise RunSetupError(f"{about}the fork's run id is empty: give one, or none")
    if flow.flow_name != run["flow_name"]:
        raise RunSetupError(
            f"{about}it is a run of flow {run['flow_name']!r}, not of {flow.flow_name!r}: "
            "a fork runs the flow of its parent"
        )
    graph = _registered_as_is(flow, RunSetupError, "fork with the Flow it returns", about)
    next_id = fork_point(db, run_id, from_step, run, flow.max_steps)["next_node"]
    try:
        node = graph.node(next_id)
    except KeyError:
        raise RunSetupError(
            f"Run {run_id!r} step {from_step} is followed by node {next_id!r}, which the "
            f"registered flow {flow.flow_name!r} does not have (its graph changed): fork "
            "from another step"
        ) from None
    store = _with_schema(db.load_checkpoint(run_id, from_step), db, run_id, flow.schema, run)
    fork_id = new_run_id or make_run_id(flow.flow_name)
    fork_queue = queue or run.get("queue") or DEFAULT_QUEUE
    created = db.create_run(
        fork_id,
        flow.flow_name,
        status="queued",
        fingerprint=graph.fingerprint,
        max_steps=flow.max_steps,
        initial_store=store,
        initial_step=from_step,
        start_node=next_id,
        parent_run_id=run_id,
        forked_from_step=from_step,
        queue=fork_queue,
        graph_shape=shape_text(graph),
        start_events=[{"event": FLOW_START, "node_name": node.name, "ts": utc_now()}],
        first_step=NextStep(from_step + 1, next_id, 1, lease_s=lease_s, queue=node.queue),
        # The fork's own budget, as Flow.fork: its usage starts at zero under it.
        max_tokens=flow.budget.max_tokens,
        max_cost_usd=flow.budget.max_cost_usd,
        builder=run.get("builder"),
    )
    if not created:
        raise RunSetupError(f"Run id {fork_id!r} already exists in ledger {db.url}; pick another")
    first = StepMessage(fork_id, flow.flow_name, from_step + 1, next_id, 1)
    return first, node.queue or fork_queue


def send(
    run_id: str,
    key: str,
    value: Any,
    *,
    db_url: str | None = None,
    settings: Settings | None = None,
) -> str:
    """``attach(run_id).send(key, value)``, returning the run's status afterwards (a run
    on the workers that waited on ``key`` is ``running`` again; a run that ran in a
    process stays ``waiting`` until ``flow.resume``). What ``pocoflow send`` calls."""
    handle = attach(run_id, db_url, settings=settings)
    handle.send(key, value)
    return handle.status
