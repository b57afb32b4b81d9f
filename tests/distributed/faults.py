"""Reusable fault operations for the distributed suite: real worker processes, kill -9,
SIGSTOP/SIGCONT, Redis restarts.

Workers are started exactly as ``pocoflow worker`` starts them (``worker_argv``), each in
its own session (process group), so a fault can hit one worker node (main process and
pool children) and teardown can reap everything it started, and nothing else.
Readiness and every fault outcome are polled, never slept for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocoflow import devcluster
from pocoflow.devcluster import WorkerProcess
from tests.helpers import wait_until

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from tests.servers import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOWS_MODULE = "tests.distributed.flows"
#: Short lease and sweep so a lost step is re-run within ~3 s in tests (G3).
TEST_LEASE_S = 2.0
TEST_SWEEP_S = 0.5


def worker_env(
    db_url: str,
    broker_url: str,
    *,
    lease_s: float = TEST_LEASE_S,
    sweep_s: float = TEST_SWEEP_S,
    flows: str = FLOWS_MODULE,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a test worker: only our POCOFLOW_* settings, never the caller's."""
    env = devcluster.worker_environment(
        db_url, broker_url, flows, lease_s=lease_s, sweep_s=sweep_s, pythonpath=str(REPO_ROOT)
    )
    env.update(extra or {})
    return env


def start_worker(
    name: str,
    env: dict[str, str],
    log_dir: Path,
    *,
    concurrency: int = 1,
    queues: str | None = None,
    pool: str | None = None,
) -> WorkerProcess:
    """Start a worker node from the repository root (not waiting: call ``wait_ready``)."""
    return devcluster.start_worker(
        name, env, log_dir, cwd=REPO_ROOT, concurrency=concurrency, queues=queues, pool=pool
    )


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ── ledger views ─────────────────────────────────────────────────────────────


def open_attempt(db: WorkflowDB, run_id: str, step: int) -> dict[str, Any] | None:
    """The attempt of ``step`` that is running now (started, not ended), if any."""
    for attempt in reversed(db.get_attempts(run_id)):
        if attempt["step"] == step and attempt["ended_at"] is None:
            return attempt
    return None


def step_pid(db: WorkflowDB, run_id: str, step: int, timeout: float = 30.0) -> int:
    """The pid of the process running ``step`` of ``run_id``, from its ``pf_attempts`` row
    (``worker`` = ``hostname:pid``)."""
    attempt = wait_until(lambda: open_attempt(db, run_id, step), timeout)
    return int(str(attempt["worker"]).rsplit(":", 1)[1])


def worker_running(workers: list[WorkerProcess], pid: int) -> WorkerProcess:
    for worker in workers:
        if worker.owns(pid):
            return worker
    raise AssertionError(f"no test worker owns pid {pid}")


def attempts_of(db: WorkflowDB, run_id: str, step: int) -> list[dict[str, Any]]:
    return [a for a in db.get_attempts(run_id) if a["step"] == step]


def checkpoint_steps(db: WorkflowDB, run_id: str) -> list[int]:
    return [row["step"] for row in db.get_checkpoints(run_id)]


# ── Redis ────────────────────────────────────────────────────────────────────


def restart_redis(server: RedisServer, down_s: float = 0.0) -> None:
    """Stop the server (losing every queued message: no persistence) and start it again
    on the same port, optionally after staying down ``down_s`` seconds."""
    server.stop()
    if down_s:
        time.sleep(down_s)  # the outage itself is the fault under test, not a sync point
    server.start()
