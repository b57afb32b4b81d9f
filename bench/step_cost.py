"""What one step costs the process that runs it: CPU time, statements and round trips.

Wall time on a shared box moves by 30-80% from run to run; CPU time of this process and
the count of statements and round trips per step do not, so they show what a change to
the step path buys. Two paths, each on SQLite and PostgreSQL:

* distributed: ``execute_step`` in-process on ``--runs`` interleaved 20-step runs (so, as
  under load, the worker never has the previous step's Store in hand), with a publisher
  stand-in that marks sent messages in batches as ``SentMarker`` does (no broker: the
  broker's share is the same for PocoFlow and a raw relay);
* local: ``Flow.run(db_path=...)`` on a 100-node chain, beside raw sqlite3 doing the
  same writes (the reference of ``bench.ledger_overhead``), both by CPU time.

On PostgreSQL it also prints the server's CPU time per step when the server runs on this
box (a private one is durable: fsync on, as ``bench.load``'s).

Round trips are psycopg's waits on the server (one per statement outside a pipeline, one
per pipeline sync, BEGIN and COMMIT included); statements on SQLite are what its trace
callback sees.

    python -m bench.step_cost [--postgres URL|private] [--runs 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, ".")

from bench.core_overhead import CHAIN, poco_chain
from bench.ledger_overhead import raw_sqlite_us
from pocoflow import Store

LEASE_S = 30.0
#: Sent marks per batch: about what a worker's SentMarker gathers in its 20 ms at load.
MARK_BATCH = 4


class _Publish:
    """Publisher stand-in: keeps the messages, marks them sent in batches."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.sent: list[Any] = []
        self.marks: list[tuple[str, int, int, str | None, float]] = []

    def send(self, message: Any, **_: Any) -> bool:
        self.sent.append(message)
        self.marks.append((message.run_id, message.step, message.attempt, "t", time.time()))
        if len(self.marks) >= MARK_BATCH:
            self.db.mark_sent_many(self.marks)
            self.marks = []
        return True

    __call__ = send


class Counter:
    """Counts statements (SQLite trace) or round trips and statements (psycopg)."""

    def __init__(self) -> None:
        self.statements = 0
        self.round_trips = 0

    @contextlib.contextmanager
    def on(self, db: Any) -> Iterator[None]:
        if db.dialect == "sqlite":
            yield from self._sqlite(db)
        else:
            yield from self._psycopg(db)

    def _sqlite(self, db: Any) -> Iterator[None]:
        from sqlalchemy import event

        engine = db._ledger.engine
        # Fresh connections, each traced from its checkout (the kept ones of the batched
        # path, LedgerEngine.borrow, included: dispose drops them too).
        db._ledger.dispose()

        def trace(dbapi_conn: Any, *_: Any) -> None:
            dbapi_conn.set_trace_callback(self._statement)

        event.listen(engine, "checkout", trace)
        try:
            yield
        finally:
            event.remove(engine, "checkout", trace)
            db._ledger.dispose()

    def _statement(self, sql: str) -> None:
        if not sql.startswith("PRAGMA"):
            self.statements += 1

    def _psycopg(self, db: Any) -> Iterator[None]:
        # libpq's protocol trace: a round trip ends with each Sync (extended protocol, one
        # per statement outside a pipeline, one per pipeline) or simple Query (BEGIN,
        # COMMIT) the client sends; statements are its Parse/Bind+Execute messages.
        from sqlalchemy import event

        engine = db._ledger.engine
        engine.dispose()
        with tempfile.NamedTemporaryFile("w+") as log:

            def trace(dbapi_conn: Any, *_: Any) -> None:
                dbapi_conn.pgconn.trace(log.fileno())

            event.listen(engine, "checkout", trace)
            try:
                yield
            finally:
                event.remove(engine, "checkout", trace)
                engine.dispose()
            log.seek(0)
            for line in log:
                parts = line.split("\t")
                if len(parts) < 3 or parts[1] != "F":
                    continue
                if parts[3].startswith("Sync") or parts[3].startswith("Query"):
                    self.round_trips += 1
                if parts[3].startswith("Execute") or parts[3].startswith("Query"):
                    self.statements += 1


def _cpu_wall(
    fn: Callable[[], int], server: Callable[[], float]
) -> tuple[float, float, float, int]:
    cpu, wall, served = time.process_time(), time.perf_counter(), server()
    steps = fn()
    return time.process_time() - cpu, time.perf_counter() - wall, server() - served, steps


