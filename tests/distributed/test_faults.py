"""Faults with real worker processes: kill -9 of the worker running a step (G3), a worker
frozen past its lease (G1), cancel, pause/resume and terminate mid-run (G4)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pocoflow.distributed import client
from tests.distributed.conftest import Cluster
from tests.distributed.faults import (
    TEST_LEASE_S,
    TEST_SWEEP_S,
    attempts_of,
    checkpoint_steps,
    open_attempt,
    pid_alive,
    worker_running,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

TIMEOUT_S = 30
HOLD_STEP = 1  # hold flow: before (0) -> Hold (1) -> after (2)


def held_pid(side: Path, run_id: str, attempt: int = 1) -> int:
    pid_file = side / f"{run_id}.{HOLD_STEP}.{attempt}.pid"
    return int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), TIMEOUT_S))


def test_kill_9_of_the_worker_running_a_step_reruns_it_elsewhere(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("hold", {"count": 0, "side_dir": str(side)})
    victim = worker_running(live.workers, held_pid(side, handle.run_id))
    killed_at = time.monotonic()
    victim.kill()
    store = handle.wait(timeout=TIMEOUT_S)
    recovered_in = time.monotonic() - killed_at
    # G3: re-run within lease + sweep interval (plus scheduling slack), not the broker's
    # visibility timeout.
    assert recovered_in < TEST_LEASE_S + TEST_SWEEP_S + 5, recovered_in
    assert store["hold"] == "passed" and store["hold_attempt"] == 2
    assert store["count"] == 2
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]  # G1: one per step
    outcomes = [(a["attempt"], a["outcome"]) for a in attempts_of(live.db, handle.run_id, 1)]
    assert outcomes == [(1, "lost"), (2, "committed")]
    survivor_pid = int(attempts_of(live.db, handle.run_id, 1)[1]["worker"].rsplit(":", 1)[1])
    assert not victim.owns(survivor_pid)


def test_a_worker_frozen_past_its_lease_commits_nothing(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("hold", {"count": 0, "side_dir": str(side)})
    frozen = worker_running(live.workers, held_pid(side, handle.run_id))
    frozen.freeze()
    try:
        store = handle.wait(timeout=TIMEOUT_S)  # another worker took the step over
        assert store["hold"] == "passed" and store["hold_attempt"] == 2
    finally:
        frozen.thaw()
    # The frozen attempt wakes up, finishes its exec and tries to commit: refused (G1).
    (side / f"{handle.run_id}.release").write_text("go")
    first = wait_until(
        lambda: next(
            (
                a
                for a in attempts_of(live.db, handle.run_id, 1)
                if a["attempt"] == 1 and a["ended_at"]
            ),
            None,
        ),
        TIMEOUT_S,
    )
    assert first["outcome"] == "lost"
    wait_until(lambda: open_attempt(live.db, handle.run_id, HOLD_STEP) is None, TIMEOUT_S)
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]
    assert live.db.get_checkpoint(handle.run_id, 1)["action"] == "default"
    assert handle.store()["hold_attempt"] == 2
    assert live.db.get_run(handle.run_id)["status"] == "completed"


def test_cancel_stops_the_run_before_its_next_node(live: Cluster) -> None:
    handle = live.submit("slow_chain", {"slow_s": 0.3})
    wait_until(lambda: live.db.count_committed(handle.run_id) >= 2, TIMEOUT_S)
    handle.cancel()
    assert handle.status == "cancelled"
    cancelled_with = live.db.count_committed(handle.run_id)
    # Whatever was running finishes (its exec polls cancelled() and returns early)...
    wait_until(lambda: open_attempt(live.db, handle.run_id, cancelled_with) is None, TIMEOUT_S)
    wait_until(lambda: all(a["ended_at"] for a in live.db.get_attempts(handle.run_id)), TIMEOUT_S)
    # ...and no node starts after it: at most that one step committed.
    final = live.db.count_committed(handle.run_id)
    assert final <= cancelled_with + 1 < 8
    assert live.db.get_step(handle.run_id, final)["status"] == "queued"  # kept for a resume
    assert handle.wait(timeout=1)["count"] == final
    assert handle.status == "cancelled"
    # A cancelled run can be resumed and completes.
    resumed = client.resume_run(handle.run_id, settings=live.settings)
    assert resumed.wait(timeout=TIMEOUT_S)["count"] == 8
    assert checkpoint_steps(live.db, handle.run_id) == list(range(8))


def test_a_long_exec_polling_cancelled_stops_early(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("hold", {"count": 0, "side_dir": str(side)})
    held_pid(side, handle.run_id)
    handle.cancel()
    # exec saw self.cancelled() (Redis flag, read at most every 0.5 s) and returned; its
    # step commits, the next node never starts (G4).
    wait_until(lambda: live.db.count_committed(handle.run_id) == 2, TIMEOUT_S)
    assert handle.store()["hold"] == "cancelled"
    wait_until(lambda: all(a["ended_at"] for a in live.db.get_attempts(handle.run_id)), TIMEOUT_S)
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1]
    assert handle.status == "cancelled"


def test_pause_then_resume(live: Cluster) -> None:
    handle = live.submit("slow_chain", {"slow_s": 0.2})
    wait_until(lambda: live.db.count_committed(handle.run_id) >= 1, TIMEOUT_S)
    handle.pause()
    wait_until(lambda: handle.status == "paused", TIMEOUT_S)
    wait_until(lambda: all(a["ended_at"] for a in live.db.get_attempts(handle.run_id)), TIMEOUT_S)
    paused_at = live.db.count_committed(handle.run_id)
    assert paused_at < 8
    assert not handle.is_done
    # Parked: the outstanding step stays queued and nobody picks it up, sweeper included.
    step_row = live.db.get_step(handle.run_id, paused_at)
    assert step_row["status"] == "queued"
    wait_until(
        lambda: live.db.get_step(handle.run_id, paused_at)["lease_expires_at"] < time.time(), 10
    )
    # "Nothing happens" can only be observed over a window: two sweeps of every worker.
    time.sleep(2 * TEST_SWEEP_S)
    assert live.db.get_step(handle.run_id, paused_at)["attempt"] == step_row["attempt"]
    handle.resume()
    store = handle.wait(timeout=TIMEOUT_S)
    assert store["count"] == 8 and handle.status == "completed"
    assert checkpoint_steps(live.db, handle.run_id) == list(range(8))
    events = [e["event"] for e in handle.events()]
    assert "run_paused" in events and "run_resumed" in events


def test_cancel_with_terminate_kills_a_long_exec(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("hold", {"count": 0, "side_dir": str(side), "ignore_cancel": True})
    pid = held_pid(side, handle.run_id)
    handle.cancel(terminate=True)
    wait_until(lambda: not pid_alive(pid), TIMEOUT_S)  # the exec did not poll; it was killed
    assert handle.status == "cancelled"
    assert checkpoint_steps(live.db, handle.run_id) == [0]
    # The killed attempt is fenced out; the step stays queued for a resume, and the
    # sweeper leaves a cancelled run alone.
    (attempt,) = attempts_of(live.db, handle.run_id, HOLD_STEP)
    assert attempt["outcome"] == "terminated"
    row = live.db.get_step(handle.run_id, HOLD_STEP)
    assert (row["status"], row["attempt"]) == ("queued", 2)
    resumed = client.resume_run(handle.run_id, settings=live.settings)
    assert resumed.wait(timeout=TIMEOUT_S)["hold"] == "passed"
