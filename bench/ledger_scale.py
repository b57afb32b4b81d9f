"""The ledger at scale: a distributed step and a sweep on a ledger holding 100,000 old runs.

Targets (issue 6): on a ledger seeded with ``--runs`` finished runs (a tenth of them
cancelled and a tenth paused, each still holding a queued step row, as a run stopped
between two steps leaves it), a distributed step costs at most 1.2x what it costs on an
empty ledger, and one sweep takes at most 5 ms; on SQLite and on PostgreSQL.

The old rows are written by a few ``INSERT ... SELECT`` statements over a number series
(seconds, not hours of running them). A step is measured in-process: the worker's real
code (``execute_step``) with a publisher that records the successor's message and marks
it sent, as the broker round trip is not what grows with the ledger. Runs of the 20-step
``bench_chain20`` alternate between the empty and the seeded ledger. The sweep is timed
on the seeded ledger with ``--live`` runs in flight (one queued step each). Last, the old
finished runs are pruned a batch at a time (``pocoflow prune``'s transactions), printing
the longest batch: how long a step running beside a prune may wait for it.

    python -m bench.ledger_scale [--runs 100000] [--backend sqlite|postgresql|both]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, ".")

from bench import dist_flows  # noqa: F401  (registers bench_chain20)
from bench.common import report
from bench.dist_flows import THROUGHPUT_CHAIN as STEPS
from pocoflow.ledger.prune import DEFAULT_BATCH

SEED_RUNS = 100_000
SEED_STEPS = 3
#: Epoch time of the seeded rows: long before any lease a live run holds.
SEED_EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SEED_ISO = "2026-01-01T00:00:00+00:00"
LEASE_S = 30.0
STEP_RATIO_TARGET = 1.2
PRUNE_AGE_S = 30 * 86400.0
SWEEP_MS_TARGET = 5.0

_RUN_STATUS = (
    "CASE {i} % 10 WHEN 0 THEN 'cancelled' WHEN 1 THEN 'paused' WHEN 2 THEN 'failed' "
    "ELSE 'completed' END"
)
# The last step of a cancelled or paused run is still queued (sent, its lease long
# expired), of a failed run failed; every other step is committed.
_STEP_STATUS = (
    "CASE WHEN {j} < {last} THEN 'committed' WHEN {i} % 10 < 2 THEN 'queued' "
    "WHEN {i} % 10 = 2 THEN 'failed' ELSE 'committed' END"
)


def _series(dialect: str, n: int) -> tuple[str, str]:
    """(WITH prefix, FROM source) of the integers 0..n-1 as column ``k``."""
    if dialect == "postgresql":
        return "", f"generate_series(0, {n - 1}) AS s(k)"
    prefix = f"WITH RECURSIVE s(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM s WHERE k < {n - 1}) "
    return prefix, "s"


def seed_sql(dialect: str, runs: int, steps: int = SEED_STEPS, prefix: str = "old-") -> list[str]:
    """The statements that write ``runs`` old runs of ``steps`` steps each, with their
    checkpoints (step -1 too), values, events, step rows, attempts, usage rows, a sent
    signal, and step 0's map items and join."""
    last = steps - 1
    out = []
    # Runs.
    w, src = _series(dialect, runs)
    status = _RUN_STATUS.format(i="k")
    out.append(
        f"{w}INSERT INTO pf_runs (run_id, flow_name, status, started_at, completed_at, "
        "total_steps, current_node, updated_at) "
        f"SELECT '{prefix}' || k, 'bench_old', {status}, '{SEED_ISO}', "
        f"CASE WHEN k % 10 < 2 THEN NULL ELSE '{SEED_ISO}' END, {steps}, 't', '{SEED_ISO}' "
        f"FROM {src}"
    )
    # Checkpoints and values of steps -1..last (the last only when it was committed).
    w, src = _series(dialect, runs * (steps + 1))
    i, j = f"(k / {steps + 1})", f"(k % {steps + 1} - 1)"
    committed = f"({j} < {last} OR {i} % 10 > 2)"
    out.append(
        f"{w}INSERT INTO pf_checkpoints (run_id, step, node_name, created_at, next_node, "
        f"action, manifest) SELECT '{prefix}' || {i}, {j}, 't', '{SEED_ISO}', 't', 'default', "
        f"'{{\"n\":' || {j} || '}}' FROM {src} WHERE {committed}"
    )
    out.append(
        f"{w}INSERT INTO pf_values (run_id, step, key, value_json) "
        f"SELECT '{prefix}' || {i}, {j}, 'n', '' || ({j} + 1) FROM {src} WHERE {committed}"
    )
    # Step rows, attempts and one event per step.
    w, src = _series(dialect, runs * steps)
    i, j = f"(k / {steps})", f"(k % {steps})"
    step_status = _STEP_STATUS.format(i=i, j=j, last=last)
    lease = f"CASE WHEN {j} = {last} AND {i} % 10 < 2 THEN {SEED_EPOCH} + {i} END"
    out.append(
        f"{w}INSERT INTO pf_steps (run_id, step, node_id, status, attempt, lease_expires_at, "
        f"sent_at, task_id, queued_at, created_at) SELECT '{prefix}' || {i}, {j}, 't', "
        f"{step_status}, 1, {lease}, {SEED_EPOCH}, 'task', {SEED_EPOCH} + {i}, {SEED_EPOCH} "
        f"FROM {src}"
    )
    out.append(
        f"{w}INSERT INTO pf_attempts (run_id, step, attempt, worker, started_at, ended_at, "
        f"outcome, task_id) SELECT '{prefix}' || {i}, {j}, 1, 'w', {SEED_EPOCH}, "
        f"{SEED_EPOCH}, {step_status}, 'task' FROM {src}"
    )
    out.append(
        f"{w}INSERT INTO pf_events (run_id, step, node_name, event, action, elapsed_ms, ts, "
        f"attempt) SELECT '{prefix}' || {i}, {j}, 't', 'node_end', 'default', 0.1, "
        f"'{SEED_ISO}', 1 FROM {src}"
    )
    # One report_usage call per step, as a run of LLM nodes leaves.
    out.append(
        f"{w}INSERT INTO pf_usage (run_id, step, attempt, node_name, model, input_tokens, "
        f"output_tokens, cost_usd, ts) SELECT '{prefix}' || {i}, {j}, 1, 't', 'm', 100, 20, "
        f"0.001, '{SEED_ISO}' FROM {src}"
    )
    # One answered human-in-the-loop value per run (wait_for / send).
    w, src = _series(dialect, runs)
    out.append(
        f"{w}INSERT INTO pf_signals (run_id, key, value_json, sent_at, created_at) "
        f"SELECT '{prefix}' || k, 'approval', 'true', {SEED_EPOCH}, {SEED_EPOCH} FROM {src}"
    )
    # Step 0 of every run was a map step: two items, done, and its complete join.
    w, src = _series(dialect, runs * 2)
    out.append(
        f"{w}INSERT INTO pf_items (run_id, step, idx, item_json, status, attempt, try_number, "
        f"queued_at, sent_at, result_json) SELECT '{prefix}' || (k / 2), 0, k % 2, '1', 'done', "
        f"1, 1, {SEED_EPOCH}, {SEED_EPOCH}, '1' FROM {src}"
    )
    w, src = _series(dialect, runs)
    out.append(
        f"{w}INSERT INTO pf_joins (run_id, step, total, done, created_at, ready_at) "
        f"SELECT '{prefix}' || k, 0, 2, 2, {SEED_EPOCH}, {SEED_EPOCH} FROM {src}"
    )
    return out