def server_probe(db: Any) -> Callable[[], float]:
    """The CPU time so far of the PostgreSQL server (every backend, its WAL writer and
    checkpointer) when it runs on this box; 0 otherwise, and for SQLite. Steadier than
    a whole load's figures: what a change to the step's statements saves the server."""
    from bench import cpu
    from bench.load import postgres_pid

    if db.dialect == "sqlite":
        return lambda: 0.0
    url = db._ledger.url.render_as_string(hide_password=False)
    return cpu.server_probe(postgres_pid(url), "postgres")


def distributed_steps(db: Any, runs: int) -> int:
    """``runs`` runs of the 20-step chain, stepped round-robin; returns the steps run."""
    from pocoflow.distributed.client import record_run
    from pocoflow.distributed.executor import WorkerContext, execute_step
    from pocoflow.registry import build_flow

    publish = _Publish(db)
    ctx = WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]
    flow = build_flow("bench_chain20")
    pending = [record_run(db, flow, Store({"n": 0}), lease_s=LEASE_S) for _ in range(runs)]
    done = 0
    while pending:
        for message in pending:
            ctx.handoff.clear()  # under load the next step lands on another process
            outcome = execute_step(message.to_dict(), worker_id="bench:1", context=ctx)
            assert outcome == "committed", outcome
            done += 1
        pending = list(publish.sent)
        publish.sent.clear()
    db.mark_sent_many(publish.marks)
    return done


def local_steps(db_url: str, runs: int) -> int:
    flow = poco_chain(db_url)
    for _ in range(runs):
        flow.run(Store({"n": 0}))
    return runs * CHAIN


def measure(
    label: str, db: Any, fn: Callable[[], int], repeat: int
) -> tuple[float, float, float, float]:
    """(CPU us/step, wall us/step, statements/step, round trips/step): CPU and wall the
    fastest of ``repeat`` uncounted passes, the counts from one more, counted."""
    fn()  # warm: pools, statement caches, imports
    cpus, walls, servers = [], [], []
    server = server_probe(db)
    for _ in range(repeat):
        cpu, wall, served, steps = _cpu_wall(fn, server)
        cpus.append(cpu / steps * 1e6)
        walls.append(wall / steps * 1e6)
        servers.append(served / steps * 1e6)
    counter = Counter()
    with counter.on(db):
        steps = fn()
    cpu_us, wall_us = min(cpus), min(walls)
    stmts, trips = counter.statements / steps, counter.round_trips / steps
    trips_text = f", {trips:.2f} round trips" if db.dialect != "sqlite" else ""
    if any(servers):
        trips_text += f", server CPU {min(servers):.1f} us"
    print(
        f"  {label:<34} CPU {cpu_us:7.1f} us/step  wall {wall_us:7.1f} us/step  "
        f"{stmts:.2f} statements{trips_text} per step"
    )
    return cpu_us, wall_us, stmts, trips


def raw_sqlite_cpu_us(path: Path) -> float:
    cpu = time.process_time()
    raw_sqlite_us(path)
    return (time.process_time() - cpu) / 2000 * 1e6


def main(pg_url: str | None, runs: int = 50, repeat: int = 3, only: str | None = None) -> None:
    import bench.dist_flows  # noqa: F401  (registers bench_chain20)
    from pocoflow.db import WorkflowDB

    print(f"step cost: CPU time of this process, fastest of {repeat} passes")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        urls = [("SQLite", str(tmp_path / "bench.db"))]
        if pg_url:
            urls.append(("PostgreSQL", pg_url))
        for name, url in urls if only in (None, "distributed") else []:
            db = WorkflowDB(url)
            measure(
                f"distributed step, {name}", db, lambda db=db: distributed_steps(db, runs), repeat
            )
        if only not in (None, "local"):
            return
        local = str(tmp_path / "local.db")
        db = WorkflowDB(local)
        cpu_us = measure("local step, SQLite", db, lambda: local_steps(local, 5), repeat)[0]
        raw = min(raw_sqlite_cpu_us(tmp_path / f"raw{i}.db") for i in range(repeat))
        print(f"  raw sqlite3 same writes: CPU {raw:.1f} us/step -> local {cpu_us / raw:.2f}x")


@contextlib.contextmanager
def _postgres(arg: str | None) -> Iterator[str | None]:
    if arg != "private":
        yield arg
        return
    from tests.servers import start_postgres

    with start_postgres(durable=True) as server:
        yield server.url


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres", help="a PostgreSQL URL, or 'private' to start one")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("distributed", "local"))
    args = parser.parse_args()
    with _postgres(args.postgres) as url:
        main(url, args.runs, args.repeat, args.only)
