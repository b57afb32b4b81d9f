"""A module-scoped cluster per ledger backend: a ledger, a Redis DB, two real workers.

Tests that kill or freeze a worker call ``cluster.ensure_workers()`` afterwards (or at
their start), so the next test finds two live, unfrozen workers again.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pocoflow.distributed import client
from pocoflow.distributed.celery_app import TASK_NAME, create_app
from pocoflow.distributed.message import StepMessage
from pocoflow.runner import RunHandle
from pocoflow.settings import Settings
from tests.conftest import REDIS_ENV
from tests.distributed import flows
from tests.distributed.faults import (
    TEST_LEASE_S,
    TEST_SWEEP_S,
    WorkerProcess,
    start_worker,
    worker_env,
)

pytestmark = pytest.mark.distributed


def _own_redis_dbs(env: Mapping[str, str]) -> list[int]:
    """Databases 1-15 of the test Redis; shared out between pytest-xdist's processes
    (``gw0``, ``gw1``..., a replacement for a crashed one ``gw2``...) when they share one
    Redis (``POCOFLOW_TEST_REDIS_URL``), so no two empty or use the same database. Each
    private Redis is one process's own."""
    worker = env.get("PYTEST_XDIST_WORKER", "")
    count = int(env.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not (env.get(REDIS_ENV) and worker.startswith("gw")) or count < 2:
        return list(range(1, 16))
    if count > 15:
        raise RuntimeError(f"{count} test processes cannot share the 15 databases of {REDIS_ENV}")
    index = int(worker[2:]) % count
    return [db for db in range(1, 16) if (db - 1) % count == index]


_redis_dbs = itertools.cycle(_own_redis_dbs(os.environ))


class Cluster:
    """Ledger + broker + worker processes, and the client settings to talk to them."""

    def __init__(
        self,
        db_url: str,
        broker_url: str,
        workdir: Path,
        worker_extra: dict[str, str],
        *,
        redis_url: str | None = None,
    ) -> None:
        """``redis_url``: where the control flags live, when the broker is not Redis."""
        from pocoflow.db import WorkflowDB

        self.workdir = workdir
        redis_url = redis_url or broker_url
        self.settings = Settings(
            db_url=db_url,
            broker_url=broker_url,
            redis_url=redis_url,
            lease_seconds=TEST_LEASE_S,
            sweep_seconds=TEST_SWEEP_S,
        )
        self.db = WorkflowDB(db_url)
        self.env = worker_env(db_url, broker_url, extra={"POCOFLOW_REDIS_URL": redis_url})
        self.env.update(worker_extra)
        self.workers: list[WorkerProcess] = []
        self._names = itertools.count(1)
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            self._app = create_app(self.settings)
        return self._app

    # ── workers ──────────────────────────────────────────────────────────────

    def start_workers(self, n: int) -> list[WorkerProcess]:
        started = [start_worker(f"w{next(self._names)}", self.env, self.workdir) for _ in range(n)]
        for worker in started:
            worker.wait_ready()
        self.workers.extend(started)
        return started

    def ensure_workers(self, n: int = 2) -> None:
        """Thaw frozen workers, forget dead ones, start new ones up to ``n``."""
        for worker in self.workers:
            if worker.frozen:
                worker.thaw()
        self.workers = [w for w in self.workers if w.alive]
        if len(self.workers) < n:
            self.start_workers(n - len(self.workers))

    def stop(self) -> None:
        """Every worker at once: teardown costs one worker's kill, not one per worker."""
        for worker in self.workers:
            worker.kill_nowait()
        for worker in self.workers:
            worker.proc.wait(10)
        self.workers = []

    def logs(self) -> str:
        return "\n".join(f"==== {w.name}\n{w.log()[-4000:]}" for w in self.workers)

    # ── runs ─────────────────────────────────────────────────────────────────

    def side_dir(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="side-", dir=self.workdir))
        return path

    def submit(self, flow_name: str, store: dict[str, Any] | None = None, **kw: Any) -> RunHandle:
        from pocoflow.registry import build_flow

        return client.submit(build_flow(flow_name), store or {}, settings=self.settings, **kw)

    def send_raw(self, body: Any) -> None:
        """Publish a step message body as is (a duplicate, a malformed one...)."""
        if isinstance(body, StepMessage):
            body = body.to_dict()
        self.app.send_task(TASK_NAME, args=[body], queue="pocoflow")


