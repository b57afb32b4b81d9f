"""The lease-holder fence with real workers (issue 6, defect 3): a worker frozen (SIGSTOP)
past its lease while another copy of the *same* attempt claimed the step on another
worker wakes up and finishes, and its result is refused; the new holder's commits.

The sweeper is off in these workers: it would take the expired step over under a new
attempt, and the copy of the same attempt would then be stale, the older case."""

from __future__ import annotations

import time

import pytest

from pocoflow.distributed.message import StepMessage
from tests.distributed.conftest import Cluster
from tests.distributed.faults import (
    attempts_of,
    checkpoint_steps,
    freeze_outside_a_write,
    worker_running,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

WORKER_ENV = {"POCOFLOW_SWEEP_SECONDS": "3600"}
TIMEOUT_S = 30
HOLD_STEP = 1  # hold flow: before (0) -> Hold (1) -> after (2)


def pid_of(attempt: dict) -> int:
    return int(str(attempt["worker"]).rsplit(":", 1)[1])


def test_a_frozen_holder_loses_to_a_copy_of_the_same_attempt(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("hold", {"count": 0, "side_dir": str(side)})
    (first,) = wait_until(lambda: attempts_of(live.db, handle.run_id, HOLD_STEP), TIMEOUT_S)
    frozen = worker_running(live.workers, pid_of(first))
    freeze_outside_a_write(frozen, live.settings.db_url)
    second = None
    try:
        wait_until(
            lambda: live.db.get_step(handle.run_id, HOLD_STEP)["lease_expires_at"] < time.time(),
            TIMEOUT_S,
        )
        # The broker delivers attempt 1 again (a redelivery, a resend): the other worker
        # claims the expired lease and runs the same attempt. (The frozen worker's last
        # BRPOP, 1 s, timed out while the 2 s lease ran out: it cannot take the copy.)
        node_id = live.db.get_step(handle.run_id, HOLD_STEP)["node_id"]
        live.send_raw(StepMessage(handle.run_id, "hold", HOLD_STEP, node_id, 1))
        _, copy = wait_until(
            lambda: (lambda a: a if len(a) == 2 else None)(
                attempts_of(live.db, handle.run_id, HOLD_STEP)
            ),
            TIMEOUT_S,
        )
        assert copy["attempt"] == 1 and pid_of(copy) != pid_of(first)
        second = worker_running(live.workers, pid_of(copy))
        freeze_outside_a_write(second, live.settings.db_url)
        # The first holder wakes up first and finishes its exec: its commit is refused.
        frozen.thaw()
        (side / f"{handle.run_id}.release").write_text("go")
        ended = wait_until(
            lambda: attempts_of(live.db, handle.run_id, HOLD_STEP)[0]["outcome"], TIMEOUT_S
        )
        assert ended == "lost"
        assert checkpoint_steps(live.db, handle.run_id) == [0]
    finally:
        frozen.thaw()
        if second is not None:
            second.thaw()
    store = handle.wait(timeout=TIMEOUT_S)
    assert store["hold"] == "released" and store["count"] == 2
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]
    outcomes = [(a["attempt"], a["outcome"]) for a in attempts_of(live.db, handle.run_id, 1)]
    assert outcomes == [(1, "lost"), (1, "committed")]
