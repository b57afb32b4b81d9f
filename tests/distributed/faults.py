"""Reusable fault operations for the distributed suite: real worker processes, kill -9,
SIGSTOP/SIGCONT, Redis restarts.

Workers are started exactly as ``pocoflow worker`` starts them (``worker_argv``), each in
its own session (process group), so a fault can hit one worker node (main process and
pool children) and teardown can reap everything it started, and nothing else.
Readiness and every fault outcome are polled, never slept for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocoflow.cli_worker import worker_argv
from tests.helpers import wait_until

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from tests.servers import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOWS_MODULE = "tests.distributed.flows"
#: Short lease and sweep so a lost step is re-run within ~3 s in tests (G3).
TEST_LEASE_S = 2.0
TEST_SWEEP_S = 0.5
READY_TIMEOUT_S = 60.0


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCOFLOW_")}
    env.update(
        POCOFLOW_DB_URL=db_url,
        POCOFLOW_BROKER_URL=broker_url,
        POCOFLOW_REDIS_URL=broker_url,
        POCOFLOW_FLOWS=flows,
        POCOFLOW_LEASE_SECONDS=str(lease_s),
        POCOFLOW_SWEEP_SECONDS=str(sweep_s),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


@dataclass
class WorkerProcess:
    """One ``pocoflow worker`` node: a Celery main process and its pool children."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    frozen: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pids(self) -> set[int]:
        """The main process and every live descendant."""
        found = {self.pid}
        parents = _parent_map()
        changed = True
        while changed:
            changed = False
            for pid, ppid in parents.items():
                if ppid in found and pid not in found:
                    found.add(pid)
                    changed = True
        return found

    def owns(self, pid: int) -> bool:
        return pid in self.pids()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"worker {self.name} exited at start:\n{self.log()[-3000:]}")
            return " ready." in self.log()

        wait_until(ready, timeout, interval=0.05)

    def signal(self, sig: int) -> None:
        """Signal the whole worker node (its process group)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """kill -9 of the node: main process and pool children, as a lost machine."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def kill_nowait(self) -> None:
        self.signal(signal.SIGKILL)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)
        self.frozen = False

    def stop(self, timeout: float = 10.0) -> None:
        """Warm shutdown, then kill -9 if it lingers."""
        if not self.alive:
            return
        if self.frozen:
            self.thaw()
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def start_worker(
    name: str,
    env: dict[str, str],
    log_dir: Path,
    *,
    concurrency: int = 1,
    queues: str | None = None,
    pool: str | None = None,
) -> WorkerProcess:
    """Start a worker node (not waiting for it: call ``wait_ready``)."""
    log_path = log_dir / f"{name}.log"
    argv = worker_argv(
        concurrency=concurrency,
        queues=queues,
        loglevel="info",
        pool=pool,
        hostname=f"{name}@%h",
        extra=["--without-heartbeat"],
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return WorkerProcess(name, proc, log_path)


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: ppid follows the ")".
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry)] = int(fields[1])
    return parents


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
