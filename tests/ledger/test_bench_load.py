"""``bench.load``'s helpers that need a real PostgreSQL."""

from __future__ import annotations

import time

import pytest

from bench import cpu
from bench.load import postgres_pid
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.ledger


def test_bench_load_finds_the_postgres_root_process_every_time(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``postgres_pid`` reads the parent of the backend serving its connection while the
    connection is open: once closed the backend exits, and a PostgreSQL part of the CPU
    figures that found no process would silently read 0."""
    real_parent = cpu.parent

    def parent_a_moment_later(pid: int) -> int | None:
        time.sleep(0.2)  # a loaded box: the bench process is scheduled out for a moment
        return real_parent(pid)

    with fresh_postgres_database(database_url) as url:
        # As the bench calls it: about one call in three already finds the backend gone.
        assert None not in [postgres_pid(url) for _ in range(50)]
        # Deterministically: the same read 0.2 s later.
        monkeypatch.setattr(cpu, "parent", parent_a_moment_later)
        assert postgres_pid(url) is not None


class _Finished:
    """The relays' Redis, into which a chain's last hop only pushes its key."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def rpush(self, key: str, _value: str) -> None:
        self.keys.append(key)


def test_the_leased_relay_writes_what_a_step_of_the_protocol_must(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bench.load`` quotes the leased relay as the floor of the step protocol: a hop
    that skipped one of its writes, or ran twice, would flatter that floor."""
    import psycopg

    from bench import relay_app
    from bench.load import psycopg_url

    sent: list[list[object]] = []
    finished = _Finished()
    monkeypatch.setattr(
        relay_app.leased_relay, "apply_async", lambda args, queue: sent.append(args)
    )
    monkeypatch.setattr(relay_app, "_redis", lambda: finished)
    with fresh_postgres_database(database_url) as url:
        dsn = psycopg_url(url)
        monkeypatch.setenv(relay_app.DURABLE_DB_ENV, dsn)
        relay_app._hops_connection.cache_clear()
        relay_app.create_hops_table(dsn)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"INSERT INTO {relay_app.LEASED_RUNS} VALUES ('c', 'running', 0)")
                conn.execute(f"INSERT INTO {relay_app.LEASED_TABLE} VALUES ('c', 0, 'queued')")
                relay_app.leased_relay.run(1, "k", "c", 0)
                relay_app.leased_relay.run(1, "k", "c", 0)  # a second delivery: no-op
                assert sent == [[0, "k", "c", 1]]
                relay_app.leased_relay.run(*sent[0])

                def hops(table: str, column: str) -> list[tuple[object, ...]]:
                    return conn.execute(
                        f"SELECT hop, {column} FROM {table} ORDER BY hop"
                    ).fetchall()

                assert hops(relay_app.LEASED_TABLE, "status") == [(0, "done"), (1, "done")]
                assert hops(relay_app.CHECKPOINT_TABLE, "store_json") == [
                    (0, '{"n": 1}'),
                    (1, '{"n": 2}'),
                ]
                assert hops(relay_app.EVENT_TABLE, "event") == [(0, "node_end"), (1, "node_end")]
                run = conn.execute(f"SELECT status, steps FROM {relay_app.LEASED_RUNS}").fetchone()
                assert run == ("completed", 2)
                assert finished.keys == ["k"] and len(sent) == 1
        finally:
            relay_app._hops_connection().close()
            relay_app._hops_connection.cache_clear()
