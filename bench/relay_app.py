"""A raw Celery relay: the floor a distributed step cannot beat.

Task ``bench.relay(n, key)`` sends itself with ``n - 1`` until 0, then sets ``key`` in
Redis: 100 tasks one after another through the broker, each doing nothing else. Same
broker, same JSON, same prefetch as PocoFlow's app, so the difference is our step.
"""

from __future__ import annotations

import time

from pocoflow.distributed.celery_app import create_app
from pocoflow.settings import Settings

settings = Settings.from_env()
app = create_app(settings)
app.conf.task_routes = {"bench.relay": {"queue": "relay"}}


@app.task(name="bench.relay", ignore_result=True)
def relay(n: int, key: str) -> None:
    if n > 0:
        relay.apply_async(args=[n - 1, key], queue="relay")
        return
    import redis

    redis.Redis.from_url(settings.broker_url).set(key, repr(time.time()))
