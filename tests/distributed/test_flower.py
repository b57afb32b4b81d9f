"""Flower on the test broker lists finished step tasks by a readable name (FLOW.NODE),
with their run id, step, node, worker, state and runtime, read from its HTTP API.

The worker is started as ``pocoflow worker`` starts one (task events off, worker
heartbeats on): ``pocoflow flower`` turns task events on in the workers it sees, so runs
are submitted until one of their steps shows up, instead of sleeping for Flower's first
enable-events broadcast. (A worker started ``--without-heartbeat --without-gossip``, as
the other test modules do, has no event dispatcher to turn on.)"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from pocoflow import devcluster
from pocoflow.devcluster import free_port
from tests.distributed.conftest import Cluster
from tests.distributed.faults import REPO_ROOT
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

WORKERS = 0  # the test starts its own, with pocoflow worker's flags

TIMEOUT_S = 90.0


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


@pytest.fixture
def flower(cluster: Cluster) -> Iterator[str]:
    """``pocoflow flower`` on the cluster's broker, its API open (as behind an auth proxy)."""
    port = free_port()
    env = {**cluster.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    log = cluster.workdir / "flower.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pocoflow.cli", "flower", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"flower exited:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/healthcheck", timeout=1) as response:
                    return response.read() == b"OK"
            except OSError:
                return False

        wait_until(healthy, TIMEOUT_S, interval=0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("cluster", ["sqlite"], indirect=True)
def test_flower_lists_finished_steps_with_run_step_node_and_worker(
    cluster: Cluster, flower: str
) -> None:
    worker = devcluster.start_worker("plain", cluster.env, cluster.workdir, extra=())
    cluster.workers.append(worker)  # killed with the cluster
    worker.wait_ready()
    assert "task events: OFF" in worker.log()
    run_ids: list[str] = []

    def a_step_in_flower() -> dict[str, Any] | None:
        handle = cluster.submit("counter", {"count": 0})
        handle.wait(timeout=TIMEOUT_S)
        run_ids.append(handle.run_id)
        tasks = _get(f"{flower}/api/tasks?state=SUCCESS") or {}
        for task in tasks.values():
            if any(f"run_id={run_id} " in (task.get("args") or "") for run_id in run_ids):
                return task
        return None

    task = wait_until(a_step_in_flower, TIMEOUT_S, interval=0.5)
    assert task["name"].startswith("counter.inc"), task
    assert task["state"] == "SUCCESS"
    assert task["worker"].startswith("plain@"), task
    assert task["runtime"] is not None and task["runtime"] >= 0
    node = task["name"].split(".", 1)[1]
    assert f" node={node} " in task["args"] and " step=" in task["args"], task
    # The name is display only: the worker ran pocoflow.step, whose result is the outcome.
    assert task["result"] in ("'committed'", "committed"), task
