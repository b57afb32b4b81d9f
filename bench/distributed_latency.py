"""Per-step latency of a distributed run on one worker, beside a raw Celery relay.

A 100-node chain run on one worker (concurrency 1) against a relay of 100 no-op Celery
tasks, each sending its successor (``bench.relay_app``), on the same private Redis, the
two measured turn about in the same run: the difference is what the step protocol costs
(guard, lease, load, commit, outbox, attempt rows). Target (issue 3): at most 1.5x the
relay with PocoFlow's default acknowledgement on a durable SQLite ledger (a file, WAL,
synchronous NORMAL: survives a kill -9 of any process). The other ack mode is measured
too, which is how ``DEFAULT_ACKS_LATE`` was chosen, and so are task events (what Flower
lists steps from: three more messages per step), on against off, in the same run.

Both sides are timed on the wall clock of the box, from the send of the first message to
the end of the last task: PocoFlow by its ledger (run ``started_at`` at submit ->
``completed_at`` of the last commit), the relay by the time its last task pushes.

    python -m bench.distributed_latency [--postgres URL|private] [--runs N] [--events]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, ".")

from bench.cluster import RELAY_APP, iso_s, relay_client, relay_load, worker_env, workers
from bench.common import report
from bench.dist_flows import CHAIN
from pocoflow.devcluster import start_redis
from pocoflow.distributed.celery_app import DEFAULT_ACKS_LATE
from pocoflow.settings import Settings

TARGET_RATIO = 1.5
RUN_TIMEOUT_S = 120.0


def pocoflow_run_s(settings: Settings) -> float:
    """One 100-step run: seconds from submit to the last commit, by the ledger."""
    from pocoflow.distributed.client import submit
    from pocoflow.registry import build_flow

    handle = submit(build_flow("bench_chain"), {"n": 0}, settings=settings)
    assert handle.wait(timeout=RUN_TIMEOUT_S)["n"] == CHAIN
    run = handle._db.get_run(handle.run_id)  # type: ignore[union-attr]
    # Ledger times, so wait()'s polling interval is not counted.
    return iso_s(run["completed_at"]) - iso_s(run["started_at"])


def measure(db_url: str, log_dir: Path, acks_late: bool, runs: int) -> tuple[float, float]:
    """(PocoFlow ms/step, relay ms/task): medians of ``runs`` alternating runs, after one
    warm-up run of each (imports, pools, statement caches)."""
    with start_redis() as redis_server:
        broker = redis_server.url
        settings = Settings(db_url=db_url, broker_url=broker)
        app, client = relay_client(broker)
        relay_env = worker_env("sqlite:///unused.db", broker, acks_late=acks_late)
        poco_env = worker_env(db_url, broker, acks_late=acks_late)
        with workers(relay_env, log_dir, 1, RELAY_APP), workers(poco_env, log_dir, 1):
            poco, relay = [], []
            for i in range(runs + 1):
                started, finished = relay_load(app, client, 1, CHAIN)
                relay_s = finished - started
                poco_s = pocoflow_run_s(settings)
                if i:
                    relay.append(relay_s)
                    poco.append(poco_s)
        client.close()
    return statistics.median(poco) / CHAIN * 1e3, statistics.median(relay) / CHAIN * 1e3


def measure_task_events(workdir: Path, runs: int) -> tuple[float, float]:
    """(ms/step with task events off, on): two setups side by side (a Redis, a SQLite
    ledger and one worker each, default ack), their runs alternating so both see the
    same load on the box; medians of ``runs`` after a warm-up run of each. No Flower
    listens: the figure is what the workers pay to send the events."""
    ms: dict[bool, list[float]] = {False: [], True: []}
    with contextlib.ExitStack() as stack:
        settings = {}
        for events in (False, True):
            broker = stack.enter_context(start_redis()).url
            db_url = f"sqlite:///{workdir / f'events-{int(events)}.db'}"
            settings[events] = Settings(db_url=db_url, broker_url=broker)
            stack.enter_context(workers(worker_env(db_url, broker, task_events=events), workdir, 1))
        for i in range(runs + 1):
            for events in (False, True):
                run_s = pocoflow_run_s(settings[events])
                if i:
                    ms[events].append(run_s / CHAIN * 1e3)
    return statistics.median(ms[False]), statistics.median(ms[True])


def report_task_events(workdir: Path, runs: int) -> None:
    """What Flower costs the workers: task events on against off, interleaved."""
    off_ms, on_ms = measure_task_events(workdir, runs)
    report(
        "per step, SQLite, task events on (Flower)",
        on_ms,
        "ms",
        f"off: {off_ms:.2f} ms -> {on_ms - off_ms:+.2f} ms/step ({on_ms / off_ms:.2f}x)",
        None,
        digits=2,
    )


def main(runs: int = 7, postgres_url: str | None = None) -> bool:
    """Print ms/step beside the relay for both ack modes; True when the default ack mode
    on SQLite is within 1.5x of the relay."""
    print(
        f"distributed latency: {CHAIN}-step chain, 1 worker (concurrency 1), "
        f"median of {runs} runs alternating with a raw Celery relay of {CHAIN} tasks"
    )
    ok = True
    with tempfile.TemporaryDirectory(prefix="pocoflow-bench-") as tmp:
        workdir = Path(tmp)
        ledgers = {"SQLite": f"sqlite:///{workdir / 'latency.db'}"}
        if postgres_url:
            ledgers["PostgreSQL"] = postgres_url
        for acks_late in (DEFAULT_ACKS_LATE, not DEFAULT_ACKS_LATE):
            mode = "late ack" if acks_late else "early ack"
            default = acks_late == DEFAULT_ACKS_LATE
            for name, url in ledgers.items():
                step_ms, relay_ms = measure(url, workdir, acks_late, runs)
                ratio = step_ms / relay_ms
                gated = default and name == "SQLite"
                ok &= report(
                    f"per step, {name}, {mode}{' (default)' if default else ''}",
                    step_ms,
                    "ms",
                    f"raw relay: {relay_ms:.2f} ms/task -> {ratio:.2f}x"
                    + (f" (target <= {TARGET_RATIO}x)" if gated else ""),
                    ratio <= TARGET_RATIO if gated else None,
                    digits=2,
                )
        report_task_events(workdir, runs)
    return ok


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--postgres", help="also measure on this PostgreSQL URL ('private': start one here)"
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--events", action="store_true", help="only the task events figure")
    args = parser.parse_args(argv)
    if args.events:
        with tempfile.TemporaryDirectory(prefix="pocoflow-bench-") as tmp:
            report_task_events(Path(tmp), args.runs)
        return 0
    with contextlib.ExitStack() as stack:
        url = args.postgres
        if url == "private":
            from tests.servers import start_postgres

            url = stack.enter_context(start_postgres(durable=True)).url
        started = time.perf_counter()
        ok = main(args.runs, url)
        print(f"({time.perf_counter() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(cli())