def seed(db_url: str, runs: int, steps: int = SEED_STEPS, prefix: str = "old-") -> float:
    """Write the old runs into the (migrated) ledger at ``db_url``; returns the seconds
    it took."""
    return run_seed(db_url, lambda dialect: seed_sql(dialect, runs, steps, prefix))


_OF_RUN = "FROM pf_usage u WHERE u.run_id = pf_runs.run_id"
_USAGE_TOTALS = (
    "UPDATE pf_runs SET "
    f"used_tokens = (SELECT COALESCE(SUM(CAST(u.input_tokens AS BIGINT) + u.output_tokens), 0) "
    f"{_OF_RUN}), used_cost_usd = (SELECT COALESCE(SUM(u.cost_usd), 0) {_OF_RUN}) "
    "WHERE run_id IN (SELECT run_id FROM pf_usage)"
)


def run_seed(db_url: str, statements: Callable[[str], list[str]]) -> float:
    """Create or migrate the ledger at ``db_url``, then run ``statements(dialect)`` in one
    transaction; returns the seconds they took. PostgreSQL is then ANALYZEd, as
    autovacuum would soon do by itself."""
    from sqlalchemy import create_engine, text

    from pocoflow.db import WorkflowDB
    from pocoflow.ledger.engine import resolve_url

    WorkflowDB(db_url).close()  # create or migrate the schema
    url = resolve_url(db_url)
    dialect = url.get_backend_name()
    engine = create_engine(url)
    started = time.perf_counter()
    try:
        with engine.begin() as conn:
            for statement in statements(dialect):
                conn.execute(text(statement))
            # What add_usage keeps: each run's totals are the sums over its usage rows.
            conn.execute(text(_USAGE_TOTALS))
        if dialect == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("ANALYZE"))
    finally:
        engine.dispose()
    return time.perf_counter() - started


