"""A local run's end takes its limit waits out of a shared limiter, off its own thread:
a Redis that stopped answering must not hold wait()."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
import redis

from pocoflow import Flow, Node
from pocoflow.distributed.control import redis_client
from pocoflow.distributed.limiter import RedisLimiter
from pocoflow.limits import Limits, Rate, use_limiter

pytestmark = pytest.mark.ledger

#: How long the hung Redis keeps a caller waiting: far beyond any scheduling delay, so
#: the bound below tells a purge that waited for it from one that did not.
HUNG_S = 15.0


def test_wait_returns_soon_after_flow_end_even_if_redis_hangs(redis_url: str) -> None:
    key = f"k-{uuid.uuid4().hex}"
    client = redis_client(redis_url)
    shared = RedisLimiter(client, lease_s=5)
    assert shared.acquire(Limits(rate=Rate(1, 1.0)), key, "someone").go
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # accepts connections, never answers: a hung Redis
    hung = redis.Redis.from_url(
        f"redis://127.0.0.1:{hole.getsockname()[1]}/0",
        socket_timeout=HUNG_S,
        socket_connect_timeout=HUNG_S,
    )
    ended: list[float] = []

    class Call(Node):
        rate_limit = "1/s"

        def limit_key(self, prep_result: object) -> str:
            return key

        def exec(self, prep_result: object) -> None:
            shared.client = hung  # Redis stops answering once the call went

    previous = use_limiter(shared)
    try:
        built = Flow(Call(), flow_name="hung-redis")
        built.on("flow_end", lambda steps, store: ended.append(time.monotonic()))
        handle = built.run_background({})
        handle.wait(timeout=20)
        returned = time.monotonic()
    finally:
        use_limiter(previous)
        hole.close()
    assert handle.status == "completed"
    # A purge on the run's thread would have waited out the hung Redis's socket timeout.
    assert returned - ended[0] < HUNG_S / 3
