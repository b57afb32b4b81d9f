"""A long queue and a lost broker (G3 without a duplicate storm).

1. Backlog: ``--runs`` runs of a two-step flow are submitted with no worker up (so each
   first step waits behind up to that many messages), then two workers drain them with
   a short lease (2 s, sweep 0.5 s: the old sweeper re-sent every unclaimed step whose
   lease ran out, so a backlog several leases long was sent several times). Printed:
   broker messages per committed step (messages the workers received, counted by a
   ``task_received`` hook this module installs in them, over checkpoints), target 1.0
   (<= 1.05).
2. Broker loss: the same backlog, then Redis is flushed (FLUSHALL: every queued message
   gone, as a restart without persistence) after a worker had marked it. Printed: how
   long one sweep takes to send every lost message again (the old sweeper sent 100 per
   sweep, every 4 s, once their leases ran out), then how long two workers with the
   default settings take to run them, beside part 1's drain (same run, same box).

    python -m bench.backlog [--runs N]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, ".")

from bench.cluster import FLOWS, LOAD_TIMEOUT_S, worker_env, workers
from bench.common import report
from bench.dist_flows import Tick
from pocoflow import Flow, flow
from pocoflow.devcluster import start_redis
from pocoflow.settings import Settings

LEASE_S = 2.0
SWEEP_S = 0.5
TARGET_RATIO = 1.05
DELIVERIES_KEY = "bench:deliveries"
_counter: Any = None


def _count_delivery(**_: Any) -> None:
    """In a worker's main process: one more message received from the broker."""
    global _counter
    if _counter is None:
        import redis as redis_lib

        _counter = redis_lib.Redis.from_url(os.environ["POCOFLOW_BROKER_URL"])
    _counter.incr(DELIVERIES_KEY)


if "POCOFLOW_BROKER_URL" in os.environ:  # imported by a worker (POCOFLOW_FLOWS)
    from celery import signals

    signals.task_received.connect(_count_delivery, weak=False)


@flow("bench_pair")
def bench_pair() -> Flow:
    first = Tick(name="first")
    first.then("default", Tick(name="second"))
    return Flow(start=first, max_steps=2)


def _count(db_path: Path, sql: str) -> int:
    with sqlite3.connect(db_path, timeout=30) as conn:
        return int(conn.execute(sql).fetchone()[0])


def _completed(db_path: Path) -> int:
    return _count(db_path, "SELECT count(*) FROM pf_runs WHERE status = 'completed'")


def _wait_completed(db_path: Path, n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while (done := _completed(db_path)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done}/{n} runs completed in {timeout:.0f}s")
        time.sleep(0.05)  # polling the ledger for progress, not synchronising
    return time.time()


def _submit(settings: Settings, runs: int) -> float:
    from pocoflow.distributed.client import submit

    started = time.perf_counter()
    pair = bench_pair()
    for i in range(runs):
        submit(pair, {"i": i}, settings=settings)
    return time.perf_counter() - started


def _env(db_url: str, broker_url: str, *, short_lease: bool = True) -> dict[str, str]:
    if short_lease:
        env = worker_env(db_url, broker_url, lease_s=LEASE_S, sweep_s=SWEEP_S)
    else:
        env = worker_env(db_url, broker_url)
    env["POCOFLOW_FLOWS"] = f"{FLOWS},bench.backlog"
    return env


def backlog(runs: int, tmp: Path) -> tuple[float, float, float]:
    """Messages per committed step, drain seconds, and submit seconds."""
    import redis as redis_lib

    with start_redis() as server:
        db_path = tmp / "backlog.db"
        db_url = f"sqlite:///{db_path}"
        client = redis_lib.Redis.from_url(server.url)
        settings = Settings(db_url=db_url, broker_url=server.url, lease_seconds=LEASE_S)
        submit_s = _submit(settings, runs)
        with workers(_env(db_url, server.url), tmp, 2):
            ready = time.time()
            done = _wait_completed(db_path, runs, LOAD_TIMEOUT_S * 5)
        steps = _count(db_path, "SELECT count(*) FROM pf_checkpoints WHERE step >= 0")
        return int(client.get(DELIVERIES_KEY) or 0) / steps, done - ready, submit_s


def loss(runs: int, tmp: Path) -> tuple[float, int, float]:
    """``runs`` runs queued, the broker flushed (as a worker had marked it), one sweep in
    this process: its seconds and messages re-sent; then two workers with the default
    settings run everything: seconds from their start to every run completed."""
    import redis as redis_lib

    from pocoflow.db import WorkflowDB
    from pocoflow.distributed.celery_app import create_app
    from pocoflow.distributed.publish import Publisher, SentMarker
    from pocoflow.distributed.sweeper import BrokerSentinel, sweep

    with start_redis() as server:
        db_path = tmp / "loss.db"
        db_url = f"sqlite:///{db_path}"
        settings = Settings(db_url=db_url, broker_url=server.url)
        _submit(settings, runs)
        client = redis_lib.Redis.from_url(server.url)
        sentinel = BrokerSentinel(client)
        sentinel.set()  # what the first sweep of a running worker does
        client.flushall()
        db = WorkflowDB(db_url)
        publisher = Publisher(create_app(settings), db, marker=SentMarker(db))
        started = time.perf_counter()
        report = sweep(db, publisher, lease_s=settings.lease_seconds, sentinel=sentinel)
        sweep_s = time.perf_counter() - started
        resent = client.llen("pocoflow")
        if report.bulk_resent != runs or resent != runs:
            print(f"         re-sent {report.bulk_resent}, in the broker {resent}, of {runs}")
        with workers(_env(db_url, server.url, short_lease=False), tmp, 2):
            ready = time.time()
            done = _wait_completed(db_path, runs, LOAD_TIMEOUT_S * 5)
        db.close()
        return sweep_s, resent, done - ready


def main(runs: int = 10_000) -> bool:
    print(
        f"backlog: {runs} runs of a 2-step flow queued before 2 workers start "
        f"(lease {LEASE_S:g} s, sweep {SWEEP_S:g} s), private Redis, SQLite ledger"
    )
    with tempfile.TemporaryDirectory(prefix="pocoflow-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        ratio, drain_s, submit_s = backlog(runs, tmp)
        ok = report(
            "broker messages per committed step",
            ratio,
            "msg",
            f"{runs} runs drained in {drain_s:.1f} s (submitted in {submit_s:.1f} s); "
            f"target <= {TARGET_RATIO:g}",
            ratio <= TARGET_RATIO,
            digits=3,
        )
        sweep_s, resent, drained_s = loss(runs, tmp)
        ok &= report(
            "FLUSHALL -> one sweep re-sends every message",
            sweep_s,
            "s",
            f"{resent} of {runs} messages back in the broker; the old sweeper: 100 per 4 s "
            f"sweep per worker, after a lease: ~{runs / 100 * 4:.0f} s with one worker",
            resent == runs,
        )
        ok &= report(
            "then 2 workers (default settings) run them",
            drained_s,
            "s",
            f"the backlog above drained in {drain_s:.1f} s -> {drained_s / drain_s:.2f}x",
            None,
        )
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    sys.exit(0 if main(parser.parse_args().runs) else 1)
