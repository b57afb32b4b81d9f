"""Forks on real workers: a completed distributed run forked from step 1 ends with the
Store a full run gives and its parent unchanged; a run of a process forked onto the
workers; a fork's first step published once and run by a worker (not by the caller)."""

from __future__ import annotations

from typing import Any

import pytest

from pocoflow.distributed.client import fork_run
from pocoflow.registry import build_flow
from tests.distributed.conftest import Cluster, local_result
from tests.distributed.flows import CHAIN_LENGTH
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60.0


def parent_record(live: Cluster, run_id: str) -> dict[str, Any]:
    """All a fork must leave as it was: run row, checkpoints, steps, attempts, events.
    Read once the workers marked every step's message sent (they do it in batches, after
    the commit that ended the run)."""
    db = live.db
    wait_until(
        lambda: all(db.get_step(run_id, s)["sent_at"] for s in range(CHAIN_LENGTH)), TIMEOUT_S
    )
    return {
        "run": db.get_run(run_id),
        "checkpoints": db.get_checkpoints(run_id),
        "steps": [db.get_step(run_id, s) for s in range(CHAIN_LENGTH)],
        "attempts": db.get_attempts(run_id),
        "events": db.get_events(run_id),
    }


def test_a_completed_run_forked_from_step_1_completes_on_the_workers(live: Cluster) -> None:
    parent = live.submit("counter", {"count": 0})
    full = parent.wait(timeout=TIMEOUT_S).as_dict()
    before = parent_record(live, parent.run_id)

    fork = fork_run(parent.run_id, 1, settings=live.settings)

    assert fork.wait(timeout=TIMEOUT_S).as_dict() == full == local_result("counter", {"count": 0})
    run = live.db.get_run(fork.run_id)
    assert run["status"] == "completed" and run["total_steps"] == CHAIN_LENGTH
    assert (run["parent_run_id"], run["forked_from_step"]) == (parent.run_id, 1)
    steps = [c["step"] for c in live.db.get_checkpoints(fork.run_id)]
    assert steps == list(range(1, CHAIN_LENGTH))  # the copy of 1, then 2.. run by workers
    attempts = live.db.get_attempts(fork.run_id)
    assert sorted(a["step"] for a in attempts) == list(range(2, CHAIN_LENGTH))
    assert {a["outcome"] for a in attempts} == {"committed"} and all(a["worker"] for a in attempts)
    # Its first step published once: one attempt, marked sent (by fork_run, with the
    # broker's task id), never taken over or re-sent.
    first = live.db.get_step(fork.run_id, 2)
    assert (first["attempt"], first["status"]) == (1, "committed")
    assert first["sent_at"] is not None and first["task_id"]
    assert [(a["step"], a["attempt"]) for a in attempts if a["step"] == 2] == [(2, 1)]
    assert parent_record(live, parent.run_id) == before


def test_a_run_of_a_process_forks_onto_the_workers(live: Cluster) -> None:
    local = build_flow("counter")
    local.db_path = live.settings.db_url
    assert local.run({"count": 100})["count"] == 100 + CHAIN_LENGTH
    parent = local.last_run_id
    assert not live.db.get_attempts(parent)  # ran here, no worker took part

    fork = fork_run(parent, 4, settings=live.settings)

    assert fork.wait(timeout=TIMEOUT_S)["count"] == 100 + CHAIN_LENGTH
    assert live.db.get_run(fork.run_id)["queue"] == "pocoflow"
    workers = {a["worker"] for a in live.db.get_attempts(fork.run_id)}
    assert workers and all(w and "/" in w for w in workers)  # hostname/nonce:pid of workers
    assert not live.db.get_attempts(parent)
