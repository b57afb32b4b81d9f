"""A raw Celery relay: the floor a distributed step cannot beat.

Task ``bench.relay(n, key)`` sends itself with ``n - 1`` until 0, then pushes the epoch
time it finished onto the Redis list ``key``: ``n + 1`` tasks one after another through
the broker, each doing nothing else. Same broker, same JSON, same prefetch and ack mode
as PocoFlow's app (``create_app``), so the difference is our step. The caller blocks on
the list (``BLPOP``) rather than polling it, so waiting costs the box nothing.

Two relays beside it keep a record in PostgreSQL, so ``bench.load`` can tell what any
ledger costs from what ours costs: ``bench.durable_relay`` commits one row a hop, and
``bench.leased_relay`` does the least a step of ARCHITECTURE 3 must (claim, commit).

The worker runs ``celery -A bench.relay_app worker --queues relay``; callers send by name
(``send_task``) through an app of their own, so they need not import this module.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
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
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {LEASED_RUNS} (chain TEXT PRIMARY KEY, "
            "status TEXT NOT NULL, steps INTEGER NOT NULL)"
        )
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {LEASED_TABLE} (chain TEXT NOT NULL, "
            "hop INTEGER NOT NULL, status TEXT NOT NULL, lease_owner TEXT, "
            "lease_expires_at DOUBLE PRECISION, PRIMARY KEY (chain, hop))"
        )
        for table, column in ((CHECKPOINT_TABLE, "store_json"), (EVENT_TABLE, "event")):
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} (chain TEXT NOT NULL, "
                f"hop INTEGER NOT NULL, {column} TEXT NOT NULL, PRIMARY KEY (chain, hop))"
            )


def drop_hops_table(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"DROP TABLE IF EXISTS {HOPS_TABLE}, {LEASED_RUNS}, {LEASED_TABLE}, "
            f"{CHECKPOINT_TABLE}, {EVENT_TABLE}"
        )


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


LEASED_TASK = "bench.leased_relay"
#: The leased relay's tables (``create_hops_table``): a run row per chain, a step row
#: per hop, its checkpoint and its event.
LEASED_RUNS = "bench_relay_runs"
LEASED_TABLE = "bench_relay_steps"
CHECKPOINT_TABLE = "bench_relay_checkpoints"
EVENT_TABLE = "bench_relay_events"


@functools.cache
def _producer() -> Any:
    """This process's broker producer, kept, as PocoFlow's publisher keeps one."""
    return app.producer_pool.acquire(block=True)


def _send_next(args: list[Any]) -> None:
    """The successor's message, published as PocoFlow publishes a step's (not through
    ``apply_async``, which costs a publish 450-700 us more)."""
    from pocoflow.distributed.publish import publish_plainly

    publish_plainly(app, _producer(), uuid.uuid4().hex, LEASED_TASK, args, QUEUE)


@app.task(name=LEASED_TASK, ignore_result=True)
def leased_relay(n: int, key: str, chain: str, hop: int) -> None:
    """A relay hop that does the least ARCHITECTURE 3 asks of a step, each part as one
    statement (so one transaction and one round trip, prepared after its fifth use):

    1. guard and claim: the step row's lease taken under a token of this claim, only
       while the run row says running, returning the previous step's checkpoint (the
       Store to load; ``{"n": ...}``, counted up a hop);
    2. commit: the step closed, fenced on the claim's token, its checkpoint, one event,
       the run row and the successor's step row, leased from now (a fenced-out commit
       writes nothing and sends nothing);
    3. the successor's message, published as PocoFlow publishes one.

    No Store codec, values, attempt row, sent mark, hooks nor constraints beyond primary
    keys: about the floor of any implementation of the step protocol on this box. The
    caller writes each chain's run row and first step row (``relay_load``)."""
    conn = _hops_connection()
    params = {"chain": chain, "hop": hop, "holder": uuid.uuid4().hex}
    claimed = conn.execute(
        f"UPDATE {LEASED_TABLE} SET status = 'running', lease_owner = %(holder)s, "
        "lease_expires_at = extract(epoch from now()) + 30 "
        "WHERE chain = %(chain)s AND hop = %(hop)s AND status = 'queued' "
        f"AND EXISTS (SELECT 1 FROM {LEASED_RUNS} WHERE chain = %(chain)s "
        "AND status = 'running') "
        f"RETURNING (SELECT store_json FROM {CHECKPOINT_TABLE} WHERE chain = %(chain)s "
        "AND hop = %(hop)s - 1)",
        params,
    ).fetchone()
    if claimed is None:
        return
    store = json.loads(claimed[0] or '{"n": 0}')
    store["n"] += 1
    committed = conn.execute(
        f"WITH done AS (UPDATE {LEASED_TABLE} SET status = 'done' WHERE chain = %(chain)s "
        "AND hop = %(hop)s AND lease_owner = %(holder)s AND status = 'running' RETURNING 1), "
        f"checkpoint AS (INSERT INTO {CHECKPOINT_TABLE} (chain, hop, store_json) "
        "SELECT %(chain)s, %(hop)s, %(store)s FROM done), "
        f"event AS (INSERT INTO {EVENT_TABLE} (chain, hop, event) "
        "SELECT %(chain)s, %(hop)s, 'node_end' FROM done), "
        f"run AS (UPDATE {LEASED_RUNS} SET steps = %(hop)s + 1, status = CASE WHEN "
        "%(more)s THEN status ELSE 'completed' END WHERE chain = %(chain)s "
        "AND EXISTS (SELECT 1 FROM done)), "
        f"successor AS (INSERT INTO {LEASED_TABLE} (chain, hop, status, lease_expires_at) "
        "SELECT %(chain)s, %(hop)s + 1, 'queued', extract(epoch from now()) + 30 "
        "FROM done WHERE %(more)s) "
        "SELECT count(*) FROM done",
        {**params, "store": json.dumps(store), "more": n > 0},
    ).fetchone()
    if committed != (1,):
        return
    if n > 0:
        _send_next([n - 1, key, chain, hop + 1])
        return
    _redis().rpush(key, repr(time.time()))


SLEEP_TASK = "bench.sleep_item"


@app.task(name=SLEEP_TASK, ignore_result=True)
def sleep_item(seconds: float, key: str) -> None:
    """One item of a raw Celery group: the same simulated call as the MapNode's item."""
    if seconds:
        time.sleep(seconds)  # the call's latency, not a synchronisation
    _redis().rpush(key, repr(time.time()))
