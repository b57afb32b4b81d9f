"""The worker app: ``celery -A workers.app worker`` runs PocoFlow steps.

Configuration comes from the environment (``POCOFLOW_DB_URL``, ``POCOFLOW_BROKER_URL``,
``POCOFLOW_REDIS_URL``, ``POCOFLOW_FLOWS``, ``POCOFLOW_LEASE_SECONDS``,
``POCOFLOW_SWEEP_SECONDS``, ``POCOFLOW_ACKS_LATE``). The one task is a one-call adapter:
every rule of the step protocol lives in ``pocoflow.distributed.executor``.

At worker start the modules of ``POCOFLOW_FLOWS`` are imported (before the pool forks,
so every child has the same registry), and the main process starts the sweeper thread
that re-sends lost steps (G3).
"""

from __future__ import annotations

from typing import Any

from celery import signals

from pocoflow.distributed.celery_app import TASK_NAME, create_app
from pocoflow.distributed.executor import WorkerContext, configure, execute_step
from pocoflow.distributed.publish import Publisher
from pocoflow.distributed.sweeper import SweeperThread
from pocoflow.logging import get_logger
from pocoflow.recorder import open_ledger
from pocoflow.registry import import_flow_modules, registered_flows
from pocoflow.settings import Settings

_log = get_logger("worker")

settings = Settings.from_env()
app = create_app(settings)
configure(lambda: WorkerContext.from_settings(settings, app=app))


@app.task(name=TASK_NAME, bind=True, ignore_result=True)
def step(self: Any, message: dict[str, Any]) -> str:
    """One node step of one run (see ``execute_step``)."""
    return execute_step(message, task_id=self.request.id)


_sweeper: SweeperThread | None = None


@signals.worker_init.connect
def _import_flows(**_: Any) -> None:
    imported = import_flow_modules(settings.flows)
    _log.info(
        "PocoFlow worker: imported %s; flows %s; ledger %r",
        ", ".join(imported) or "no flow modules",
        ", ".join(registered_flows()) or "none",
        settings.masked()["db_url"],
    )


@signals.worker_ready.connect
def _start_sweeper(**_: Any) -> None:
    global _sweeper
    _sweeper = SweeperThread(
        lambda: open_ledger(settings.db_url),
        lambda: Publisher(app, open_ledger(settings.db_url)),
        lease_s=settings.lease_seconds,
        interval_s=settings.sweep_seconds,
    )
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
