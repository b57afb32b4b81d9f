"""A long queue and a lost broker (G3 without a duplicate storm).

1. Backlog: ``--runs`` runs of a two-step flow are submitted with no worker up (so each
   first step waits behind up to that many messages), then two workers drain them with
   a short lease (2 s, sweep 0.5 s: the old sweeper re-sent every unclaimed step whose
   lease ran out, so a backlog several leases long was sent several times). Printed:
   broker messages per committed step (messages the workers received, counted by a
   ``task_received`` hook this module installs in them, over checkpoints), target 1.0
   (<= 1.05).
2. Broker loss: the same backlog on workers with the default settings, and once a tenth
   is done Redis is flushed (FLUSHALL: every queued message gone, as a restart without
   persistence). Printed: flush -> every
   run completed, beside the time the same number of runs took to drain in part 1 (same
   run, same box): the loss should cost about a sweep, not 100 steps per sweep.

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
LOSS_AT = 0.1  # flush once this share of the runs completed
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


def _refilled(client: Any, lost: int, timeout: float = 60.0) -> float:
    """Seconds until the broker's queue holds most of the ``lost`` messages again (polled
    every 10 ms; the workers drain it meanwhile, so the peak is a little below)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if client.llen("pocoflow") >= lost * 0.8:
            return time.monotonic() - started
        time.sleep(0.01)  # polling the broker for progress, not synchronising
    return float("nan")


def loss(runs: int, tmp: Path) -> tuple[float, float, int]:
    """Seconds from FLUSHALL to the lost messages back in the broker and to every run
    completed, and how many runs were left at the flush."""
    import redis as redis_lib

    with start_redis() as server:
        db_path = tmp / "loss.db"
        db_url = f"sqlite:///{db_path}"
        settings = Settings(db_url=db_url, broker_url=server.url)
        _submit(settings, runs)
        with workers(_env(db_url, server.url, short_lease=False), tmp, 2):
            _wait_completed(db_path, int(runs * LOSS_AT), LOAD_TIMEOUT_S * 5)
            client = redis_lib.Redis.from_url(server.url)
            client.flushall()
            flushed = time.time()
            left = runs - _completed(db_path)
            refilled_s = _refilled(client, left)
            done = _wait_completed(db_path, runs, LOAD_TIMEOUT_S * 5)
        return refilled_s, done - flushed, left


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
        refilled_s, recovered_s, left = loss(runs, tmp)
        expected_s = drain_s * left / runs
        ok &= report(
            "FLUSHALL -> 80% of lost messages re-sent",
            refilled_s,
            "s",
            f"{left} runs' messages lost; default settings (sweep 1 s); the old sweeper "
            f"re-sent 100 per 4 s sweep per worker, from a lease after: ~{left / 50:.0f} s",
            None,
        )
        ok &= report(
            "FLUSHALL -> every run completed",
            recovered_s,
            "s",
            f"the same number drained in {expected_s:.1f} s without a loss "
            f"-> {recovered_s / expected_s:.2f}x",
            None,
        )
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    sys.exit(0 if main(parser.parse_args().runs) else 1)
