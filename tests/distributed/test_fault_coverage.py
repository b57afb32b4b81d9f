"""Faults the rest of the distributed suite does not reach, with real workers on both
ledgers: a healthy step running past several leases (G3 must not take it over), a worker
killed between its commit and its publish (a worker killed with a prefetched message:
``test_recovery``), and ``cancel --terminate`` / ``resume --force`` through the CLI. Every test checks each
run's final Store, not only its status."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.distributed import fault_flows
from tests.distributed.conftest import Cluster, local_result
from tests.distributed.faults import (
    REPO_ROOT,
    TEST_LEASE_S,
    attempts_of,
    checkpoint_steps,
    pid_alive,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

FLOWS = "tests.distributed.fault_flows"
# The workers run the fault flows with their injections armed, and build the three-node
# variant of "versioned" (this process builds two nodes: resume --force accepts theirs).
WORKER_ENV = {"POCOFLOW_FLOWS": FLOWS, fault_flows.FAULTS_ENV: "1", "POCOFLOW_TEST_VARIANT": "b"}
TIMEOUT_S = 60.0
#: What a lost step may take to run again: lease + sweep, plus scheduling slack (G3).


def outcomes(cluster: Cluster, run_id: str, step: int) -> list[tuple[int, str]]:
    return [(a["attempt"], a["outcome"]) for a in attempts_of(cluster.db, run_id, step)]


def held_pid(side: Path, run_id: str, step: int = 1) -> int:
    pid_file = side / f"{run_id}.{step}.1.pid"
    return int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), TIMEOUT_S))


def test_a_healthy_step_running_past_three_leases_keeps_its_lease(live: Cluster) -> None:
    """The lease is renewed while exec runs: no takeover, no second exec (G1, G3)."""
    side = live.side_dir()
    long_s = 3.5 * TEST_LEASE_S
    handle = live.submit("long", {"count": 0, "long_s": long_s, "side_dir": str(side)})
    store = handle.wait(timeout=TIMEOUT_S)
    assert store.as_dict() == {
        "count": 3,
        "long_s": long_s,
        "long": long_s,
        "side_dir": str(side),
        "trail": ["before", "after"],
    }
    assert outcomes(live, handle.run_id, 1) == [(1, "committed")]
    assert len((side / f"{handle.run_id}.long").read_text().splitlines()) == 1  # one exec
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]


def test_a_worker_killed_between_commit_and_publish_loses_no_step(live: Cluster) -> None:
    """Step 1 commits, then its worker dies before publishing step 2: the outbox row is
    unsent and a sweeper sends it, under the same attempt (G3)."""
    started = time.monotonic()
    handle = live.submit("die_before_publish", {"count": 0})
    store = handle.wait(timeout=TIMEOUT_S)
    print(f"\nkilled between commit and publish: run done in {time.monotonic() - started:.2f}s")
    assert store.as_dict() == local_result("die_before_publish", {"count": 0})
    assert store["armed"] == 1
    assert sum(not w.alive for w in live.workers) == 1  # the armed worker did die
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2, 3]
    for step in range(4):
        assert outcomes(live, handle.run_id, step) == [(1, "committed")], step


# ── through the command line ─────────────────────────────────────────────────


def cli(
    live: Cluster, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("POCOFLOW_")}
    full.update(
        POCOFLOW_DB_URL=live.settings.db_url,
        POCOFLOW_BROKER_URL=live.settings.broker_url,
        POCOFLOW_FLOWS=FLOWS,
        PYTHONPATH=str(REPO_ROOT),
        **(env or {}),
    )
    return subprocess.run(
        [sys.executable, "-m", "pocoflow.cli", *args],
        cwd=REPO_ROOT, env=full, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip


def test_cancel_terminate_then_resume_through_the_cli(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("hold", {"count": 0, "side_dir": str(side), "ignore_cancel": True})
    pid = held_pid(side, handle.run_id)
    done = cli(live, "cancel", handle.run_id, "--terminate")
    assert done.returncode == 0, done.stderr
    wait_until(lambda: not pid_alive(pid), TIMEOUT_S)  # killed: its exec never polls
    assert live.db.get_run(handle.run_id)["status"] == "cancelled"
    assert outcomes(live, handle.run_id, 1) == [(1, "terminated")]
    assert checkpoint_steps(live.db, handle.run_id) == [0]
    resumed = cli(live, "resume", handle.run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert live.db.get_run(handle.run_id)["status"] == "completed"
    assert handle.store().as_dict() == {
        "count": 2,
        "hold": "passed",
        "hold_attempt": 3,  # 2 was fenced off by the terminate; the resume runs 3
        "ignore_cancel": True,
        "side_dir": str(side),
        "trail": ["before", "after"],
    }
    # 2: the resume's marker (crash counts start afresh), closed before the step ran
    assert outcomes(live, handle.run_id, 1) == [
        (1, "terminated"),
        (2, "resumed"),
        (3, "committed"),
    ]
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]


def test_resume_force_through_the_cli_accepts_the_workers_graph(live: Cluster) -> None:
    handle = live.submit("versioned", {"count": 0})  # two nodes here, three on the workers
    wait_until(lambda: live.db.get_run(handle.run_id)["status"] == "failed", TIMEOUT_S)
    assert "nodes added: third" in live.db.get_run(handle.run_id)["error_msg"]
    refused = cli(live, "resume", handle.run_id)  # same graph mismatch: fails again
    assert refused.returncode != 0
    forced = cli(live, "resume", handle.run_id, "--force", env={"POCOFLOW_TEST_VARIANT": "b"})
    assert forced.returncode == 0, forced.stderr
    run: dict[str, Any] = live.db.get_run(handle.run_id)
    assert run["status"] == "completed"
    assert handle.store().as_dict() == {"count": 3, "trail": ["first", "second", "third"]}
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]
