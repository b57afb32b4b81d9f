"""The core distributed cases with RabbitMQ as the broker (``amqp://``) while Redis still
holds the control flags: a run completes as it does locally, a kill -9 of the worker
running a step (and holding another prefetched) is recovered promptly, and a cancel
stops the run before its next node.

The cases are the Redis suite's own test functions, imported here so pytest runs them
again with this module's ``cluster`` fixture (a contract written once, run per broker).
The broker is ``POCOFLOW_TEST_AMQP_URL`` or a private ``rabbitmq-server`` started here;
without either these tests skip and say so (see ``amqp_url`` in tests/conftest.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.distributed import test_faults, test_protocol, test_recovery
from tests.distributed.conftest import Cluster, fresh_redis_db, running_cluster
from tests.distributed.faults import FLOWS_MODULE

pytestmark = pytest.mark.distributed

# What the imported cases need: test_recovery's single worker with a 30 s lease (only
# the heartbeat, or RabbitMQ's own redelivery of a dead consumer's messages, can explain
# a prompt re-run), and the flows of both modules.
WORKERS = test_recovery.WORKERS
WORKER_ENV = {
    **test_recovery.WORKER_ENV,
    "POCOFLOW_FLOWS": f"{FLOWS_MODULE},tests.distributed.recovery_flows",
}

# In this order (pytest runs a module's tests in the order they were bound): the kill
# case first, while the module has test_recovery's single worker to keep busy.
test_kill_9_reruns_the_running_and_the_prefetched_step_promptly = (
    test_recovery.test_kill_9_reruns_the_running_and_the_prefetched_step_promptly
)
test_chain_across_workers_equals_local_run = (
    test_protocol.test_chain_across_workers_equals_local_run
)
test_cancel_stops_the_run_before_its_next_node = (
    test_faults.test_cancel_stops_the_run_before_its_next_node
)


def _purge(amqp_url: str) -> None:
    """An external RabbitMQ may hold step messages of an earlier session: drop them."""
    from kombu import Connection

    from pocoflow.distributed.celery_app import DEFAULT_QUEUE

    with Connection(amqp_url, connect_timeout=5) as conn:
        try:
            conn.channel().queue_purge(DEFAULT_QUEUE)
        except Exception:  # no such queue yet: nothing to drop
            pass


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, amqp_url: str, redis_url: str) -> Iterator[Cluster]:
    """A SQLite ledger, RabbitMQ for the messages, a Redis database for the flags."""
    _purge(amqp_url)
    workdir = Path(tempfile.mkdtemp(prefix="pocoflow-amqp-"))
    with running_cluster(
        f"sqlite:///{workdir / 'ledger.db'}",
        amqp_url,
        request,
        workdir,
        redis_url=fresh_redis_db(redis_url),
    ) as cluster:
        yield cluster
    shutil.rmtree(workdir, ignore_errors=True)


def test_the_workers_use_rabbitmq_for_steps_and_redis_for_flags(cluster: Cluster) -> None:
    cluster.ensure_workers(1)
    assert cluster.env["POCOFLOW_BROKER_URL"].startswith("amqp://")
    assert cluster.env["POCOFLOW_REDIS_URL"].startswith("redis://")
    assert "transport:   amqp://" in cluster.workers[0].log()


def test_the_sweeper_sees_a_rabbitmq_backlog(amqp_url: str) -> None:
    """As with Redis, the sweeper reads how many messages wait in the step queues: a step
    that waited 60 s behind a long RabbitMQ queue is held back (up to REQUEUE_CAP_S), not
    sent again every 60 s on top of the backlog. A RabbitMQ broker never reports a loss
    (its durable queues keep the messages)."""
    import uuid

    from kombu import Connection, Exchange, Queue

    from pocoflow.distributed.sweeper import RabbitQueues, broker_sentinel

    view = broker_sentinel(amqp_url)
    assert isinstance(view, RabbitQueues)
    name = f"pf-backlog-{uuid.uuid4().hex[:8]}"
    assert not view.busy([name])  # no such queue: nothing waits there
    assert not view.lost(lambda: [name])
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name, durable=False)
    with Connection(amqp_url, connect_timeout=5) as conn:
        producer = conn.Producer()
        producer.publish({"x": 1}, exchange=queue.exchange, routing_key=name, declare=[queue])
        try:
            assert view.busy([name])  # a message waits
            assert view.busy(["pf-missing-queue", name])  # a missing one does not hide it
            queue.bind(conn.default_channel).purge()
            assert not view.busy([name])
        finally:
            queue.bind(conn.default_channel).delete()
            view.close()