class RecordingPublisher:
    """Stands for the broker: keeps each message and marks it sent, as ``Publisher`` does."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.sent: list[Any] = []

    def send(self, message: Any, **_: Any) -> bool:
        self.sent.append(message)
        self.db.mark_sent(message.run_id, message.step, message.attempt, task_id="t")
        return True

    __call__ = send

    def revoke(self, task_id: str, **_: Any) -> None:
        pass


class InProcessWorker:
    """One worker's ledger side, in this process: submit a run, drain it step by step."""

    def __init__(self, db_url: str) -> None:
        from pocoflow.db import WorkflowDB
        from pocoflow.distributed.executor import WorkerContext

        self.db = WorkflowDB(db_url)
        self.publisher = RecordingPublisher(self.db)
        self.ctx = WorkerContext(
            db=self.db,
            publisher=self.publisher,  # type: ignore[arg-type]
            redis=None,
            lease_s=LEASE_S,
        )

    def run_chain(self) -> float:
        """Seconds per step of one ``bench_chain20`` run, submit excluded."""
        from pocoflow.distributed.client import record_run
        from pocoflow.distributed.executor import execute_step
        from pocoflow.registry import build_flow
        from pocoflow.store import Store

        queue = [record_run(self.db, build_flow("bench_chain20"), Store({"n": 0}), lease_s=LEASE_S)]
        started = time.perf_counter()
        while queue:
            outcome = execute_step(queue.pop().to_dict(), worker_id="bench:1", context=self.ctx)
            if outcome != "committed":
                raise RuntimeError(f"bench step ended {outcome!r}, not committed")
            queue.extend(self.publisher.sent)
            self.publisher.sent.clear()
        return (time.perf_counter() - started) / STEPS

    def hold_live_runs(self, n: int) -> None:
        """``n`` runs in flight, each with its first step queued and sent: what a sweep
        looks through on a busy ledger."""
        from pocoflow.distributed.client import record_run
        from pocoflow.registry import build_flow
        from pocoflow.store import Store

        for _ in range(n):
            msg = record_run(self.db, build_flow("bench_chain20"), Store({"n": 0}), lease_s=LEASE_S)
            self.db.mark_sent(msg.run_id, msg.step, msg.attempt, task_id="t")

    def hold_a_fan_out(self, items: int = 100) -> None:
        """One more live run, whose map step fanned out ``items`` items, all sent and
        waiting: a sweep then runs its item queries too."""
        run_id = f"fan-{time.monotonic_ns()}"
        self.db.create_run(run_id, "f", initial_store={}, status="running", queue="celery")
        self.db.insert_step(run_id, 0, "M", lease_s=LEASE_S)
        if not self.db.claim_step(run_id, 0, 1, "bench", LEASE_S, holder="bench#1"):
            raise RuntimeError("the bench fan-out's step claim missed")
        texts = [str(idx) for idx in range(items)]
        if not self.db.fan_out(run_id, 0, 1, "bench#1", "bench", texts, []):
            raise RuntimeError("the bench fan-out missed")
        self.db.mark_items_sent([(run_id, 0, idx, 1) for idx in range(items)])

    def sweep_s(self) -> float:
        from pocoflow.distributed.sweeper import sweep

        started = time.perf_counter()
        report_ = sweep(self.db, self.publisher, lease_s=LEASE_S)
        elapsed = time.perf_counter() - started
        if report_:
            raise RuntimeError(f"the bench sweep found work it should not have: {report_}")
        return elapsed

    def close(self) -> None:
        from pocoflow.distributed import liveness

        liveness.stop()  # this process's heartbeats: none beats into a deleted ledger
        self.db.close()


