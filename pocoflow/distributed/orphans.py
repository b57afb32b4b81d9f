"""Step and item messages a dead worker took from a Redis broker and never started (G3).

Why: with early ack, a Celery worker acknowledges a message only when its pool starts
it. A message it received but had not started (its prefetch) stays in the broker's
``unacked`` hash, which Redis gives back only after the visibility timeout (an hour).
The liveness heartbeat records such messages in the ledger once a worker has held one
across two looks (``distributed.liveness``), so a worker killed within about 0.4 s of
receiving a message took it with it unrecorded: the ledger saw it sent, never claimed,
and only the queue backstop (a minute, ten while the queues are busy) sent it again.

The broker itself knows better: an entry of ``unacked`` delivered more than a few
heartbeats ago (``older_than_s``) whose step the ledger still has queued under the same
attempt, sent and recorded as held by no worker, was taken by a process that is gone (a
live one records what it holds within a beat, or starts it). The sweeper turns the step
back into an unsent outbox row (a compare-and-set on the ``sent_at`` it read: one
sweeper wins), removes the entry, and sends the step again under its attempt; a crash or
a failed publish in between leaves an outbox row, which the unsent pass sends. The claim
lets one copy run (G1), so a live worker that was only slow to record costs a duplicate
delivery, never a second run.

What a message says is only used to find its step: the ledger decides whether it is
still waiting and what is sent. Only Redis brokers (kombu's default key names): a
RabbitMQ broker requeues a dead consumer's unacked messages once its connection is
known dead. Delivery times are the receiving host's clock, so a sweeper also waits until
it has itself seen an entry for half of ``older_than_s`` (a host whose clock runs behind
does not make its fresh reservations look old); a host whose clock runs ahead delays its
own orphans by as much.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pocoflow.distributed.celery_app import ITEM_TASK_NAME, TASK_NAME
from pocoflow.distributed.message import ItemMessage, MalformedMessage, StepMessage

if TYPE_CHECKING:
    import redis

#: kombu's Redis transport keys (``unacked_key``, ``unacked_index_key``); PocoFlow's
#: Celery app does not change them.
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
#: Entries read per sweep, oldest first (tags and delivery times only): what a busy cluster
#: holds unacknowledged at once, countdowns and late acks included. Past it, an orphan
#: waits for the queue backstop.
SCAN = 2000
#: Payloads decoded per sweep, of the entries old enough and not known to be held.
PAGE = 200


@dataclass(frozen=True)
class Orphan:
    """An unacknowledged delivery of a step or item message (``tag``: kombu's)."""

    tag: bytes
    message: StepMessage | ItemMessage


def unacked(client: redis.Redis) -> list[tuple[bytes, float]]:
    """``(tag, delivery time)`` of the oldest ``SCAN`` unacknowledged deliveries, oldest
    first (the delivery time is the receiving host's clock)."""
    entries: list[tuple[bytes, float]] = client.zrange(  # type: ignore[assignment]
        UNACKED_INDEX, 0, SCAN - 1, withscores=True
    )
    return [(tag, float(delivered)) for tag, delivered in entries]


def decode(client: redis.Redis, tags: list[bytes]) -> dict[bytes, StepMessage | ItemMessage | None]:
    """The step or item message of each entry ``tags`` names; None for another task's,
    an unreadable or a vanished one."""
    if not tags:
        return {}
    payloads = client.hmget(UNACKED, tags)
    return {tag: _decode(payload) for tag, payload in zip(tags, payloads, strict=True)}  # type: ignore[arg-type]


def take(client: redis.Redis, tag: bytes) -> bool:
    """Remove the entry ``tag`` from the broker's unacknowledged messages; True for the
    one caller that removed it (it owns the orphan). A live worker that acks it later
    finds nothing to remove, as kombu allows."""
    with client.pipeline() as pipe:
        pipe.hdel(UNACKED, tag)
        pipe.zrem(UNACKED_INDEX, tag)
        removed, _ = pipe.execute()
    return bool(removed)


def _decode(payload: Any) -> StepMessage | ItemMessage | None:
    """The step or item message of a kombu ``unacked`` entry (``[message, exchange,
    routing_key]``, the message as the broker held it), or None."""
    if payload is None:
        return None
    try:
        raw = json.loads(payload)[0]
        task = raw["headers"]["task"]
        if task not in (TASK_NAME, ITEM_TASK_NAME):
            return None
        body = raw["body"]
        if raw.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        if task == ITEM_TASK_NAME:
            return ItemMessage.from_dict(args[0])
        return StepMessage.from_dict(args[0])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, MalformedMessage):
        return None
