"""Retention on both ledgers: ``prune_runs`` / ``pocoflow prune`` delete old finished runs
with every row keyed by them, in short batches, and never a live run (queued, running,
paused, waiting), not even one resumed while the prune was under way."""

from __future__ import annotations

import time
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from bench.ledger_scale import seed
from pocoflow.cli import main as cli
from pocoflow.distributed.sweeper import SweeperThread
from pocoflow.ledger import prune as retention
from pocoflow.ledger.prune import Pruner
from tests.helpers import wait_until

pytestmark = pytest.mark.ledger

DAY = 86400.0
SEEDED = 50  # old-0..old-49: i % 10 == 1 paused (5), the other 45 finished
PAUSED = {f"old-{i}" for i in range(SEEDED) if i % 10 == 1}
FAILED = {f"old-{i}" for i in range(SEEDED) if i % 10 == 2}
CANCELLED = {f"old-{i}" for i in range(SEEDED) if i % 10 == 0}


def url_of(db: Any) -> str:
    return db._ledger.url.render_as_string(hide_password=False)


def rows_of(db: Any, run_ids: set[str]) -> dict[str, int]:
    """Rows per table (every table keyed by run) that belong to ``run_ids``."""
    out = {}
    with db._ledger.engine.connect() as conn:
        for table in retention._keyed_tables():
            stmt = select(func.count()).where(table.c.run_id.in_(sorted(run_ids)))
            out[table.name] = conn.execute(stmt).scalar()
    return out


def all_run_ids(db: Any) -> set[str]:
    return {row["run_id"] for row in db.list_runs(limit=10_000)}


@pytest.fixture
def seeded(db: Any) -> Any:
    seed(url_of(db), SEEDED)
    return db


def test_old_finished_runs_go_with_all_their_rows(seeded: Any) -> None:
    seeded.create_run("young-done", status="completed", initial_store={"x": 1})
    finished = {f"old-{i}" for i in range(SEEDED)} - PAUSED
    assert all(n > 0 for name, n in rows_of(seeded, finished).items()), "the seed has rows"

    assert seeded.prune_runs(30 * DAY) == len(finished)

    assert all(n == 0 for n in rows_of(seeded, finished).values()), rows_of(seeded, finished)
    assert all_run_ids(seeded) == PAUSED | {"young-done"}
    # A paused run keeps every row: it can still be resumed.
    assert seeded.get_step("old-1", 2)["status"] == "queued"
    assert seeded.load_checkpoint("old-1", 1).as_dict() == {"n": 2}


def test_live_runs_of_any_age_are_never_deleted(db: Any) -> None:
    for status in ("queued", "running", "paused", "waiting", "completed"):
        db.create_run(f"r-{status}", status=status, initial_store={"s": status})
    # A year from now every run is old: only the finished one may go.
    assert db.prune_runs(30 * DAY, now=time.time() + 365 * DAY) == 1
    assert all_run_ids(db) == {"r-queued", "r-running", "r-paused", "r-waiting"}
    assert db.load_checkpoint("r-waiting", -1).as_dict() == {"s": "waiting"}


def test_status_filter_dry_run_and_young_runs(seeded: Any) -> None:
    only = ("completed", "cancelled")
    expected = SEEDED - len(PAUSED) - len(FAILED)
    assert seeded.prune_runs(30 * DAY, statuses=only, dry_run=True) == expected
    assert len(all_run_ids(seeded)) == SEEDED  # a dry run deletes nothing
    assert seeded.prune_runs(400 * DAY, statuses=only) == 0  # nothing that old
    assert seeded.prune_runs(30 * DAY, statuses=only) == expected
    assert all_run_ids(seeded) == PAUSED | FAILED


def test_a_status_that_is_not_finished_is_refused(db: Any) -> None:
    for statuses in (("running",), ("completed", "paused"), ()):
        with pytest.raises(ValueError, match="finished runs only"):
            db.prune_runs(DAY, statuses=statuses)


