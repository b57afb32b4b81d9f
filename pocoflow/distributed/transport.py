"""One Redis client per kombu channel instead of one per command.

kombu's Redis channel builds a ``redis.Redis`` for every command it sends outside its
event loop (``Channel._create_client``): each publish, and in a worker's main process
the two bookkeeping writes of every message it receives (the unacked index, then its
ack). With redis-py 8 a new client costs 100-160 us of CPU (it rebuilds its table of
response callbacks, redis-py 3624): the largest single cost of a message in the worker's
main process. The client holds nothing but its connection pool, so one client per pool
serves every command and thread; a channel's pool is replaced after a fork, and the
client with it.

Applied to the channels PocoFlow owns, not to kombu's transport: the publisher's
producers (``publish``) and the task consumer of a PocoFlow worker (``KeepOneRedisClient``,
a consumer bootstep that ``workers.app`` adds). A transport of our own (Celery's
``broker_transport``) would also have changed what kombu and Flower read from the
transport's name: TLS for ``rediss://`` URLs, and the broker URL that Flower's broker
page parses.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from kombu.transport import redis as kombu_redis

from pocoflow.logging import get_logger

_log = get_logger("distributed.transport")


def keep_one_client(channel: Any) -> None:
    """Have kombu's Redis ``channel`` reuse one client while its pool lasts; any other
    channel (another broker) is left alone. Idempotent."""
    if not isinstance(channel, kombu_redis.Channel) or "_create_client" in vars(channel):
        return
    create = channel._create_client
    kept: list[Any] = []

    def reuse(asynchronous: bool = False) -> Any:
        if asynchronous:
            return create(asynchronous=True)
        if not kept or kept[0].connection_pool is not channel.pool:
            kept[:] = [create()]
        return kept[0]

    channel._create_client = reuse  # type: ignore[method-assign]


class KeepOneRedisClient(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker consumer step: its task channel keeps one Redis client (``keep_one_client``).
    Started again with the consumer after a lost connection, on the new channel."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, consumer: Any) -> None:
        task_consumer = getattr(consumer, "task_consumer", None)
        if task_consumer is None:  # Celery changed its consumer: say so, run as before
            _log.warning("No task consumer at start: its Redis channel builds a client a command")
            return
        keep_one_client(task_consumer.channel)
