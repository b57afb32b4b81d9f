"""The caller's side of distributed runs: ``submit``, ``attach``, ``resume_run``.

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
from pocoflow.errors import UnknownRunError
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


def _registered_graph(flow_name: str, settings: Settings) -> Graph:
    """The graph a worker would build for ``flow_name``: from the registry, importing the
    configured flow modules (``POCOFLOW_FLOWS``) if the name is not registered yet."""
    try:
        builder = get_builder(flow_name)
    except UnknownFlowError:
        import_flow_modules(settings.flows)
        builder = get_builder(flow_name)
    return builder().graph()


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
    graph = flow.graph()
    try:
        registered = get_builder(name)().graph()
    except UnknownFlowError:
        raise ValueError(
            f"Flow {name!r} is not registered, so no worker can find its graph: build it "
            f"with a function decorated @flow({name!r}) in a module the workers import "
            "(--flows / POCOFLOW_FLOWS)"
        ) from None
    if registered.fingerprint != graph.fingerprint:
        from pocoflow.graph import shape_difference

        raise ValueError(
            f"Flow {name!r} differs from the graph its registered builder makes, which is "
            f"what workers would run ({shape_difference(registered.shape(), graph.shape())}); "
            "submit the Flow the builder returns"
        )
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
        graph = _registered_graph(run["flow_name"], settings)
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
