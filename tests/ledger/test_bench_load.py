"""``bench.load``'s helpers that need a real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

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


@pytest.fixture
def leased(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """The leased relay on a fresh database: its connection (autocommit), the messages it
    sent and the chains it finished; one chain ``c`` submitted, as ``relay_load`` does."""
    import psycopg

    from bench import relay_app
    from bench.load import psycopg_url

    sent: list[list[object]] = []
    finished = _Finished()
    monkeypatch.setattr(relay_app, "_send_next", sent.append)
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

                def hops(table: str, column: str) -> list[tuple[object, ...]]:
                    return conn.execute(
                        f"SELECT hop, {column} FROM {table} ORDER BY hop"
                    ).fetchall()

                yield SimpleNamespace(
                    app=relay_app, conn=conn, sent=sent, finished=finished.keys, hops=hops
                )
        finally:
            relay_app._hops_connection().close()
            relay_app._hops_connection.cache_clear()


def test_the_leased_relay_writes_what_a_step_of_the_protocol_must(leased: SimpleNamespace) -> None:
    """``bench.load`` quotes the leased relay as the floor of the step protocol: a hop
    that skipped one of its writes, or ran twice, would flatter that floor."""
    relay = leased.app
    relay.leased_relay.run(1, "k", "c", 0)
    relay.leased_relay.run(1, "k", "c", 0)  # a second delivery: no-op
    assert leased.sent == [[0, "k", "c", 1]]
    relay.leased_relay.run(*leased.sent[0])
    assert leased.hops(relay.LEASED_TABLE, "status") == [(0, "done"), (1, "done")]
    # Each checkpoint is the one the claim loaded, counted up: the load is not skipped.
    assert leased.hops(relay.CHECKPOINT_TABLE, "store_json") == [(0, '{"n": 1}'), (1, '{"n": 2}')]
    assert leased.hops(relay.EVENT_TABLE, "event") == [(0, "node_end"), (1, "node_end")]
    run = leased.conn.execute(f"SELECT status, steps FROM {relay.LEASED_RUNS}").fetchone()
    assert run == ("completed", 2)
    assert leased.finished == ["k"] and len(leased.sent) == 1


def test_the_leased_relay_stops_at_a_run_that_is_not_running(leased: SimpleNamespace) -> None:
    relay = leased.app
    leased.conn.execute(f"UPDATE {relay.LEASED_RUNS} SET status = 'paused'")
    relay.leased_relay.run(1, "k", "c", 0)
    assert leased.hops(relay.LEASED_TABLE, "status") == [(0, "queued")]
    assert leased.hops(relay.CHECKPOINT_TABLE, "hop") == [] and leased.sent == []


def test_a_leased_relay_hop_whose_lease_was_taken_commits_and_sends_nothing(
    leased: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between its claim and its commit another holder takes the step's lease (a take-over
    after a freeze): the hop's commit is fenced out, so it writes and sends nothing."""
    relay = leased.app
    cached = relay._hops_connection
    real = cached()

    class TakenAfterTheClaim:
        def execute(self, sql: str, params: dict[str, object]) -> object:
            result = real.execute(sql, params)
            if sql.startswith(f"UPDATE {relay.LEASED_TABLE} SET status = 'running'"):
                leased.conn.execute(f"UPDATE {relay.LEASED_TABLE} SET lease_owner = 'another'")
            return result

    monkeypatch.setattr(relay, "_hops_connection", lambda: TakenAfterTheClaim())
    relay.leased_relay.run(1, "k", "c", 0)
    monkeypatch.setattr(relay, "_hops_connection", cached)
    assert leased.hops(relay.LEASED_TABLE, "lease_owner") == [(0, "another")]
    assert leased.hops(relay.CHECKPOINT_TABLE, "hop") == [] and leased.sent == []
