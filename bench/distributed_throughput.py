"""Throughput and step latency under load: 50 concurrent 20-step runs on 2 workers.

Two worker nodes (concurrency 1 each) on a private Redis and a SQLite ledger (a file,
WAL, synchronous NORMAL) take 50 runs of the 20-step ``bench_chain20`` submitted at once.
The same load of raw Celery relays (50 chains of 20 no-op tasks, each sending its
successor, on 2 relay workers, same broker) is run turn about with it, as the reference.

* throughput: 50 x 20 steps / (first submit -> last commit), by the ledger's clock;
* step latency: this step's commit - the previous step's commit in the same run
  (``pf_checkpoints.created_at``, written in the commit transaction; step 0 from the
  run's submit). Each run has one step in flight, so this includes the wait behind the
  other runs' steps: by Little's law its mean is 50 runs / throughput. The relay's mean
  hop at the same load (50 chains / its throughput) is the reference;
* no step lost (the target): every run completed with exactly 20 checkpoints, steps
  0-19, one each.

    python -m bench.distributed_throughput [--loads N]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, ".")

from bench.cluster import RELAY_APP, iso_s, relay_client, relay_load, worker_env, workers
from bench.common import percentile, report
from bench.dist_flows import THROUGHPUT_CHAIN as STEPS
from pocoflow.devcluster import start_redis
from pocoflow.settings import Settings
from tests.helpers import wait_until

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB

RUNS = 50
WORKERS = 2
LOAD_TIMEOUT_S = 120.0
FINISHED = ("completed", "failed", "cancelled")


@dataclass
class Load:
    """What the ledger says about one load of ``RUNS`` runs."""

    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    committed: int = 0
    problems: list[str] = field(default_factory=list)
    reruns: int = 0


def submit_load(settings: Settings) -> list[str]:
    from pocoflow.distributed.client import submit
    from pocoflow.registry import build_flow

    return [
        submit(build_flow("bench_chain20"), {"n": 0}, settings=settings).run_id for _ in range(RUNS)
    ]


def wait_finished(db: WorkflowDB, run_ids: list[str]) -> None:
    """Poll the ledger until every run finished: one read per poll, runs in submit order
    (they finish roughly in that order)."""
    pending = list(run_ids)

    def all_finished() -> bool:
        while pending and db.get_run(pending[0])["status"] in FINISHED:
            pending.pop(0)
        return not pending

    wait_until(all_finished, LOAD_TIMEOUT_S, interval=0.02)


def examine(db: WorkflowDB, run_ids: list[str]) -> Load:
    """Timings and the no-step-lost check, from the ledger rows of ``run_ids``."""
    load = Load()
    first, last = float("inf"), 0.0
    for run_id in run_ids:
        run = db.get_run(run_id)
        rows = db.get_checkpoints(run_id)
        steps = [row["step"] for row in rows]
        if run is None or run["status"] != "completed" or steps != list(range(STEPS)):
            status = run and run["status"]
            load.problems.append(f"{run_id}: {status}, checkpoints of steps {steps}")
            continue
        if db.load_checkpoint(run_id, STEPS - 1)["n"] != STEPS:
            load.problems.append(f"{run_id}: final n is not {STEPS}")
            continue
        load.committed += len(rows)
        commits = [iso_s(run["started_at"])] + [iso_s(row["created_at"]) for row in rows]
        load.latencies_s += [b - a for a, b in itertools.pairwise(commits)]
        first, last = min(first, commits[0]), max(last, commits[-1])
        load.reruns += len(db.get_attempts(run_id)) - STEPS
    load.seconds = last - first
    return load


def main(loads: int = 3) -> bool:
    """Print throughput and latency beside the relay's; True when no step was lost."""
    from pocoflow.db import WorkflowDB

    print(
        f"distributed throughput: {RUNS} concurrent runs x {STEPS} steps, {WORKERS} workers "
        f"(concurrency 1), SQLite ledger; {loads} loads alternating with the same load of "
        "raw Celery relays"
    )
    with tempfile.TemporaryDirectory(prefix="pocoflow-bench-") as tmp, start_redis() as redis:
        workdir = Path(tmp)
        db_url = f"sqlite:///{workdir / 'throughput.db'}"
        settings = Settings(db_url=db_url, broker_url=redis.url)
        db = WorkflowDB(db_url)
        app, client = relay_client(redis.url)
        relay_env = worker_env("sqlite:///unused.db", redis.url)
        poco_env = worker_env(db_url, redis.url)
        relay_tps, poco = [], []
        with workers(relay_env, workdir, WORKERS, RELAY_APP), workers(poco_env, workdir, WORKERS):
            for i in range(loads + 1):  # the first of each warms the workers
                started, finished = relay_load(app, client, RUNS, STEPS)
                run_ids = submit_load(settings)
                wait_finished(db, run_ids)
                if i:
                    relay_tps.append(RUNS * STEPS / (finished - started))
                    poco.append(examine(db, run_ids))
        client.close()

    relay = statistics.median(relay_tps)
    tps = statistics.median(RUNS * STEPS / load.seconds for load in poco if load.seconds)
    latencies = [s * 1e3 for load in poco for s in load.latencies_s]
    problems = [p for load in poco for p in load.problems]
    committed, reruns = sum(load.committed for load in poco), sum(load.reruns for load in poco)
    expected = loads * RUNS * STEPS
    relay_hop_ms = RUNS / relay * 1e3
    ok = report(
        "steps committed, none lost",
        committed,
        "steps",
        f"of {expected}: every run completed with exactly {STEPS} checkpoints, steps "
        f"0-{STEPS - 1} ({reruns} re-run attempts)",
        committed == expected and not problems,
        digits=0,
    )
    for problem in problems[:5]:
        print(f"         lost: {problem}")
    if not latencies:
        return False
    report("throughput (median load)", tps, "steps/s",
           f"raw relay, same load: {relay:.0f} tasks/s -> {tps / relay:.2f}x", None)  # fmt: skip
    for q in (50, 99):
        report(f"step latency p{q}", percentile(latencies, q), "ms",
               f"raw relay mean hop, same load: {relay_hop_ms:.1f} ms ({RUNS} / its tasks/s)",
               None)  # fmt: skip
    print(
        "  step latency = commit of step N - commit of step N-1 of the same run "
        "(pf_checkpoints.created_at; step 0: from submit),\n"
        f"  so it includes the wait behind the other {RUNS - 1} runs' steps in the queue"
    )
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--loads", type=int, default=3)
    sys.exit(0 if main(parser.parse_args().loads) else 1)