@contextlib.contextmanager
def two_ledgers(backend: str, pg_server_url: str | None, tmp: Path) -> Iterator[tuple[str, str]]:
    """(empty, seeded) database URLs of ``backend``, dropped on the way out."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'empty.db'}", f"sqlite:///{tmp / 'seeded.db'}"
        return
    from tests.conftest import fresh_postgres_database

    assert pg_server_url is not None
    with (
        fresh_postgres_database(pg_server_url) as empty,
        fresh_postgres_database(pg_server_url) as seeded,
    ):
        yield empty, seeded


def measure(backend: str, runs: int, chains: int, live: int, pg_server_url: str | None) -> bool:
    print(f"  {backend}:")
    with (
        tempfile.TemporaryDirectory(prefix="pocoflow-bench-") as tmp,
        two_ledgers(backend, pg_server_url, Path(tmp)) as (empty_url, seeded_url),
    ):
        seconds = seed(seeded_url, runs)
        print(f"    seeded {runs} old runs x {SEED_STEPS} steps in {seconds:.1f}s")
        empty, seeded = InProcessWorker(empty_url), InProcessWorker(seeded_url)
        try:
            empty.run_chain(), seeded.run_chain()  # warm: engines, statement caches
            empty_s, seeded_s = [], []
            for _ in range(chains):  # turn about, so drift hits both alike
                empty_s.append(empty.run_chain())
                seeded_s.append(seeded.run_chain())
            e, s = statistics.median(empty_s), statistics.median(seeded_s)
            seeded.hold_live_runs(live)
            empty.hold_live_runs(live)
            sweeps = [seeded.sweep_s() for _ in range(20)]
            empty_sweep = statistics.median(empty.sweep_s() for _ in range(20))
            seeded.hold_a_fan_out()
            fan_sweep = statistics.median(seeded.sweep_s() for _ in range(20))
            pruned, batch_s = prune_all(seeded.db)
        finally:
            empty.close()
            seeded.close()
    ratio = s / e
    ok = report(
        "distributed step, seeded / empty ledger",
        ratio,
        "x",
        f"target <= {STEP_RATIO_TARGET}x ({s * 1e6:.0f} vs {e * 1e6:.0f} us/step, "
        f"median of {chains} chains of {STEPS})",
        ratio <= STEP_RATIO_TARGET,
        digits=2,
    )
    sweep_ms = statistics.median(sweeps) * 1e3
    ok &= report(
        f"sweep, seeded ledger, {live} live runs",
        sweep_ms,
        "ms",
        f"target <= {SWEEP_MS_TARGET} ms (empty ledger: {empty_sweep * 1e3:.2f} ms; "
        f"max {max(sweeps) * 1e3:.2f} ms)",
        sweep_ms <= SWEEP_MS_TARGET,
        digits=2,
    )
    report(
        "sweep, the same with a live fan-out",
        fan_sweep * 1e3,
        "ms",
        "one more live run, its map step's 100 items sent and waiting: the item queries run",
        None,
        digits=2,
    )
    report(
        "prune of the old finished runs, longest batch",
        max(batch_s) * 1e3,
        "ms",
        f"{pruned} runs in {len(batch_s)} batches of {DEFAULT_BATCH}, {sum(batch_s):.1f}s "
        f"in all (median batch {statistics.median(batch_s) * 1e3:.1f} ms): the longest a "
        "step waits for the prune",
        None,
        digits=1,
    )
    return ok


def prune_all(db: Any) -> tuple[int, list[float]]:
    """Prune every seeded finished run a batch per call, timing each (read + write)."""
    pruned, times = 0, []
    while True:
        started = time.perf_counter()
        n = db.prune_runs(PRUNE_AGE_S, max_batches=1)
        if not n:
            return pruned, times
        times.append(time.perf_counter() - started)
        pruned += n


def main(
    pg_server_url: str | None,
    runs: int = SEED_RUNS,
    chains: int = 15,
    live: int = 20,
    backends: tuple[str, ...] = ("sqlite", "postgresql"),
) -> bool:
    print(
        f"ledger at scale: a distributed step (in-process worker, {STEPS}-step chains) on "
        f"an empty ledger and on one holding {runs} old runs; a sweep on the latter"
    )
    ok = True
    for backend in backends:
        ok &= measure(backend, runs, chains, live, pg_server_url)
    return ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=SEED_RUNS)
    parser.add_argument("--chains", type=int, default=15)
    parser.add_argument("--live", type=int, default=20)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args()
    chosen = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    from bench.__main__ import postgres_url

    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres_url()) if "postgresql" in chosen else None
        sys.exit(0 if main(pg, args.runs, args.chains, args.live, chosen) else 1)
