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
