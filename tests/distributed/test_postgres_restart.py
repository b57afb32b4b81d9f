"""PostgreSQL stopped and started again mid-run, under real workers: every connection of
every worker breaks; the steps in flight lose their commits or retry them, the sweeper
repairs what was lost, and every run ends with the Store of an uninterrupted run, each
step committed once (G1, G3)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.distributed.conftest import Cluster, _ledger, fresh_redis_db, local_result
from tests.distributed.faults import attempts_of, checkpoint_steps
from tests.helpers import wait_until
from tests.servers import PostgresServer, start_postgres

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this module's own, because the test stops it."""
    with start_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def database_url(postgres: PostgresServer) -> str:
    return postgres.url


@pytest.fixture(scope="module", params=["postgresql"])
def cluster(
    request: pytest.FixtureRequest, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """As conftest's, on the PostgreSQL ledger only (the one that can restart)."""
    workdir = Path(tmp_path_factory.mktemp("pg-restart"))
    with _ledger(request.param, request, workdir) as db_url:
        cluster = Cluster(db_url, fresh_redis_db(redis_url), workdir, {})
        try:
            cluster.start_workers(2)
            yield cluster
        finally:
            cluster.stop()
            cluster.db.close()


def test_a_postgres_restart_mid_run_leaves_every_run_exact(
    live: Cluster, postgres: PostgresServer
) -> None:
    handles = [live.submit("slow_chain", {"slow_s": 0.2}) for _ in range(2)]
    handles.append(live.submit("counter", {"count": 0}))
    wait_until(lambda: live.db.count_committed(handles[0].run_id) >= 2, TIMEOUT_S)
    postgres.stop()
    postgres.start()  # same port and data; every open connection is gone
    for handle in handles:
        store = handle.wait(timeout=TIMEOUT_S)
        flow = handle.run_id.rsplit("-", 1)[0]
        start = {"slow_s": 0.2} if flow == "slow_chain" else {"count": 0}
        assert store.as_dict() == local_result(flow, start), handle.run_id
        steps = 8 if flow == "slow_chain" else 20
        assert checkpoint_steps(live.db, handle.run_id) == list(range(steps))
        for step in range(steps):
            committed = [
                a for a in attempts_of(live.db, handle.run_id, step) if a["outcome"] == "committed"
            ]
            assert len(committed) == 1, (handle.run_id, step)
    # No run was created twice, and the workers serve a new run.
    assert len(live.db.list_runs()) == len(handles)
    assert live.submit("counter", {"count": 0}).wait(timeout=TIMEOUT_S)["count"] == 20


#: Far below the 60 s queue backstop (sweeper.REQUEUE_AFTER_S) that would otherwise be the
#: only thing to find a message consumed while the ledger was down.
REDELIVERED_WITHIN_S = 20.0


def test_a_step_message_consumed_while_postgres_is_down_is_delivered_again(
    live: Cluster, postgres: PostgresServer
) -> None:
    """Early ack takes the message off the broker before the claim; with the ledger down
    the claim fails and nothing in the ledger knows of that delivery. The worker sends the
    message back to its queue with a countdown, so the step runs once PostgreSQL is back."""
    import redis
    from sqlalchemy import text

    from pocoflow.distributed.message import StepMessage
    from pocoflow.distributed.sweeper import BrokerSentinel

    # A run whose first message waits in a queue no worker reads, so the test can hand
    # the workers a copy of it exactly while PostgreSQL is down.
    handle = live.submit("counter", {"count": 0}, queue="nobody-reads-this")
    with live.db._ledger.engine.begin() as conn:  # its successors go to the workers' queue
        conn.execute(
            text("UPDATE pf_runs SET queue = NULL WHERE run_id = :r"), {"r": handle.run_id}
        )
    row = live.db.get_step(handle.run_id, 0)
    # The sweepers have looked at the broker once (else their first look at an empty
    # queue could count as a broker loss and re-send the step, hiding what is tested).
    broker = redis.Redis.from_url(live.settings.broker_url)
    wait_until(lambda: broker.exists(BrokerSentinel.KEY), TIMEOUT_S)
    message = StepMessage(handle.run_id, "counter", 0, row["node_id"], row["attempt"])
    live.db.close()  # no pooled connection to find broken later
    postgres.stop()
    try:
        live.send_raw(message)
        wait_until(
            lambda: any(f"Step 0 of run {handle.run_id}" in w.log() for w in live.workers),
            TIMEOUT_S,
        )
    finally:
        postgres.start()
    store = handle.wait(timeout=REDELIVERED_WITHIN_S)
    assert store.as_dict() == local_result("counter", {"count": 0})
    assert checkpoint_steps(live.db, handle.run_id) == list(range(20))
    logs = "".join(w.log() for w in live.workers)
    assert f"Step 0 of run {handle.run_id}: the ledger is unreachable before the claim" in logs
