"""Fan-out: a MapNode of many simulated LLM calls on threads workers, beside a raw Celery
group of the same calls on the same workers and broker.

* efficiency = ideal / measured, ideal = items x call time / (workers x threads): the
  share of the pool's capacity the fan-out turned into finished calls (goal >= 0.85 at
  2 x 8 threads), and its time against the raw group's (goal <= 1.15x);
* the same at 2 x 32 threads (figures only: there the per-item cost shows);
* the join of 10,000 small results: the peak RSS of any worker process while the run
  fans out and joins (goal < 200 MB);
* ledger rows per item for 1,000 and 10,000 items (goal: linear, the same per item).

    python -m bench.fanout [--items 1000] [--item-ms 50] [--join-items 10000]
                           [--postgres URL | --sqlite]

The ledger is a fresh PostgreSQL database (a private server unless given), or SQLite.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, ".")

from bench import relay_app
from bench.cluster import RELAY_APP, iso_s, relay_client, worker_env, workers
from bench.common import report
from bench.load import fresh_database
from pocoflow.devcluster import start_redis
from pocoflow.settings import Settings

ITEMS = 1000
ITEM_MS = 50.0
WORKERS = 2
THREADS = 8
WIDE_THREADS = 32
JOIN_ITEMS = 10_000
TARGET_EFFICIENCY = 0.85
TARGET_VS_GROUP = 1.15
TARGET_JOIN_RSS_MB = 200.0
TIMEOUT_S = 300.0


def group_seconds(broker_url: str, items: int, item_s: float) -> float:
    """A raw Celery group of ``items`` calls: first send -> last call finished (s)."""
    from celery import group

    app, client = relay_client(broker_url)
    key = f"group-{uuid.uuid4().hex}"
    signature = app.signature(relay_app.SLEEP_TASK, queue=relay_app.QUEUE)
    started = time.time()
    group(signature.clone(args=(item_s, key)) for _ in range(items)).apply_async()
    finished = 0.0
    for done in range(items):
        popped = client.blpop([key], timeout=TIMEOUT_S)
        if popped is None:
            raise TimeoutError(f"raw group: {done}/{items} calls in {TIMEOUT_S}s")
        finished = max(finished, float(popped[1]))
    client.close()
    return finished - started


def fanout_run(settings: Settings, items: int, item_s: float) -> tuple[str, float]:
    """One run of ``bench_fanout``: (run id, seconds from its start to its completion,
    by the ledger's own timestamps)."""
    from pocoflow.distributed.client import submit
    from pocoflow.registry import build_flow

    handle = submit(build_flow("bench_fanout"), {"items": items, "item_s": item_s},
                    settings=settings)  # fmt: skip
    store = handle.wait(timeout=TIMEOUT_S)
    if store["done"] != items:
        raise AssertionError(f"run {handle.run_id}: {store['done']} of {items} items done")
    run = handle._require_db("fanout").get_run(handle.run_id)
    return handle.run_id, iso_s(run["completed_at"]) - iso_s(run["started_at"])


def rows_of_run(db_url: str, run_id: str) -> int:
    """Every ledger row that belongs to ``run_id``, over all tables keyed by run."""
    from sqlalchemy import create_engine, func, select

    from pocoflow.ledger.engine import resolve_url
    from pocoflow.ledger.tables import metadata

    engine = create_engine(resolve_url(db_url))
    try:
        with engine.connect() as conn:
            counts = [
                conn.execute(select(func.count()).select_from(t).where(t.c.run_id == run_id))
                for t in metadata.sorted_tables
                if "run_id" in t.c
            ]
            return sum(int(count.scalar() or 0) for count in counts)
    finally:
        engine.dispose()


class PeakRss:
    """Samples the RSS of every process of the given workers until stopped: the peak of
    any one process (the join runs in one)."""

    def __init__(self, procs: list[Any]) -> None:
        self.procs = procs
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.02):
            for worker in self.procs:
                for pid in worker.pids():
                    with contextlib.suppress(psutil.Error):
                        self.peak = max(self.peak, psutil.Process(pid).memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(
    db_url: str, items: int, item_s: float, threads: int, join_items: int | None
) -> dict[str, Any]:
    """Group and fan-out at ``threads`` threads per worker (warm-up first); with
    ``join_items``, also the big join's peak RSS and rows per item."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pocoflow-bench-") as tmp, start_redis() as redis:
        workdir = Path(tmp)
        settings = Settings(db_url=db_url, broker_url=redis.url)
        pool = {"concurrency": threads, "pool": "threads"}
        with (
            workers(
                worker_env("sqlite:///unused.db", redis.url), workdir, WORKERS, RELAY_APP, **pool
            ),  # fmt: skip
            workers(worker_env(db_url, redis.url), workdir, WORKERS, **pool) as procs,
        ):
            group_seconds(redis.url, min(items, 100), 0.0)  # warm: imports, pools
            fanout_run(settings, min(items, 100), 0.0)
            out["group_s"] = group_seconds(redis.url, items, item_s)
            run_id, out["fanout_s"] = fanout_run(settings, items, item_s)
            out["rows_per_item"] = rows_of_run(db_url, run_id) / items
            if join_items:
                with PeakRss(procs) as rss:
                    big_run, out["join_s"] = fanout_run(settings, join_items, 0.0)
                out["join_rss_mb"] = rss.peak / 2**20
                out["join_rows_per_item"] = rows_of_run(db_url, big_run) / join_items
    return out


def main(
    items: int = ITEMS,
    item_ms: float = ITEM_MS,
    join_items: int = JOIN_ITEMS,
    server_url: str | None = None,
    sqlite: bool = False,
) -> bool:
    item_s = item_ms / 1000
    print(
        f"fan-out: a MapNode of {items} calls of {item_ms:g} ms on {WORKERS} threads workers, "
        f"beside a raw Celery group of the same calls; {'SQLite' if sqlite else 'PostgreSQL'} "
        "ledger"
    )
    ok = True
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if sqlite:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="pocoflow-bench-"))
            db_url = f"sqlite:///{Path(tmp) / 'fanout.db'}"
        else:
            db_url = stack.enter_context(fresh_database(server_url))
        for threads, goal in ((THREADS, True), (WIDE_THREADS, False)):
            got = measure(db_url, items, item_s, threads, join_items if goal else None)
            ideal = items * item_s / (WORKERS * threads)
            efficiency, group_eff = ideal / got["fanout_s"], ideal / got["group_s"]
            vs_group = got["fanout_s"] / got["group_s"]
            label = f"{WORKERS} x {threads} threads"
            ok &= report(
                f"efficiency, {label}",
                efficiency,
                "",
                f"{got['fanout_s']:.2f} s, ideal {ideal:.2f} s; raw group {group_eff:.2f} "
                f"({got['group_s']:.2f} s)" + (f" (goal >= {TARGET_EFFICIENCY})" if goal else ""),
                efficiency >= TARGET_EFFICIENCY if goal else None,
                digits=2,
            )
            ok &= report(
                f"time vs raw group, {label}",
                vs_group,
                "x",
                f"goal <= {TARGET_VS_GROUP}x" if goal else "(per-item cost shows here)",
                vs_group <= TARGET_VS_GROUP if goal else None,
                digits=2,
            )
            if goal and join_items:
                ok &= report(
                    f"join of {join_items} results: peak worker RSS",
                    got["join_rss_mb"],
                    "MB",
                    f"goal < {TARGET_JOIN_RSS_MB:.0f} MB; the run took {got['join_s']:.1f} s",
                    got["join_rss_mb"] < TARGET_JOIN_RSS_MB,
                )
                per_small, per_big = got["rows_per_item"], got["join_rows_per_item"]
                ok &= report(
                    "ledger rows per item",
                    per_big,
                    "rows",
                    f"at {join_items} items; {per_small:.2f} at {items} items (goal: linear)",
                    per_big <= per_small * 1.05,
                    digits=2,
                )
    print(f"  ({time.perf_counter() - started:.0f} s)")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--item-ms", type=float, default=ITEM_MS)
    parser.add_argument("--join-items", type=int, default=JOIN_ITEMS)
    parser.add_argument("--postgres", default=None, help="a server URL (default: private)")
    parser.add_argument("--sqlite", action="store_true", help="an SQLite ledger instead")
    args = parser.parse_args()
    sys.exit(0 if main(args.items, args.item_ms, args.join_items, args.postgres, args.sqlite)
             else 1)  # fmt: skip
