"""The Celery app every PocoFlow process builds the same way: workers, clients, sweepers.

Celery is only the transport. Which step runs, and whether it already ran, is decided by
the ledger (leases, fencing, outbox), so the broker settings here aim at low latency and
small blast radius rather than delivery guarantees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pocoflow.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

TASK_NAME = "pocoflow.step"
#: The task of one map item (``executor_items.execute_item``).
ITEM_TASK_NAME = "pocoflow.item"
DEFAULT_QUEUE = "pocoflow"
ACKS_LATE_ENV = "POCOFLOW_ACKS_LATE"
TASK_EVENTS_ENV = "POCOFLOW_TASK_EVENTS"

# Early acknowledgement by default, because the ledger (worker heartbeats and leases, not
# the broker) finds a step whose worker died (G3): with late ack a killed task is acked anyway (Celery's
# task_reject_on_worker_lost is off) or redelivered only after the visibility timeout,
# so late ack buys nothing but a broker round trip per step. Measured with
# `python -m bench.distributed_latency --postgres private` (100-step chain, 1 worker,
# Redis, 2 cores): early ack 1.5 ms/step on SQLite, 3.6 on PostgreSQL; late ack 1.9 and
# 4.0. POCOFLOW_ACKS_LATE=1 turns late ack on.
DEFAULT_ACKS_LATE = False

# Task events off by default because each step then costs three more broker messages
# (task-received, -started, -succeeded) that nobody reads unless Flower watches; Flower
# turns them on in the workers it sees while it runs (its ``enable_events``), and
# POCOFLOW_TASK_EVENTS=1 turns them on from the start (the deployments in deploy/ and
# docker-compose.yml do). Measured with `python -m bench.distributed_latency --events`.
DEFAULT_TASK_EVENTS = False

#: Because an unacked message is redelivered after this long: far above any lease, so
#: Redis never re-delivers a step the sweeper is already handling (1 h is Celery's own
#: default; set explicitly so a countdown retry is not redelivered early).
VISIBILITY_TIMEOUT_S = 3600

#: Publishing a step message must not hang a worker when Redis is down: a failed publish
#: leaves the outbox row unsent, and the sweeper sends it later (G3).
PUBLISH_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0.0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}


def _flag_from_env(var: str, default: bool, env: Mapping[str, str] | None) -> bool:
    raw = (os.environ if env is None else env).get(var, "").strip().lower()
    if raw in ("", "default"):
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{var} must be 1/0, true/false, yes/no or on/off, got {raw!r}")


def acks_late_from_env(env: Mapping[str, str] | None = None) -> bool:
    return _flag_from_env(ACKS_LATE_ENV, DEFAULT_ACKS_LATE, env)


def task_events_from_env(env: Mapping[str, str] | None = None) -> bool:
    """Whether workers send task events (what Flower lists tasks from)."""
    return _flag_from_env(TASK_EVENTS_ENV, DEFAULT_TASK_EVENTS, env)


def create_app(
    settings: Settings | None = None,
    *,
    acks_late: bool | None = None,
    task_events: bool | None = None,
) -> Celery:
    """A Celery app for ``settings`` (default ``Settings.from_env()``).

    JSON only (G7): no pickle can reach a worker. No result backend: a step's outcome is
    its ledger commit. Prefetch 1: a worker holds at most one step it is not running, so
    a busy worker does not sit on steps another could run.
    """
    try:
        from celery import Celery
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "The distributed executor needs Celery: pip install 'pocoflow[distributed]'"
        ) from exc

    settings = settings or Settings.from_env()
    if acks_late is None:
        acks_late = acks_late_from_env()
    if task_events is None:
        task_events = task_events_from_env()
    app = Celery("pocoflow", set_as_current=False)
    app.conf.update(_config(settings, acks_late, task_events))
    return app


def _config(settings: Settings, acks_late: bool, task_events: bool) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S},
        # JSON only, both ways (G7).
        "accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": acks_late,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": {
            TASK_NAME: {"queue": DEFAULT_QUEUE},
            ITEM_TASK_NAME: {"queue": DEFAULT_QUEUE},
        },
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        # PocoFlow configures its own logging; Celery must not take over the root logger.
        "worker_hijack_root_logger": False,
        "worker_send_task_events": task_events,
        "task_send_sent_event": False,
        "enable_utc": True,
    }
