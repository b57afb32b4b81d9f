"""A real ``workers.app`` worker's consumer keeps one Redis client on its task channel
(``transport.KeepOneRedisClient``): a step's unacked index and ack build no client, and
after Redis restarts the consumer's new channel keeps one again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.distributed.conftest import Cluster
from tests.distributed.faults import restart_redis
from tests.helpers import wait_until
from tests.servers import RedisServer, start_redis

pytestmark = pytest.mark.distributed

WORKER_ENV = {"POCOFLOW_FLOWS": "tests.distributed.flows,tests.distributed.clientprobe"}
STEPS = 20  # the counter flow's


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with start_redis() as server:
        yield server


@pytest.fixture(scope="module")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def _probe(live: Cluster) -> dict[str, Any]:
    replies = live.app.control.broadcast("pf_redis_client", reply=True, timeout=3)
    assert replies, "no worker answered"
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
