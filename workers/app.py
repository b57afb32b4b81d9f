"""The worker app: ``celery -A workers.app worker`` runs PocoFlow steps.

Configuration comes from the environment (``POCOFLOW_DB_URL``, ``POCOFLOW_BROKER_URL``,
``POCOFLOW_REDIS_URL``, ``POCOFLOW_FLOWS``, ``POCOFLOW_LEASE_SECONDS``,
``POCOFLOW_SWEEP_SECONDS``, ``POCOFLOW_HEARTBEAT_SECONDS``, ``POCOFLOW_MAX_CRASHES``,
``POCOFLOW_STEP_TIMEOUT``, ``POCOFLOW_ACKS_LATE``). Each task is a one-call adapter:
every rule of the step protocol lives in ``pocoflow.distributed.executor`` (and, for
the items of a map step, ``pocoflow.distributed.itemtask``).

The modules of ``POCOFLOW_FLOWS`` are imported when this module loads: before the pool
forks, so every child has the same registry, and loudly, so a worker whose flows cannot
be imported fails at start instead of refusing every step. Once the worker is ready, the
main process starts its liveness heartbeat, which also tells the ledger which step
messages it holds prefetched but not started, and the sweeper thread that re-sends lost
steps (G3).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery import signals

from pocoflow.distributed import liveness
from pocoflow.distributed.celery_app import ITEM_TASK_NAME, TASK_NAME, create_app
from pocoflow.distributed.executor import (
    LEDGER_UNREACHABLE,
    WorkerContext,
    configure,
    default_worker_id,
    execute_step,
    redelivery_delay,
)
from pocoflow.distributed.itemtask import execute_item
from pocoflow.distributed.publish import Publisher, SentMarker
from pocoflow.distributed.sweeper import SweeperThread, broker_sentinel
from pocoflow.distributed.transport import KeepOneRedisClient
from pocoflow.ledger.prune import Pruner
from pocoflow.logging import get_logger
from pocoflow.recorder import open_ledger
from pocoflow.registry import import_flow_modules, registered_flows
from pocoflow.settings import Settings

_log = get_logger("worker")

settings = Settings.from_env()
app = create_app(settings)
app.steps["consumer"].add(KeepOneRedisClient)
configure(lambda: WorkerContext.from_settings(settings, app=app))

# Because flow modules usually live in the project directory the worker starts in, which
# the celery command does not put on sys.path.
if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
imported_flow_modules = import_flow_modules(settings.flows)


# ``max_retries=None`` on the task itself: Celery reads None in ``retry()`` as "the task's
# default" (3), which dropped a step whose ledger stayed unreachable past 3 redeliveries.
@app.task(name=TASK_NAME, bind=True, ignore_result=True, max_retries=None)
def step(self: Any, message: dict[str, Any]) -> str:
    """One node step of one run (see ``execute_step``); a message that met an unreachable
    ledger goes back to its queue with a countdown (Celery's retry: same queue, JSON)."""
    outcome = execute_step(message, task_id=self.request.id)
    if outcome == LEDGER_UNREACHABLE:
        raise self.retry(countdown=redelivery_delay(self.request.retries))
    return outcome


@app.task(name=ITEM_TASK_NAME, bind=True, ignore_result=True, max_retries=None)
def item(self: Any, message: dict[str, Any]) -> str:
    """One item of a map step (see ``execute_item``); redelivered like a step when the
    ledger was unreachable."""
    outcome = execute_item(message, task_id=self.request.id)
    if outcome == LEDGER_UNREACHABLE:
        raise self.retry(countdown=redelivery_delay(self.request.retries))
    return outcome


_sweeper: SweeperThread | None = None


def _marked_publisher() -> Publisher:
    db = open_ledger(settings.db_url)
    return Publisher(app, db, marker=SentMarker(db))


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    global _sweeper
    _log.info(
        "PocoFlow worker ready: flows %s (from %s); ledger %s",
        ", ".join(registered_flows()) or "none",
        ", ".join(imported_flow_modules) or "no flow modules",
        settings.masked()["db_url"],
    )
    liveness.ensure(
        open_ledger(settings.db_url),
        default_worker_id(),
        settings.heartbeat_seconds,
        held=liveness.celery_held(TASK_NAME, ITEM_TASK_NAME),
    )
    _sweeper = SweeperThread(
        lambda: open_ledger(settings.db_url),
        # Marks in a background batch: a bulk re-send after a broker loss (thousands of
        # messages) must not pay one ledger write per message.
        _marked_publisher,
        lease_s=settings.lease_seconds,
        interval_s=settings.sweep_seconds,
        pruner=None if settings.prune_older_than is None else Pruner(settings.prune_older_than),
        sentinel_factory=lambda: broker_sentinel(settings.broker_url),
        dead_after_s=liveness.dead_after(settings.heartbeat_seconds),
        max_crashes=settings.max_crashes,
    )
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    liveness.stop()
