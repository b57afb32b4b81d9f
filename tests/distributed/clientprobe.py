"""A flows module for one test's workers (``test_redis_restart``): counts the
``redis.Redis`` clients built in the worker process and reports, over remote control,
whether the consumer's task channel keeps one (``KeepOneRedisClient``)."""

from __future__ import annotations

import os
from typing import Any

import redis
from celery.worker.control import inspect_command

BUILT = [0]
_init = redis.Redis.__init__


def _counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
    BUILT[0] += 1
    _init(self, *args, **kwargs)


redis.Redis.__init__ = _counting_init  # type: ignore[method-assign]


@inspect_command()  # type: ignore[misc]
def pf_redis_client(state: Any) -> dict[str, Any]:
    channel = state.consumer.task_consumer.channel
    return {
        "kept": "_create_client" in vars(channel),
        "channel": id(channel),
        "is_default": state.consumer.connection.default_channel is channel,
        "built": BUILT[0],
        "pid": os.getpid(),
    }
