"""Per-node cost with the ledger on: SQLite and PostgreSQL, beside raw-driver references.

Targets (issue 2): at most 250 us/node on SQLite, 1 ms/node on PostgreSQL over loopback.
The reference does what one step must do (insert a value, a checkpoint and two events,
update the run) in one transaction straight through the driver: the floor we can reach.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

from bench.common import report
from bench.core_overhead import CHAIN, poco_chain
from pocoflow import Store


def per_node_us(db_url: str, runs: int) -> float:
    flow = poco_chain(db_url)
    flow.run(Store({"n": 0}))  # warm: engine, pool, migrations check, statement cache
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        flow.run(Store({"n": 0}))
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] / CHAIN * 1e6


def raw_sqlite_us(path: Path, steps: int = 2000) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(
        """CREATE TABLE v(run TEXT, step INT, key TEXT, value TEXT, PRIMARY KEY(run, step, key));
        CREATE TABLE c(run TEXT, step INT, node TEXT, manifest TEXT, ts TEXT, UNIQUE(run, step));
        CREATE TABLE e(id INTEGER PRIMARY KEY, run TEXT, step INT, event TEXT, ts TEXT);
        CREATE TABLE r(run TEXT PRIMARY KEY, steps INT, node TEXT);
        INSERT INTO r VALUES ('r', 0, '');"""
    )
    started = time.perf_counter()
    for step in range(steps):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO v VALUES ('r', ?, 'n', ?)", (step, str(step)))
        conn.execute("INSERT INTO c VALUES ('r', ?, 'Step', '{\"n\":1}', 'ts')", (step,))
        conn.executemany(
            "INSERT INTO e(run, step, event, ts) VALUES ('r', ?, ?, 'ts')",
            [(step, "node_start"), (step, "node_end")],
        )
        conn.execute("UPDATE r SET steps = ?, node = 'Step' WHERE run = 'r'", (step,))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed / steps * 1e6


def raw_postgres_us(url: str, steps: int = 500) -> float:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.execute(
            """DROP TABLE IF EXISTS bench_v, bench_c, bench_e, bench_r;
            CREATE TABLE bench_v(run TEXT, step INT, key TEXT, value TEXT, PRIMARY KEY(run, step, key));
            CREATE TABLE bench_c(run TEXT, step INT, node TEXT, manifest TEXT, ts TEXT, UNIQUE(run, step));
            CREATE TABLE bench_e(id SERIAL PRIMARY KEY, run TEXT, step INT, event TEXT, ts TEXT);
            CREATE TABLE bench_r(run TEXT PRIMARY KEY, steps INT, node TEXT);
            INSERT INTO bench_r VALUES ('r', 0, '');"""
        )
        conn.commit()
        started = time.perf_counter()
        for step in range(steps):
            with conn.transaction():
                conn.execute("INSERT INTO bench_v VALUES ('r', %s, 'n', %s)", (step, str(step)))
                conn.execute("INSERT INTO bench_c VALUES ('r', %s, 'Step', '{}', 'ts')", (step,))
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO bench_e(run, step, event, ts) VALUES ('r', %s, %s, 'ts')",
                        [(step, "node_start"), (step, "node_end")],
                    )
                conn.execute("UPDATE bench_r SET steps = %s WHERE run = 'r'", (step,))
        elapsed = time.perf_counter() - started
        conn.execute("DROP TABLE bench_v, bench_c, bench_e, bench_r")
        conn.commit()
    return elapsed / steps * 1e6


def main(pg_url: str | None, runs: int = 15) -> bool:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        sqlite_us = per_node_us(str(tmp_path / "bench.db"), runs)
        raw_us = raw_sqlite_us(tmp_path / "raw.db")
        print(f"ledger: {CHAIN}-node chain, one checkpoint per node, median of {runs} runs")
        ok &= report(
            "per-node, SQLite ledger (WAL, NORMAL)",
            sqlite_us,
            "us",
            f"raw sqlite3 same writes: {raw_us:.1f} us (target <= 250 us)",
            sqlite_us <= 250,
        )
    if pg_url:
        pg_us = per_node_us(pg_url, max(3, runs // 3))
        raw_pg = raw_postgres_us(pg_url)
        ok &= report(
            "per-node, PostgreSQL ledger (loopback)",
            pg_us,
            "us",
            f"raw psycopg same writes: {raw_pg:.1f} us (target <= 1000 us)",
            pg_us <= 1000,
        )
    return ok
