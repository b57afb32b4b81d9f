"""A raw Celery relay: the floor a distributed step cannot beat.

Task ``bench.relay(n, key)`` sends itself with ``n - 1`` until 0, then pushes the epoch
time it finished onto the Redis list ``key``: ``n + 1`` tasks one after another through
the broker, each doing nothing else. Same broker, same JSON, same prefetch and ack mode
as PocoFlow's app (``create_app``), so the difference is our step. The caller blocks on
the list (``BLPOP``) rather than polling it, so waiting costs the box nothing.

The worker runs ``celery -A bench.relay_app worker --queues relay``; callers send by name
(``send_task``) through an app of their own, so they need not import this module.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from pocoflow.distributed.celery_app import create_app
from pocoflow.settings import Settings

TASK = "bench.relay"
QUEUE = "relay"

settings = Settings.from_env()
app = create_app(settings)
app.conf.task_routes = {TASK: {"queue": QUEUE}}


@functools.cache
def _redis() -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url)


@app.task(name=TASK, ignore_result=True)
def relay(n: int, key: str) -> None:
    if n > 0:
        relay.apply_async(args=[n - 1, key], queue=QUEUE)
        return
    _redis().rpush(key, repr(time.time()))


DURABLE_TASK = "bench.durable_relay"
#: The table each durable relay hop commits a row to (``create_hops_table``).
HOPS_TABLE = "bench_relay_hops"
#: The PostgreSQL database of the durable relay (a psycopg URL), from the environment.
DURABLE_DB_ENV = "POCOFLOW_BENCH_RELAY_DB"


@functools.cache
def _hops_connection() -> Any:
    import os

    import psycopg

    return psycopg.connect(os.environ[DURABLE_DB_ENV], autocommit=True)


def create_hops_table(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {HOPS_TABLE} "
            "(chain TEXT NOT NULL, hop INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL, "
            "PRIMARY KEY (chain, hop))"
        )


def drop_hops_table(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {HOPS_TABLE}")


@app.task(name=DURABLE_TASK, ignore_result=True)
def durable_relay(n: int, key: str, chain: str) -> None:
    """A relay hop that first commits one row to PostgreSQL (one statement, one commit,
    as durable as the hop's record gets): the floor for any relay that keeps a ledger,
    beside which PocoFlow's two fenced transactions per step are measured."""
    _hops_connection().execute(
        f"INSERT INTO {HOPS_TABLE} (chain, hop, at) VALUES (%s, %s, %s)", (chain, n, time.time())
    )
    if n > 0:
        durable_relay.apply_async(args=[n - 1, key, chain], queue=QUEUE)
        return
    _redis().rpush(key, repr(time.time()))


SLEEP_TASK = "bench.sleep_item"


@app.task(name=SLEEP_TASK, ignore_result=True)
def sleep_item(seconds: float, key: str) -> None:
    """One item of a raw Celery group: the same simulated call as the MapNode's item."""
    if seconds:
        time.sleep(seconds)  # the call's latency, not a synchronisation
    _redis().rpush(key, repr(time.time()))
