"""Schema 0003 and the compare-and-set run update the distributed executor relies on."""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytestmark = pytest.mark.ledger


def test_distributed_run_fields_are_recorded(db: Any) -> None:
    db.create_run("r", "f", status="queued", queue="gpu", graph_shape='{"start":"a"}')
    run = db.get_run("r")
    assert (run["queue"], run["graph_shape"]) == ("gpu", '{"start":"a"}')
    db.update_run("r", graph_shape='{"start":"b"}')
    assert db.get_run("r")["graph_shape"] == '{"start":"b"}'


def test_attempts_record_their_task_id(db: Any) -> None:
    db.create_run("r", "f")
    db.insert_step("r", 0, "a", lease_s=5)
    assert db.claim_step("r", 0, 1, "h:1", 5, task_id="task-1")
    (attempt,) = db.get_attempts("r")
    assert (attempt["worker"], attempt["task_id"]) == ("h:1", "task-1")


def test_update_run_if_only_matches_the_given_status_and_control(db: Any) -> None:
    db.create_run("r", "f", status="queued")
    assert not db.update_run_if("r", status_in=("running",), status="paused")
    assert db.update_run_if("r", status_in=("queued",), status="running")
    assert not db.update_run_if("r", control_in=("pause",), control=None)
    db.set_control("r", "pause")
    assert db.update_run_if("r", status_in=("running",), control_in=("pause",), status="paused")
    run = db.get_run("r")
    assert (run["status"], run["control"]) == ("paused", "pause")
    assert not db.update_run_if("no-such-run", status="running")
    with pytest.raises(ValueError, match="Unknown run status"):
        db.update_run_if("r", status="sleeping")


def test_update_run_if_has_one_winner(db: Any) -> None:
    db.create_run("r", "f", status="running")
    barrier = threading.Barrier(4)
    wins: list[bool] = []

    def cancel() -> None:
        barrier.wait()
        wins.append(db.update_run_if("r", status_in=("running",), status="cancelled"))

    threads = [threading.Thread(target=cancel) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]
