"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu's Redis channel builds a ``redis.Redis`` for every command it sends outside its
event loop (``Channel._create_client``): each publish, and in a worker's main process
the two bookkeeping writes of every message it receives (the unacked index, then its
ack). With redis-py 8 a new client costs 100-160 us of CPU (it rebuilds its table of
response callbacks, redis-py 3624), which made it the largest single cost of a message
in the worker's main process. The client holds nothing but its connection pool, so one
client per pool serves every command and thread; a channel's pool is replaced after a
fork, and the client with it.

``create_app`` selects this transport for ``redis://`` and ``rediss://`` brokers (the
``broker_transport`` setting); everything else is kombu's.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

#: The ``broker_transport`` value that selects this module's transport.
TRANSPORT = "pocoflow.distributed.transport:Transport"
#: Broker URL schemes this transport serves (kombu's ``redis`` transport's own).
SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    _kept_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        kept = self._kept_client
        if kept is None or kept.connection_pool is not self.pool:
            kept = self._kept_client = super()._create_client()
        return kept


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
