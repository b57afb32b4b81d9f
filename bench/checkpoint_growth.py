"""Checkpoint growth: a Store with a 1 MB value and a counter, 50 steps changing the counter.

Target (issue 2): the SQLite ledger grows by under 2 MB in all and each step takes at most
1 ms. Reference in the same run: a full JSON snapshot per step (what 0.2 wrote).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from bench.common import report
from pocoflow import Flow, Node, Store

STEPS = 50
BLOB = "x" * 1_000_000


class Count(Node):
    def prep(self, store):
        return store["counter"]

    def exec(self, counter):
        return counter + 1

    def post(self, store, prep_result, exec_result):
        store["counter"] = exec_result
        return "again" if exec_result < STEPS else "done"


def db_bytes(path: Path) -> int:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def measure_pocoflow(path: Path) -> tuple[int, float]:
    node = Count()
    node.then("again", node)
    flow = Flow(start=node, db_path=path, max_steps=STEPS + 1)
    flow.run(Store({"counter": STEPS}))  # one-step warm-up run: engine, schema
    before = db_bytes(path)
    # node_end fires before the commit, so time from one node_start to the next covers
    # the node and its checkpoint.
    starts: list[float] = []
    flow.on("node_start", lambda name, store: starts.append(time.perf_counter()))
    flow.run(Store({"blob": BLOB, "counter": 0}))
    starts.append(time.perf_counter())
    step_times = [b - a for a, b in itertools.pairwise(starts)]
    step_times.sort()
    return db_bytes(path) - before, step_times[len(step_times) // 2]


def measure_full_snapshots(path: Path) -> tuple[int, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE c(run TEXT, step INT, store_json TEXT, UNIQUE(run, step))")
    before = db_bytes(path)
    data = {"blob": BLOB, "counter": 0}
    started = time.perf_counter()
    for step in range(STEPS):
        data["counter"] += 1
        conn.execute("INSERT INTO c VALUES ('r', ?, ?)", (step, json.dumps(data)))
    elapsed = (time.perf_counter() - started) / STEPS
    conn.close()
    return db_bytes(path) - before, elapsed


def main() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        grown, step_s = measure_pocoflow(Path(tmp) / "growth.db")
        full_grown, full_step_s = measure_full_snapshots(Path(tmp) / "full.db")
    print(f"checkpoints: 1 MB value + counter, {STEPS} steps changing only the counter")
    ok = report(
        "ledger growth over 50 steps",
        grown / 1e6,
        "MB",
        f"full snapshot per step: {full_grown / 1e6:.1f} MB (target < 2 MB)",
        grown < 2e6,
    )
    ok &= report(
        "median step time with the 1 MB value",
        step_s * 1e3,
        "ms",
        f"full snapshot per step: {full_step_s * 1e3:.2f} ms (target <= 1 ms)",
        step_s <= 1e-3,
    )
    return ok
