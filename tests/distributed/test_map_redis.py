"""Redis restarted mid fan-out (every queued item message lost: no persistence): the
sweeper sends the lost items again and the map completes, each item done once in the
ledger (G3 for items)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.distributed.conftest import Cluster
from tests.distributed.faults import restart_redis
from tests.distributed.test_map import WORKER_ENV as MAP_WORKER_ENV, execs, finish
from tests.helpers import wait_until
from tests.servers import RedisServer, start_redis

pytestmark = pytest.mark.distributed

WORKER_ENV = MAP_WORKER_ENV


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A Redis of this module's own, because the test stops it."""
    with start_redis() as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def test_a_redis_restart_mid_fan_out_loses_no_item(
    live: Cluster, redis_server: RedisServer
) -> None:
    side = live.side_dir()
    handle = live.submit("map_square", {"n": 30, "sleep": 0.1, "side_dir": str(side)})
    wait_until(lambda: len(execs(side, handle.run_id)) >= 3, 30)
    restart_redis(redis_server, down_s=0.5)
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(30)] and result["finished"] is True
    rows = live.db.get_items(handle.run_id, 0)
    assert [r["status"] for r in rows] == ["done"] * 30
    assert {i for i, _, _ in execs(side, handle.run_id)} == set(range(30))
