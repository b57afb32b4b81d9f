"""Per-step latency of a distributed run on one worker, beside a raw Celery relay.

A 100-node chain submitted to one worker (concurrency 1) against a relay of 100 no-op
Celery tasks (``bench.relay_app``) on the same private Redis: the difference is what
the step protocol costs (guard, lease, load, commit, outbox, attempt rows). Run with
early and late acknowledgement, which is how ``DEFAULT_ACKS_LATE`` was chosen.

    python -m bench.distributed_latency [--postgres URL] [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

sys.path.insert(0, ".")

from bench.dist_flows import CHAIN
from pocoflow.cli_worker import worker_argv
from tests.distributed.faults import WorkerProcess, start_worker, worker_env
from tests.servers import start_redis


@contextlib.contextmanager
def worker(env: dict[str, str], workdir: Path, app: str = "workers.app") -> Iterator[WorkerProcess]:
    """One worker node, concurrency 1: PocoFlow's app or the raw relay."""
    name = f"bench-{uuid.uuid4().hex[:6]}"
    if app == "workers.app":
        proc = start_worker(name, env, workdir)
    else:
        log = workdir / f"{name}.log"
        argv = worker_argv(concurrency=1, queues="relay", hostname=f"{name}@%h",
                           extra=["--without-heartbeat"])  # fmt: skip
        argv[argv.index("workers.app")] = app
        with open(log, "ab") as out:
            popen = subprocess.Popen([sys.executable, *argv], env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        proc = WorkerProcess(name, popen, log)
    proc.wait_ready()
    try:
        yield proc
    finally:
        proc.kill()


def _iso_s(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def pocoflow_ms(db_url: str, broker: str, workdir: Path, acks_late: bool, runs: int) -> float:
    from pocoflow.distributed.client import submit
    from pocoflow.registry import build_flow
    from pocoflow.settings import Settings

    env = worker_env(db_url, broker, lease_s=10, sweep_s=5, flows="bench.dist_flows",
                     extra={"POCOFLOW_ACKS_LATE": "1" if acks_late else "0"})  # fmt: skip
    settings = Settings(db_url=db_url, broker_url=broker)
    times = []
    with worker(env, workdir):
        for i in range(runs + 1):
            handle = submit(build_flow("bench_chain"), {"n": 0}, settings=settings)
            assert handle.wait(timeout=120)["n"] == CHAIN
            run = handle._db.get_run(handle.run_id)  # type: ignore[union-attr]
            if i:  # the first run warms the worker (imports, pools, statement caches)
                # Ledger times, submit to last commit: excludes wait()'s polling.
                times.append(_iso_s(run["completed_at"]) - _iso_s(run["started_at"]))
    return statistics.median(times) / CHAIN * 1000


def relay_ms(broker: str, workdir: Path, acks_late: bool, runs: int) -> float:
    import redis

    from bench import relay_app

    env = worker_env("sqlite:///unused.db", broker,
                     extra={"POCOFLOW_ACKS_LATE": "1" if acks_late else "0"})  # fmt: skip
    client = redis.Redis.from_url(broker)
    times = []
    with worker(env, workdir, app="bench.relay_app"):
        for i in range(runs + 1):
            key = f"relay-{uuid.uuid4().hex}"
            started = time.perf_counter()
            relay_app.relay.apply_async(args=[CHAIN - 1, key], queue="relay")
            while not client.exists(key):
                time.sleep(0.001)
            if i:
                times.append(time.perf_counter() - started)
    return statistics.median(times) / CHAIN * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", help="also measure on this PostgreSQL URL ('private': start one here)"
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pocoflow-bench-"))
    ledgers = {"sqlite": f"sqlite:///{workdir / 'bench.db'}"}
    with contextlib.ExitStack() as stack:
        if args.postgres == "private":
            from tests.servers import start_postgres

            ledgers["postgresql"] = stack.enter_context(start_postgres(durable=True)).url
        elif args.postgres:
            ledgers["postgresql"] = args.postgres
        stack.callback(shutil.rmtree, workdir, True)
        measure(ledgers, workdir, args.runs)
    return 0


def measure(ledgers: dict[str, str], workdir: Path, runs: int) -> None:
    with start_redis() as server:
        import os

        os.environ["POCOFLOW_BROKER_URL"] = server.url
        print(f"{CHAIN}-step chain, 1 worker (concurrency 1), median of {runs} runs")
        for acks_late in (False, True):
            label = "late ack " if acks_late else "early ack"
            raw = relay_ms(server.url, workdir, acks_late, runs)
            print(f"  {label} raw Celery relay          {raw:6.2f} ms/task")
            for name, url in ledgers.items():
                ms = pocoflow_ms(url, server.url, workdir, acks_late, runs)
                print(f"  {label} pocoflow ({name:<10})   {ms:6.2f} ms/step  ({ms / raw:.1f}x)")


if __name__ == "__main__":
    sys.exit(main())
