"""Redis restarted mid-run (every queued message and flag lost: no persistence): the
workers reconnect, the sweeper re-sends what was lost, the run completes (G3). And a
worker's consumer keeps one Redis client on its task channel
(``transport.KeepOneRedisClient``), again on its new channel after the restart."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.distributed.conftest import Cluster
from tests.distributed.faults import checkpoint_steps, restart_redis
from tests.distributed.test_map import WORKER_ENV as MAP_WORKER_ENV, execs, finish
from tests.helpers import wait_until
from tests.servers import RedisServer, start_redis

pytestmark = pytest.mark.distributed

# The map flows too, and a probe of the worker's Redis clients (``clientprobe``).
WORKER_ENV = {"POCOFLOW_FLOWS": MAP_WORKER_ENV["POCOFLOW_FLOWS"] + ",tests.distributed.clientprobe"}
STEPS = 20  # the counter flow's


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A Redis of this module's own, because the test stops it."""
    with start_redis() as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def test_a_redis_restart_mid_run_loses_no_step(live: Cluster, redis_server: RedisServer) -> None:
    handle = live.submit("slow_chain", {"slow_s": 0.25})
    wait_until(lambda: live.db.count_committed(handle.run_id) >= 2, 30)
    restart_redis(redis_server, down_s=1.0)
    store = handle.wait(timeout=60)
    assert store["count"] == 8 and handle.status == "completed"
    assert checkpoint_steps(live.db, handle.run_id) == list(range(8))
    # The workers are connected again and serve a new run.
    assert live.submit("counter", {"count": 0}).wait(timeout=30)["count"] == 20


def test_a_cancel_while_redis_is_down_is_honoured(live: Cluster, redis_server: RedisServer) -> None:
    """The ledger is the guard's truth: a cancel recorded while Redis (broker and flags)
    is down stops the run at its next node once the workers are back."""
    handle = live.submit("slow_chain", {"slow_s": 0.25})
    wait_until(lambda: live.db.count_committed(handle.run_id) >= 1, 30)
    redis_server.stop()
    try:
        handle.cancel()  # the Redis flag cannot be set: the ledger request must do
        assert live.db.get_run(handle.run_id)["status"] == "cancelled"
    finally:
        redis_server.start()
    handle.wait(timeout=60)
    # The step running at the cancel may still commit; wait until no attempt is open.
    wait_until(lambda: all(a["ended_at"] for a in live.db.get_attempts(handle.run_id)), timeout=30)
    committed = live.db.count_committed(handle.run_id)
    # Nothing past the step that was running at the cancel commits, even after the
    # sweeper re-sends what Redis lost.
    assert live.submit("counter", {"count": 0}).wait(timeout=30)["count"] == 20
    assert live.db.count_committed(handle.run_id) == committed < 8
    assert live.db.get_run(handle.run_id)["status"] == "cancelled"


def test_a_redis_restart_mid_fan_out_loses_no_item(
    live: Cluster, redis_server: RedisServer
) -> None:
    """Every queued item message lost: the sweeper sends the lost items again and the
    map completes, each item done once in the ledger (G3 for items)."""
    side = live.side_dir()
    handle = live.submit("map_square", {"n": 30, "sleep": 0.1, "side_dir": str(side)})
    wait_until(lambda: len(execs(side, handle.run_id)) >= 3, 30)
    restart_redis(redis_server, down_s=0.5)
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(30)] and result["finished"] is True
    rows = live.db.get_items(handle.run_id, 0)
    assert [r["status"] for r in rows] == ["done"] * 30
    assert {i for i, _, _ in execs(side, handle.run_id)} == set(range(30))


def _probe(live: Cluster) -> dict[str, Any]:
    # ``limit``: back as soon as every worker answered, not after the whole timeout.
    replies = live.app.control.broadcast(
        "pf_redis_client", reply=True, timeout=3, limit=len(live.workers)
    )
    # Each worker once: a worker answering twice (two consumers) would fill the limit.
    answered = sorted(name for reply in replies for name in reply)
    assert len(set(answered)) == len(answered) == len(live.workers), answered
    seen = [next(iter(reply.values())) for reply in replies]
    return {
        "kept": all(s["kept"] and s["is_default"] for s in seen),
        "channels": {s["channel"] for s in seen},
        "built": sum(s["built"] for s in seen),
        "workers": len(seen),
    }


def _answers(live: Cluster) -> dict[str, Any] | None:
    try:
        return _probe(live)
    except Exception:  # Redis is still coming back
        return None


def _run_counter(live: Cluster) -> None:
    assert live.submit("counter", {"count": 0}).wait(timeout=60)["count"] == STEPS


def test_a_worker_consumer_keeps_one_redis_client_across_a_redis_restart(
    live: Cluster, redis_server: RedisServer
) -> None:
    _run_counter(live)
    first = _probe(live)
    assert first["kept"], first
    _run_counter(live)
    # Two clients a message without the step: 40 for the run's 20 steps.
    assert _probe(live)["built"] - first["built"] < STEPS
    restart_redis(redis_server, down_s=1.0)
    wait_until(lambda: _answers(live), 60)
    _run_counter(live)
    before = _probe(live)
    _run_counter(live)
    after = _probe(live)
    assert after["kept"] and not after["channels"] & first["channels"], (first, after)
    assert after["built"] - before["built"] < STEPS