@contextlib.contextmanager
def _ledger(backend: str, request: pytest.FixtureRequest, workdir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{workdir / 'ledger.db'}"
        return
    from tests.conftest import fresh_postgres_database

    with fresh_postgres_database(request.getfixturevalue("database_url")) as url:
        yield url


@contextlib.contextmanager
def running_cluster(
    db_url: str,
    broker_url: str,
    request: pytest.FixtureRequest,
    workdir: Path,
    *,
    redis_url: str | None = None,
) -> Iterator[Cluster]:
    """A cluster with the test module's ``WORKERS`` (2) workers and ``WORKER_ENV``,
    every worker killed on the way out."""
    extra = getattr(request.module, "WORKER_ENV", {})
    cluster = Cluster(db_url, broker_url, workdir, extra, redis_url=redis_url)
    try:
        cluster.start_workers(getattr(request.module, "WORKERS", 2))
        yield cluster
    finally:
        cluster.stop()
        cluster.db.close()


def fresh_redis_db(redis_url: str) -> str:
    """A Redis database of its own for each cluster, emptied first."""
    import redis

    base = redis_url.rsplit("/", 1)[0]
    url = f"{base}/{next(_redis_dbs)}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Cluster]:
    """Two live workers on a fresh ledger of each backend, shared by a test module."""
    workdir = Path(tempfile.mkdtemp(prefix="pocoflow-dist-"))
    with (
        _ledger(request.param, request, workdir) as db_url,
        running_cluster(db_url, fresh_redis_db(redis_url), request, workdir) as cluster,
    ):
        yield cluster
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report carries the tail of every worker's log."""
    report = yield
    args = getattr(item, "funcargs", {})
    cluster = args.get("live") or args.get("cluster")
    if report.when == "call" and report.failed and isinstance(cluster, Cluster):
        report.sections.append(("worker logs", cluster.logs()))
        report.sections.append(("unfinished runs in the ledger", _unfinished_story(cluster)))
    return report


def _unfinished_story(cluster: Cluster) -> str:
    """Steps, attempts and events of the runs that did not finish: what a flaky failure
    needs to be understood from a CI log alone."""
    lines: list[str] = []
    try:
        for run in cluster.db.list_runs(limit=20):
            if run["status"] in ("completed", "failed", "cancelled"):
                continue
            lines.append(f"== run {run['run_id']} {run['status']} control={run.get('control')}")
            for step in range((run.get("total_steps") or 0) + 1):
                lines.append(f"  step {cluster.db.get_step(run['run_id'], step)}")
            lines += [f"  attempt {a}" for a in cluster.db.get_attempts(run["run_id"])]
            lines += [f"  event {e}" for e in cluster.db.get_events(run["run_id"])]
    except Exception as exc:  # the ledger itself may be the fault under test
        lines.append(f"(could not read the ledger: {exc})")
    return "\n".join(lines)


@pytest.fixture
def live(cluster: Cluster) -> Cluster:
    """The module's cluster with two live, unfrozen workers."""
    cluster.ensure_workers(2)
    return cluster


def local_result(flow_name: str, store: dict[str, Any]) -> dict[str, Any]:
    """What the same flow gives when run in this process, without a ledger."""
    from pocoflow.registry import build_flow

    return build_flow(flow_name).run(dict(store)).as_dict()


__all__ = ["Cluster", "flows", "fresh_redis_db", "local_result", "running_cluster"]
