"""Hooks fire in the worker; `pocoflow worker --flows M --queues Q` serves a queue."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pocoflow.devcluster import WorkerProcess
from tests.distributed.conftest import Cluster
from tests.distributed.faults import REPO_ROOT
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60.0


def test_builder_hooks_fire_in_the_worker_and_events_reach_the_client(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("hooked", {"count": 0, "side_dir": str(side)})
    assert handle.wait(TIMEOUT_S)["count"] == 2

    # flow_end fires on the worker after the commit that completed the run, which is
    # what wait() returns on: its line may land an instant later.
    def hook_lines() -> list[str] | None:
        lines = (side / "hooks").read_text().splitlines()
        return lines if lines and lines[-1].startswith("flow_end") else None

    lines = wait_until(hook_lines, TIMEOUT_S)
    assert [line.rsplit(" ", 1)[0] for line in lines] == [
        "node_end h1",
        "node_end h2",
        "flow_end 2",
    ]
    worker_pids = {pid for w in live.workers for pid in w.pids()}
    assert {int(line.rsplit(" ", 1)[1]) for line in lines} <= worker_pids
    assert os.getpid() not in worker_pids
    events = [e["event"] for e in handle.events()]
    assert events.count("node_end") == 2 and events[-1] == "flow_end"


def test_cli_worker_with_flows_serves_its_own_queue(live: Cluster) -> None:
    import subprocess

    env = {k: v for k, v in live.env.items() if k != "POCOFLOW_FLOWS"}  # --flows instead
    log = live.workdir / "special.log"
    argv = [sys.executable, "-m", "pocoflow.cli", "worker", "--flows",
            "tests.distributed.flows", "--queues", "special", "--concurrency", "1"]  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    special = WorkerProcess("special", proc, Path(log))
    try:
        special.wait_ready(TIMEOUT_S)
        handle = live.submit("counter", {"count": 0}, queue="special")
        assert handle.wait(TIMEOUT_S)["count"] == 20
        workers = {a["worker"] for a in live.db.get_attempts(handle.run_id)}
        assert {int(w.rsplit(":", 1)[1]) for w in workers} <= special.pids()
    finally:
        special.stop()
