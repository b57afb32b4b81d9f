"""A network partition with real workers (G1, G3): a worker cut off from Redis and the
ledger mid-step loses the step to another worker within a bound, and when its links heal
its late commit is refused: one checkpoint per step, the run's Store that of the winner.

Two orders of events, because different guards refuse the late commit in each: healed
while the winner still runs the step, only the fence (attempt and holder token on
``pf_steps``) stands between the late commit and the ledger; after the run finished,
the late commit meets the winner's checkpoint and successor row too.

The refusal is recorded on the run as a ``commit_refused`` event naming the late attempt
(the take-over already closed attempt 1's ``pf_attempts`` row as ``lost``).

PostgreSQL only, because a partition needs a network link to cut: the cut-off worker
reaches Redis and PostgreSQL through ``FaultProxy`` instances, the other worker directly.
An SQLite ledger is a file every worker opens on one host; no link to it can be cut,
only the process itself stopped, which ``test_faults.py`` does on both ledgers (a worker
frozen past its lease commits nothing).

The links are cut where a cut cannot stall the rest of the cluster for reasons of its
own, which this test is not about: Redis first; then PostgreSQL, once no Redis BRPOP of
the worker is pending (a message Redis hands to a pending read of a cut-off worker is
stuck in the cut, found only by the sweeper's queued-step backstop) and while none of
the worker's sessions is inside a transaction (a session cut between its UPDATE and its
COMMIT keeps its row locks on the server, so the take-over would wait until the server
drops the dead session).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from pocoflow.devcluster import WorkerProcess
from pocoflow.hooks import COMMIT_REFUSED
from pocoflow.runner import RunHandle
from tests.distributed import fault_flows  # noqa: F401  (registers the long flow here)
from tests.distributed.conftest import Cluster, _ledger, fresh_redis_db
from tests.distributed.faults import (
    FaultProxy,
    attempts_of,
    checkpoint_steps,
    open_attempt,
    start_worker,
    worker_env,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

FLOWS = "tests.distributed.fault_flows"
TIMEOUT_S = 30
STEP = 1  # hold and long flows: Increment (0) -> Hold or Long (1) -> Increment (2)
#: Partition -> the other worker starts the step again: the cut-off worker stops renewing
#: its 2 s lease and beating (taken for dead after 3 s), and the next sweep (0.5 s) takes
#: its step over; room left for a loaded 2-core box.
RERUN_BOUND_S = 10.0
#: Long enough that the cut (at most ~1 s after the step starts) lands mid-exec and that
#: the winner still runs when the loser's commit arrives (a few seconds after the cut).
LONG_S = 5.0


class Partitioned:
    """A cluster whose first worker reaches Redis and PostgreSQL only through proxies."""

    def __init__(self, cluster: Cluster, redis: FaultProxy, pg: FaultProxy) -> None:
        self.cluster, self.redis, self.pg = cluster, redis, pg
        env = worker_env(
            pg.url_for(cluster.settings.db_url),
            redis.url_for(cluster.settings.broker_url),
            flows=FLOWS,
        )
        self.cut = start_worker("cut", env, cluster.workdir)
        cluster.workers.append(self.cut)
        self.cut.wait_ready()

    def start_direct_worker(self) -> WorkerProcess:
        return self.cluster.start_workers(1)[0]

    def partition(self) -> None:
        """Cut both links (see the module docstring for where)."""
        assert self.redis.server_side_addresses() and self.pg.server_side_addresses()
        self.redis.partition()
        wait_until(lambda: not self._reads_pending(), TIMEOUT_S)  # brpop_timeout: 1 s
        wait_until(self._cut_ledger_between_transactions, TIMEOUT_S)

    def heal(self) -> None:
        self.redis.heal()
        self.pg.heal()

    def _reads_pending(self) -> bool:
        """Does Redis hold a blocking read (BRPOP) of the cut-off worker?"""
        import redis

        ours = self.redis.server_side_addresses()
        with redis.Redis.from_url(self.cluster.settings.broker_url) as client:
            return any(c["addr"] in ours and "b" in c["flags"] for c in client.client_list())

    def _cut_ledger_between_transactions(self) -> bool:
        import psycopg

        self.pg.partition()
        ours = self.pg.server_side_addresses()
        url = make_url(self.cluster.settings.db_url)
        dsn = f"host=127.0.0.1 port={url.port} user={url.username} dbname={url.database}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            states = conn.execute(
                "SELECT host(client_addr) || ':' || client_port, state FROM pg_stat_activity "
                "WHERE datname = current_database()"
            ).fetchall()
        if all(state == "idle" for addr, state in states if addr in ours):
            return True
        self.pg.heal()  # cut mid-transaction: let it finish and cut again
        return False


@pytest.fixture
def live(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Cluster]:
    """A fresh PostgreSQL ledger and Redis DB, no workers yet (named ``live`` so a failed
    test's report carries the workers' logs, see conftest)."""
    workdir = Path(tempfile.mkdtemp(prefix="pocoflow-partition-"))
    with _ledger("postgresql", request, workdir) as db_url:
        cluster = Cluster(db_url, fresh_redis_db(redis_url), workdir, {"POCOFLOW_FLOWS": FLOWS})
        try:
            yield cluster
        finally:
            cluster.stop()
            cluster.db.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def partitioned(live: Cluster) -> Iterator[Partitioned]:
    redis = FaultProxy(_port(live.settings.broker_url))
    pg = FaultProxy(_port(live.settings.db_url))
    try:
        yield Partitioned(live, redis, pg)
    finally:
        redis.close()
        pg.close()


def _port(url: str) -> int:
    port = make_url(url).port
    assert port is not None, f"{url} names no port"
    return port


def _attempt(live: Cluster, run_id: str, attempt: int) -> dict[str, Any] | None:
    return next((a for a in attempts_of(live.db, run_id, STEP) if a["attempt"] == attempt), None)


def _pid(attempt: dict[str, Any]) -> int:
    return int(str(attempt["worker"]).rsplit(":", 1)[1])


def _cut_mid_step(live: Cluster, partitioned: Partitioned, handle: RunHandle) -> WorkerProcess:
    """Once the cut-off worker (the only one so far) runs attempt 1 of the step, start a
    direct worker and cut the links; the direct worker must start attempt 2 in bound."""
    first = wait_until(lambda: _attempt(live, handle.run_id, 1), TIMEOUT_S)
    assert partitioned.cut.owns(_pid(first))
    direct = partitioned.start_direct_worker()
    partitioned.partition()
    cut_at = time.time()  # the ledger link is cut: no more lease renewals nor heartbeats
    rerun = wait_until(lambda: _attempt(live, handle.run_id, 2), RERUN_BOUND_S)
    assert rerun["started_at"] - cut_at < RERUN_BOUND_S, rerun["started_at"] - cut_at  # G3
    assert direct.owns(_pid(rerun))
    return direct


def _refused(partitioned: Partitioned, run_id: str, attempt: int) -> bool:
    """The ledger recorded the refusal of ``attempt``'s late commit (``executor._commit``)."""
    return any(
        e["event"] == COMMIT_REFUSED and e["step"] == STEP and e["attempt"] == attempt
        for e in partitioned.cluster.db.get_events(run_id)
    )