def test_each_batch_is_its_own_short_transaction(
    seeded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    real = retention.delete_runs

    def spy(conn: Any, dialect: str, ids: list[str], *args: Any) -> int:
        batches.append(len(ids))
        return real(conn, dialect, ids, *args)

    monkeypatch.setattr(retention, "delete_runs", spy)
    assert seeded.prune_runs(30 * DAY, batch=10, max_batches=2) == 20
    assert batches == [10, 10]
    assert seeded.prune_runs(30 * DAY, batch=10) == SEEDED - len(PAUSED) - 20
    assert all(n <= 10 for n in batches)


def test_a_run_resumed_during_the_prune_is_kept(
    seeded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = retention.candidates

    def then_resume(*args: Any) -> list[str]:
        ids = real(*args)
        if "old-12" in ids:  # a user resumes the failed run between listing and delete
            seeded.update_run_if("old-12", status_in=("failed",), status="running")
        return ids

    monkeypatch.setattr(retention, "candidates", then_resume)
    seeded.prune_runs(30 * DAY)
    assert all_run_ids(seeded) == PAUSED | {"old-12"}
    assert rows_of(seeded, {"old-12"})["pf_checkpoints"] == 3  # steps -1, 0, 1


def test_the_sweeper_thread_prunes_when_configured(seeded: Any) -> None:
    thread = SweeperThread(
        lambda: seeded,
        lambda: lambda *a, **k: True,
        lease_s=10.0,
        interval_s=0.01,
        pruner=Pruner(30 * DAY),
    )
    thread.start()
    try:
        wait_until(lambda: all_run_ids(seeded) == PAUSED, timeout=30)
    finally:
        thread.stop()


def test_pocoflow_prune_command(seeded: Any) -> None:
    url = url_of(seeded)
    result = CliRunner().invoke(cli, ["prune", "--older-than", "30d", "--dry-run", "--db", url])
    assert result.exit_code == 0, result.output
    assert "would delete 45 runs" in result.output
    assert len(all_run_ids(seeded)) == SEEDED

    args = ["prune", "--older-than", "30d", "--status", "failed", "--db", url]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "deleted 5 runs (failed)" in result.output
    assert not FAILED & all_run_ids(seeded)

    for bad in (["--status", "running"], ["--older-than", "soon"]):
        args = ["prune", "--older-than", "30d", *bad, "--db", url]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output


def test_a_resume_landing_between_the_recheck_and_the_delete_keeps_its_run(
    seeded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL runs READ COMMITTED: the batch's re-check must lock its run rows, or a
    resume committed after the re-check read the run still failed has its (now running)
    run deleted by the batch's DELETE, which no longer looks at the status. SQLite
    serialises the two writers at BEGIN IMMEDIATE."""
    import threading

    from sqlalchemy import text

    if seeded.dialect != "postgresql":
        pytest.skip("SQLite's writers never interleave (BEGIN IMMEDIATE)")
    real = retention._keyed_tables
    resumed: list[bool] = []

    def resume_meanwhile() -> list[Any]:
        monkeypatch.setattr(retention, "_keyed_tables", real)
        resumer = threading.Thread(
            target=lambda: resumed.append(
                seeded.update_run_if("old-12", status_in=("failed",), status="running")
            )
        )
        resumer.start()

        def blocked() -> bool:  # waiting for the batch's row lock
            with seeded._ledger.engine.connect() as conn:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )
                ).scalar()
            return bool(waiting)

        wait_until(lambda: not resumer.is_alive() or blocked(), timeout=10)
        threads.append(resumer)
        return real()

    threads: list[threading.Thread] = []
    monkeypatch.setattr(retention, "_keyed_tables", resume_meanwhile)
    seeded.prune_runs(30 * DAY)
    threads[0].join(10)
    # Either the resume won (the run is kept, running) or the prune did (the run is gone
    # and the resume found nothing to resume): never a resumed run deleted.
    assert resumed == ["old-12" in all_run_ids(seeded)]


def test_a_batch_of_runs_with_many_map_items_is_deleted_in_smaller_transactions(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is sized by runs, but a run of a map step holds a row per item: runs
    whose items pass ``MAX_ITEM_ROWS`` between them go in transactions of their own."""
    monkeypatch.setattr(retention, "MAX_ITEM_ROWS", 250, raising=False)
    for name, items in (("a", 200), ("b", 200), ("c", 10), ("d", 30), ("e", 0)):
        db.create_run(name, status="completed", initial_store={})
        db.keep_items(name, 0, [(i, "item", "1") for i in range(items)])
    deletes: list[list[str]] = []
    real = retention.delete_runs

    def delete_runs(conn: Any, dialect: str, ids: list[str], *args: Any) -> int:
        deletes.append(list(ids))
        return real(conn, dialect, ids, *args)

    monkeypatch.setattr(retention, "delete_runs", delete_runs)
    assert db.prune_runs(30 * DAY, now=time.time() + 365 * DAY) == 5
    assert deletes == [["a"], ["b", "c", "d", "e"]]
    assert all_run_ids(db) == set()
    assert rows_of(db, {"a", "b", "c", "d", "e"})["pf_items"] == 0
