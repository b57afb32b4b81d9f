"""Per-item cost of a local MapNode with a ledger: each finished item kept in pf_items.

A one-step flow maps ``ITEMS`` trivial items on 8 threads, with no ledger (the reference,
measured in the same run), on SQLite and on PostgreSQL. The per-item time is
``(run of ITEMS items - run of 0 items) / ITEMS``, so the run's own rows (run, checkpoint)
do not count; the overhead is the ledger's per-item time minus the reference's.
Beside it, the same with one transaction per item (``MAX_BATCH = 1``): what the
writer's batching saves.

The per-item figure leaves out what a map step pays once (the 0-item run is subtracted),
so a second figure times that: a fresh run of ``STEPS`` map steps of 2 items each (one
node looping on itself), with a ledger, items kept against items not kept (the item log
switched off, in the same run): the cost per step of keeping a small map's items (one
more transaction and the writer thread; a fresh run's steps read nothing).

Target: the kept item adds at most 50 us per item on SQLite and 100 us on PostgreSQL
(an item stands for an LLM call of 0.5 s or more).

    python -m bench.local_map [--items 2000] [--runs 7] [--postgres URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, ".")

from bench.common import report
from pocoflow import Flow, MapNode, itemlog
from pocoflow.recorder import RunRecorder

ITEMS = 2000
STEPS = 200
TARGET_SQLITE_US = 50.0
TARGET_POSTGRES_US = 100.0


class Double(MapNode):
    max_parallel = 8

    def prep(self, store: Any) -> list[int]:
        return list(range(store["n"]))

    def exec(self, item: int) -> int:
        return item * 2

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["total"] = sum(results)
        return "default"


class Loop(MapNode):
    """Two items a step; loops on itself ``store["steps"]`` times."""

    def prep(self, store: Any) -> list[int]:
        return [store["n"], store["n"] + 1]

    def exec(self, item: int) -> int:
        return item

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str | None:
        store["n"] += 1
        return "again" if store["n"] < store["steps"] else None


def _loop_s(db_url: str, steps: int) -> float:
    node = Loop()
    node.then("again", node)
    flow = Flow(start=node, db_path=db_url, flow_name="local_map_loop", max_steps=steps + 1)
    started = time.perf_counter()
    flow.run({"n": 0, "steps": steps})
    return time.perf_counter() - started


def per_step_us(db_url: str, steps: int, runs: int) -> tuple[float, float]:
    """Median per-step time of a fresh ``steps``-step loop of 2-item maps: (items kept,
    item log switched off), the two alternating in the same run."""
    real = RunRecorder.item_log
    kept, plain = [], []
    _loop_s(db_url, steps)  # warm
    for _ in range(runs):
        kept.append(_loop_s(db_url, steps) / steps * 1e6)
        RunRecorder.item_log = lambda *args, **kwargs: None  # type: ignore[assignment, method-assign, return-value]
        try:
            plain.append(_loop_s(db_url, steps) / steps * 1e6)
        finally:
            RunRecorder.item_log = real  # type: ignore[method-assign]
    return statistics.median(kept), statistics.median(plain)


def _run_s(db_url: str | None, n: int) -> float:
    flow = Flow(start=Double(), db_path=db_url, flow_name="local_map_bench")
    started = time.perf_counter()
    flow.run({"n": n})
    return time.perf_counter() - started


def per_item_us(db_url: str | None, items: int, runs: int) -> float:
    """Median over ``runs`` of (a run of ``items`` - a run of none) / ``items``."""
    _run_s(db_url, items)  # warm: engine, pool, migrations check, statement cache
    samples = []
    for _ in range(runs):
        samples.append((_run_s(db_url, items) - _run_s(db_url, 0)) / items * 1e6)
    return statistics.median(samples)


def _one_per_transaction(db_url: str, items: int, runs: int) -> float:
    saved, itemlog.MAX_BATCH = itemlog.MAX_BATCH, 1
    try:
        return per_item_us(db_url, items, runs)
    finally:
        itemlog.MAX_BATCH = saved


def _section(label: str, db_url: str, items: int, runs: int, target_us: float) -> bool:
    plain = per_item_us(None, items, runs)
    kept = per_item_us(db_url, items, runs)
    single = _one_per_transaction(db_url, items, runs)
    overhead = kept - plain
    step_kept, step_plain = per_step_us(db_url, STEPS, runs)
    report(
        f"{label}: per map step of 2 items, items kept",
        step_kept,
        "us",
        f"info: items not kept {step_plain:.0f} us/step, x{step_kept / step_plain:.2f}",
        None,
    )
    ok = report(
        f"{label}: per-item overhead, items kept",
        overhead,
        "us",
        f"no ledger: {plain:.1f} us/item, with: {kept:.1f} (target <= {target_us:.0f} us)",
        overhead <= target_us,
    )
    report(
        f"{label}: the same, one transaction per item",
        single - plain,
        "us",
        "info: what batching the writes saves",
        None,
    )
    return ok


def main(pg_url: str | None = None, items: int = ITEMS, runs: int = 7) -> bool:
    print(f"local map: {items} trivial items on 8 threads, median of {runs} runs")
    with tempfile.TemporaryDirectory() as tmp:
        ok = _section(
            "SQLite", f"sqlite:///{Path(tmp) / 'bench.db'}", items, runs, TARGET_SQLITE_US
        )
    if pg_url is not None:
        ok &= _section("PostgreSQL", pg_url, items, runs, TARGET_POSTGRES_US)
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL (default: none)")
    args = parser.parse_args()
    sys.exit(0 if main(args.postgres, args.items, args.runs) else 1)
