"""``self.item_index`` on workers (issue 7): each map item's exec, run as its own task on
a ``--pool threads`` worker (items side by side on threads) or as an async exec, reads
its own position in prep's list, and builds the idempotency key ``run_id/step/item_index``,
the same on every attempt. SQLite and PostgreSQL ledgers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.distributed import index_flows
from tests.distributed.conftest import Cluster
from tests.distributed.faults import start_worker
from tests.distributed.index_flows import FLAKY, ITEMS

pytestmark = pytest.mark.distributed

WORKERS = 0  # the module's one worker is the threads worker below
WORKER_ENV = {"POCOFLOW_FLOWS": "tests.distributed.index_flows"}
TIMEOUT_S = 90


@pytest.fixture(scope="module")
def threaded(cluster: Cluster) -> Iterator[Cluster]:
    worker = start_worker("threads", cluster.env, cluster.workdir, concurrency=8, pool="threads")
    cluster.workers.append(worker)  # the cluster's teardown kills it
    worker.wait_ready()
    yield cluster


@pytest.mark.parametrize("flow_name", ["item_index", "item_index_async"])
def test_each_item_on_workers_reads_its_own_index(threaded: Cluster, flow_name: str) -> None:
    handle = threaded.submit(flow_name, {})
    results = handle.wait(timeout=TIMEOUT_S)["results"]
    # Read before and after the other items ran meanwhile, checked here: an assert in
    # exec would only cost a try, which the retry policy (2 tries) would absorb.
    assert [tuple(r[:3]) for r in results] == [(f"doc-{i}", i, i) for i in range(ITEMS)]
    assert [r[3] for r in results] == [f"{handle.run_id}/0/{i}" for i in range(ITEMS)]
    # Each item ran once, but the flaky one (twice): no failed try was absorbed, and the
    # attempt each exec saw is the ledger's.
    attempts = {row["idx"]: row["attempt"] for row in threaded.db.get_items(handle.run_id, 0)}
    flaky = FLAKY if flow_name == "item_index" else None
    assert attempts == {i: 2 if i == flaky else 1 for i in range(ITEMS)}
    assert [r[4] for r in results] == [attempts[i] for i in range(ITEMS)]


assert index_flows.ITEMS  # the module the workers import, imported here too
