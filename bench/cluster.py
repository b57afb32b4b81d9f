"""Worker processes for the distributed benchmarks, and the raw relay they are compared to.

Each section starts its own private Redis and workers and stops every process it started
on the way out, even when a measurement fails: workers are killed (``kill -9`` of their
process group, which is instant and leaves nothing behind), Redis is stopped by
``start_redis``. Readiness and completion are polled with timeouts, never slept for.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import relay_app
from pocoflow import devcluster
from pocoflow.cli_worker import worker_argv
from pocoflow.devcluster import WorkerProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
FLOWS = "bench.dist_flows"
POCOFLOW_APP = "workers.app"
RELAY_APP = "bench.relay_app"
#: A load that takes longer than this has hung: fail rather than wait forever.
LOAD_TIMEOUT_S = 120.0


def worker_env(
    db_url: str,
    broker_url: str,
    *,
    lease_s: float | None = None,
    sweep_s: float | None = None,
    acks_late: bool | None = None,
    task_events: bool | None = None,
) -> dict[str, str]:
    """A worker's environment: our POCOFLOW_* only (lease and sweep at their defaults
    unless given), the repository on PYTHONPATH so ``bench.*`` imports."""
    env = devcluster.worker_environment(
        db_url, broker_url, FLOWS, lease_s=lease_s, sweep_s=sweep_s, pythonpath=str(REPO_ROOT)
    )
    if acks_late is not None:
        env["POCOFLOW_ACKS_LATE"] = "1" if acks_late else "0"
    if task_events is not None:
        env["POCOFLOW_TASK_EVENTS"] = "1" if task_events else "0"
    return env


def start_worker(
    name: str,
    env: dict[str, str],
    log_dir: Path,
    app: str,
    *,
    concurrency: int = 1,
    pool: str | None = None,
) -> WorkerProcess:
    """One worker node (concurrency 1 unless given), as ``pocoflow worker`` starts it (not
    waiting). Its temp files go to ``log_dir``, removed with it: a worker killed with
    kill -9 (as every bench stops them) leaves its ``pymp-*`` dirs behind."""
    env = {**env, "TMPDIR": str(log_dir)}
    if app == POCOFLOW_APP:
        return devcluster.start_worker(
            name, env, log_dir, cwd=REPO_ROOT, concurrency=concurrency, pool=pool
        )
    argv = worker_argv(concurrency=concurrency, queues=relay_app.QUEUE, pool=pool,
                       hostname=f"{name}@%h", extra=["--without-heartbeat"])  # fmt: skip
    argv[argv.index(POCOFLOW_APP)] = app
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return WorkerProcess(name, popen, log_path)


@contextlib.contextmanager
def workers(
    env: dict[str, str],
    log_dir: Path,
    n: int = 1,
    app: str = POCOFLOW_APP,
    *,
    concurrency: int = 1,
    pool: str | None = None,
) -> Iterator[list[WorkerProcess]]:
    """``n`` ready worker nodes of ``app``, all killed on exit (also the ones added to
    the yielded list, e.g. a replacement for a worker the caller killed)."""
    kind = "relay" if app == RELAY_APP else "pocoflow"
    started: list[WorkerProcess] = []
    try:
        for _ in range(n):
            name = f"{kind}-{uuid.uuid4().hex[:6]}"
            started.append(
                start_worker(name, env, log_dir, app, concurrency=concurrency, pool=pool)
            )
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        for worker in started:
            worker.kill()


def relay_client(broker_url: str) -> tuple[Any, Any]:
    """A Celery app to send ``bench.relay`` by name and a Redis client to wait on it."""
    import redis

    from pocoflow.distributed.celery_app import create_app
    from pocoflow.settings import Settings

    app = create_app(Settings(db_url="sqlite:///unused.db", broker_url=broker_url))
    # Because redis-py 8 reads with a 5 s socket timeout by default, which a BLPOP waiting
    # for a long load outlasts.
    return app, redis.Redis.from_url(broker_url, socket_timeout=LOAD_TIMEOUT_S + 10)


def relay_load(
    app: Any,
    client: Any,
    chains: int,
    tasks: int,
    *,
    durable: bool = False,
    leased_db: str | None = None,
) -> tuple[float, float]:
    """Start ``chains`` relays of ``tasks`` tasks each at once (``durable``: each hop
    commits a row to PostgreSQL first, ``relay_app.durable_relay``; ``leased_db``, a
    psycopg URL: each hop claims and commits its step there, ``relay_app.leased_relay``);
    block until every one finished. Returns (epoch time the first was sent, epoch time
    the last finished)."""
    key = f"relay-{uuid.uuid4().hex}"
    started = time.time()
    if leased_db is not None:  # each chain's run row and first step row, as a submit's
        import psycopg

        names = [(f"{key}-{chain}",) for chain in range(chains)]
        with psycopg.connect(leased_db, autocommit=True) as conn, conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {relay_app.LEASED_RUNS} (chain, status, steps) "
                "VALUES (%s, 'running', 0)",
                names,
            )
            cur.executemany(
                f"INSERT INTO {relay_app.LEASED_TABLE} (chain, hop, status) "
                "VALUES (%s, 0, 'queued')",
                names,
            )
    for chain in range(chains):
        if leased_db is not None:
            args = [tasks - 1, key, f"{key}-{chain}", 0]
            app.send_task(relay_app.LEASED_TASK, args=args, queue=relay_app.QUEUE)
        elif durable:
            args = [tasks - 1, key, f"{key}-{chain}"]
            app.send_task(relay_app.DURABLE_TASK, args=args, queue=relay_app.QUEUE)
        else:
            app.send_task(relay_app.TASK, args=[tasks - 1, key], queue=relay_app.QUEUE)
    finished = []
    for _ in range(chains):
        popped = client.blpop([key], timeout=LOAD_TIMEOUT_S)
        if popped is None:
            raise TimeoutError(f"relay load: {len(finished)}/{chains} chains in {LOAD_TIMEOUT_S}s")
        finished.append(float(popped[1]))
    return started, max(finished)


def iso_s(text: str) -> float:
    """Epoch seconds of a ledger ISO-8601 time (the 0.2 columns are ISO text)."""
    return datetime.fromisoformat(text).timestamp()