def test_a_late_commit_from_a_healed_partition_is_fenced_out_while_the_winner_runs(
    live: Cluster, partitioned: Partitioned
) -> None:
    first = {"count": 0, "long_s": LONG_S}
    handle = live.submit("long", first)
    _cut_mid_step(live, partitioned, handle)
    partitioned.heal()  # attempt 2 has LONG_S to go; attempt 1 finishes its exec first
    wait_until(
        lambda: (
            _refused(partitioned, handle.run_id, 1)
            or checkpoint_steps(live.db, handle.run_id) != [0]
        ),
        TIMEOUT_S,
    )
    assert checkpoint_steps(live.db, handle.run_id) == [0], "the loser's late commit landed"
    assert _refused(partitioned, handle.run_id, 1)
    running = open_attempt(live.db, handle.run_id, STEP)
    assert running is not None and running["attempt"] == 2  # only the fence refused it

    store = handle.wait(timeout=TIMEOUT_S)
    assert store.as_dict() == {**first, "count": 3, "long": LONG_S, "trail": ["before", "after"]}
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]  # G1: one per step
    outcomes = [(a["attempt"], a["outcome"]) for a in attempts_of(live.db, handle.run_id, STEP)]
    assert outcomes == [(1, "lost"), (2, "committed")]


def test_a_late_commit_after_the_run_finished_is_refused_and_changes_nothing(
    live: Cluster, partitioned: Partitioned
) -> None:
    side = live.side_dir()
    first = {"count": 0, "side_dir": str(side), "ignore_cancel": True}
    handle = live.submit("hold", first)  # attempt 1 of Hold waits for its release file
    _cut_mid_step(live, partitioned, handle)
    store = handle.wait(timeout=TIMEOUT_S)
    expected = {**first, "count": 2, "trail": ["before", "after"]}
    assert store.as_dict() == {**expected, "hold": "passed", "hold_attempt": 2}
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]  # G1: one per step

    # The cut-off exec finishes now, still cut off or just healed: either way its commit
    # reaches the ledger after the winner's, and is refused.
    (side / f"{handle.run_id}.release").write_text("go")
    partitioned.heal()
    wait_until(lambda: _refused(partitioned, handle.run_id, 1), TIMEOUT_S)
    outcomes = [(a["attempt"], a["outcome"]) for a in attempts_of(live.db, handle.run_id, STEP)]
    assert outcomes == [(1, "lost"), (2, "committed")]
    assert open_attempt(live.db, handle.run_id, STEP) is None
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]
    assert handle.store().as_dict() == store.as_dict()
    run = live.db.get_run(handle.run_id)
    assert run["status"] == "completed" and run["total_steps"] == 3
