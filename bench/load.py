"""Load: 1,000 concurrent runs of 20 steps on 4 workers, PostgreSQL ledger, beside a raw
Celery relay under the same load.

Four worker nodes (concurrency 1 each) on a private Redis and a fresh PostgreSQL database
take ``--runs`` runs of the 20-step ``bench_chain20``, submitted at once. The reference is
the same load of raw Celery relays (``--runs`` chains of 20 no-op tasks, each sending its
successor) on 4 relay workers and the same broker, run turn about with it.

* throughput: runs x 20 steps / (first submit -> last commit), by the ledger's clock, and
  its ratio to the relay's tasks/s (goal >= 0.67x: the 1.5x cost per step we hold for a
  single chain); beside it, the same ratio to a durable relay whose every hop first
  commits one row to the same PostgreSQL (``relay_app.durable_relay``): what keeping any
  durable record per step costs on this box, apart from what ours costs; and to a
  leased relay (``relay_app.leased_relay``), whose every hop claims its step's lease
  while its run row says running, reading the previous checkpoint, then commits its
  checkpoint, an event, the run row and its successor's row fenced on that lease: the
  least that ARCHITECTURE 3 asks of a step, so its ratio to the raw relay is about the
  most any implementation of the protocol could reach on this box;
* step latency p50/p99: this step's commit - the previous step's commit in the same run
  (step 0: from the submit), so it includes the wait behind the other runs' steps;
* CPU per step by part (``bench.cpu``), ours beside the relay's per hop: worker main
  processes, pool children, PostgreSQL, Redis and this process (which submits and
  waits). The box's cores are saturated, so the ratio of the two sums is about the
  throughput ratio, and the parts say where it goes;
* ledger size: the database's bytes (``pg_database_size``) and rows, per committed step;
* lost steps (must be 0): every run completed with exactly 20 checkpoints, steps 0-19,
  and the Store they end with.

    python -m bench.load [--runs 1000] [--workers 4] [--loads 1] [--postgres URL]

With ``--loads N`` every other load runs its four parts in reverse order, so the box's
drift does not always fall on the same one (use an even N); the headline ratios are
those of the medians, and each load's own ratios are printed under them.

A quick run: ``python -m bench.load --runs 100``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, ".")

from bench import cpu, relay_app
from bench.cluster import RELAY_APP, relay_client, relay_load, worker_env, workers
from bench.common import percentile, report
from bench.dist_flows import THROUGHPUT_CHAIN as STEPS
from bench.distributed_throughput import FINISHED, Load, examine
from pocoflow.devcluster import start_redis
from pocoflow.settings import Settings
from tests.helpers import wait_until

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB

RUNS = 1000
WORKERS = 4
#: Runs of the unmeasured first load, which only warms the workers (imports, pools).
WARM_RUNS = 50
TARGET_RATIO = 0.67
#: Slowest pace we wait for before calling a load hung (steps per second).
MIN_STEPS_PER_S = 20.0


def submit_load(settings: Settings, runs: int) -> list[str]:
    from pocoflow.distributed.client import submit
    from pocoflow.registry import build_flow

    flow = build_flow("bench_chain20")
    return [submit(flow, {"n": 0}, settings=settings).run_id for _ in range(runs)]


def wait_finished(db: WorkflowDB, run_ids: list[str], timeout_s: float) -> None:
    """Poll until every run finished, oldest first (one read per poll)."""
    pending = list(run_ids)

    def all_finished() -> bool:
        while pending and db.get_run(pending[0])["status"] in FINISHED:
            pending.pop(0)
        return not pending

    wait_until(all_finished, timeout_s, interval=0.05)


def ledger_size(db_url: str) -> tuple[int, dict[str, int]]:
    """(bytes of the database, rows per pf_* table)."""
    from sqlalchemy import create_engine, func, select, text

    from pocoflow.ledger.engine import resolve_url
    from pocoflow.ledger.tables import metadata

    engine = create_engine(resolve_url(db_url))
    try:
        with engine.connect() as conn:
            size = int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar())
            rows = {
                t.name: int(conn.execute(select(func.count()).select_from(t)).scalar() or 0)
                for t in metadata.sorted_tables
            }
    finally:
        engine.dispose()
    return size, rows


def run_loads(
    db_url: str, runs: int, n_workers: int, loads: int, warm: bool
) -> tuple[list[float], list[float], list[float], list[Load], list[tuple[str, str, str]]]:
    """Relay, durable relay and leased relay tasks/s, our Load, and the CPU per step by
    part of ours, the relay and the leased relay (``bench.cpu``), per measured load
    (after a small warm-up if ``warm``)."""
    from pocoflow.db import WorkflowDB

    timeout_s = max(120.0, runs * STEPS / MIN_STEPS_PER_S)
    with tempfile.TemporaryDirectory(prefix="pocoflow-bench-") as tmp, start_redis() as redis:
        workdir = Path(tmp)
        settings = Settings(db_url=db_url, broker_url=redis.url)
        db = WorkflowDB(db_url)
        app, client = relay_client(redis.url)
        relay_env = worker_env("sqlite:///unused.db", redis.url)
        # The relays' tables live beside the ledger, reached with psycopg's URL form.
        relay_db = psycopg_url(db_url)
        relay_env[relay_app.DURABLE_DB_ENV] = relay_db
        relay_app.create_hops_table(relay_db)
        poco_env = worker_env(db_url, redis.url)
        relay_tps: list[float] = []
        durable_tps: list[float] = []
        leased_tps: list[float] = []
        poco: list[Load] = []
        cpu_texts: list[tuple[str, str, str]] = []
        with (
            workers(relay_env, workdir, n_workers, RELAY_APP) as relay_workers,
            workers(poco_env, workdir, n_workers) as poco_workers,
        ):
            shared = {
                "PostgreSQL": cpu.server_probe(postgres_pid(db_url), "postgres"),
                "Redis": cpu.server_probe(int(client.info("server")["process_id"]), "redis-server"),
                "this process": lambda: cpu.own_s(os.getpid()),
            }
            relay_probes = {**cpu.worker_probes(w.pid for w in relay_workers), **shared}
            poco_probes = {**cpu.worker_probes(w.pid for w in poco_workers), **shared}
            if warm:
                relay_load(app, client, min(runs, WARM_RUNS), STEPS)
                wait_finished(db, submit_load(settings, min(runs, WARM_RUNS)), timeout_s)
                relay_load(app, client, min(runs, WARM_RUNS), STEPS, durable=True)
                relay_load(app, client, min(runs, WARM_RUNS), STEPS, leased_db=relay_db)

            def relay_phase(**kind: Any) -> tuple[float, str]:
                before = cpu.snapshot(relay_probes)
                started, finished = relay_load(app, client, runs, STEPS, **kind)
                used = cpu.per_step_us(before, cpu.snapshot(relay_probes), runs * STEPS)
                return runs * STEPS / (finished - started), used

            def our_phase() -> tuple[Load, str]:
                before = cpu.snapshot(poco_probes)
                run_ids = submit_load(settings, runs)
                wait_finished(db, run_ids, timeout_s)
                used = cpu.per_step_us(before, cpu.snapshot(poco_probes), runs * STEPS)
                return examine(db, run_ids), used

            phases: dict[str, Callable[[], Any]] = {
                "relay": relay_phase,
                "durable": lambda: relay_phase(durable=True),
                "leased": lambda: relay_phase(leased_db=relay_db),
                "ours": our_phase,
            }
            for turn in range(loads):
                # Every other load in reverse order: the box's speed drifts by a third
                # within an hour, and a fixed order would hand the drift to the last.
                order = list(phases) if turn % 2 == 0 else list(reversed(phases))
                done = {name: phases[name]() for name in order}
                relay_tps.append(done["relay"][0])
                durable_tps.append(done["durable"][0])
                leased_tps.append(done["leased"][0])
                poco.append(done["ours"][0])
                cpu_texts.append((done["ours"][1], done["relay"][1], done["leased"][1]))
        client.close()
        db.close()
    relay_app.drop_hops_table(relay_db)  # not the ledger's: out of its size
    return relay_tps, durable_tps, leased_tps, poco, cpu_texts


def postgres_pid(db_url: str) -> int | None:
    """The PostgreSQL server's root process, if it runs on this box: the parent of the
    backend that serves a connection (None when that backend is not visible here)."""
    import psycopg

    with psycopg.connect(psycopg_url(db_url), autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        # While the connection is open: once it closes, its backend exits.
        return cpu.parent(backend)


def psycopg_url(db_url: str) -> str:
    """The libpq form of a SQLAlchemy PostgreSQL URL."""
    from pocoflow.ledger.engine import resolve_url

    return resolve_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_database(server_url: str | None) -> Any:
    """A new database on ``server_url`` (a private server when None), dropped after."""
    from tests.conftest import fresh_postgres_database

    with contextlib.ExitStack() as stack:
        if server_url is None:
            from tests.servers import start_postgres

            server_url = stack.enter_context(start_postgres(durable=True)).url
        yield stack.enter_context(fresh_postgres_database(server_url))


def main(
    runs: int = RUNS,
    n_workers: int = WORKERS,
    loads: int = 1,
    warm: bool = True,
    server_url: str | None = None,
) -> bool:
    """Print the figures; True when no step was lost and the ratio meets its goal."""
    print(
        f"load: {runs} concurrent runs x {STEPS} steps, {n_workers} workers (concurrency 1), "
        f"PostgreSQL ledger; {loads} load(s){' after a warm-up' if warm else ''}, each "
        "beside the same load of raw Celery relays"
    )
    started = time.perf_counter()
    with fresh_database(server_url) as db_url:
        relay_tps, durable_tps, leased_tps, poco, cpu_texts = run_loads(
            db_url, runs, n_workers, loads, warm
        )
        size, rows = ledger_size(db_url)
    relay = statistics.median(relay_tps)
    durable = statistics.median(durable_tps)
    leased = statistics.median(leased_tps)
    tps = statistics.median(runs * STEPS / load.seconds for load in poco if load.seconds)
    latencies = [s * 1e3 for load in poco for s in load.latencies_s]
    problems = [p for load in poco for p in load.problems]
    committed, reruns = sum(load.committed for load in poco), sum(load.reruns for load in poco)
    expected = len(poco) * runs * STEPS
    ok = report(
        "lost steps",
        expected - committed,
        "steps",
        f"target 0: {committed} of {expected} committed, every run exactly {STEPS} "
        f"checkpoints ({reruns} re-run attempts)",
        committed == expected and not problems,
        digits=0,
    )
    for problem in problems[:5]:
        print(f"         lost: {problem}")
    if not latencies:
        return False
    ok &= report(
        "throughput (median load)",
        tps,
        "steps/s",
        f"raw relay, same load: {relay:.0f} tasks/s -> {tps / relay:.2f}x "
        f"(goal >= {TARGET_RATIO}x)",
        tps / relay >= TARGET_RATIO,
    )
    report(
        "throughput against a durable relay",
        tps,
        "steps/s",
        f"raw relay committing one row per hop to the same PostgreSQL: {durable:.0f} "
        f"tasks/s -> {tps / durable:.2f}x (the floor for a relay that keeps a durable record of each hop)",
        None,
    )
    report(
        "throughput against the step protocol's floor",
        tps,
        "steps/s",
        f"leased relay (the least a step of ARCHITECTURE 3 writes, one statement each for "
        f"claim and commit): {leased:.0f} tasks/s = {leased / relay:.2f}x the raw relay -> "
        f"ours {tps / leased:.2f}x of it",
        None,
    )
    for q in (50, 99):
        report(f"step latency p{q}", percentile(latencies, q), "ms",
               f"raw relay mean hop, same load: {runs / relay * 1e3:.1f} ms", None)  # fmt: skip
    for turn, (ours, relay_cpu, leased_cpu) in enumerate(cpu_texts):
        # Info: each load's ratios (their range is the figure to quote on a box whose
        # speed drifts) and where each step's CPU goes, beside the relays' hops.
        load_tps = runs * STEPS / poco[turn].seconds if poco[turn].seconds else 0.0
        print(
            f"  [info] load {turn + 1}: ours {load_tps:.0f} steps/s, relay "
            f"{relay_tps[turn]:.0f} -> {load_tps / relay_tps[turn]:.2f}x; durable relay "
            f"{durable_tps[turn]:.0f} -> {load_tps / durable_tps[turn]:.2f}x; leased relay "
            f"{leased_tps[turn]:.0f} ({leased_tps[turn] / relay_tps[turn]:.2f}x the relay) "
            f"-> {load_tps / leased_tps[turn]:.2f}x"
        )
        print(f"  [info] CPU per step, ours:          {ours}")
        print(f"  [info] CPU per hop, relay:         {relay_cpu}")
        print(f"  [info] CPU per hop, leased relay:  {leased_cpu}")
    all_steps = (len(poco) * runs + warm * min(runs, WARM_RUNS)) * STEPS
    report(
        "ledger size",
        size / 2**20,
        "MiB",
        f"{size / all_steps:.0f} B per committed step ({all_steps} steps, all loads); rows: "
        + ", ".join(f"{name} {n}" for name, n in rows.items()),
        None,
    )
    print(f"  ({time.perf_counter() - started:.0f} s)")
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--loads", type=int, default=1)
    parser.add_argument("--no-warm", action="store_true", help="measure the first load too")
    parser.add_argument("--postgres", help="server URL (CREATE DATABASE rights); default private")
    args = parser.parse_args()
    sys.exit(0 if main(args.runs, args.workers, args.loads, not args.no_warm, args.postgres) else 1)
