"""Step and item messages a dead worker took from a Redis broker and never started (G3).

Why: with early ack, a Celery worker acknowledges a message only when its pool starts
it. A message it received but had not started (its prefetch) stays in the broker's
``unacked`` hash, which Redis gives back only after the visibility timeout (an hour).
The liveness heartbeat records such messages in the ledger once a worker has held one
across two looks (``distributed.liveness``), so a worker killed within about 0.4 s of
receiving a message took it with it unrecorded: the ledger saw it sent, never claimed,
and only the queue backstop (a minute, ten while the queues are busy) sent it again.

The broker itself knows better: an entry of ``unacked`` older than a few heartbeats
(``older_than_s``) whose step the ledger still has queued under the same attempt, and
that no live worker recorded as held, was taken by a process that is gone (a live one
records what it holds within a beat, or starts it). The sweeper removes the entry (the
sweeper whose ``HDEL`` removes it owns it, so one sweeper re-sends) and sends the step
again from the ledger under its attempt; the claim lets one copy run (G1), so a live
worker that was only slow to record costs a duplicate delivery, never a second run.

What a message says is only used to find its step: the ledger decides whether it is
still waiting and what is sent. Only Redis brokers (kombu's default key names): a
RabbitMQ broker requeues a dead consumer's unacked messages as soon as its connection
drops. Scores in ``unacked_index`` are the receiving host's clock: a host whose clock
runs behind makes its messages look older, which costs at most that duplicate.
"""

from __future__ import annotations

import base64
import json
import time
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
#: Entries looked at per sweep, oldest first.
PAGE = 200


@dataclass(frozen=True)
class Orphan:
    """An unacknowledged delivery of a step or item message (``tag``: kombu's)."""

    tag: bytes
    message: StepMessage | ItemMessage


def unacked(client: redis.Redis, older_than_s: float, *, now: float | None = None) -> list[Orphan]:
    """Step and item messages received more than ``older_than_s`` ago and still not
    acknowledged, oldest first (other tasks' and unreadable entries are passed over)."""
    cutoff = (time.time() if now is None else now) - older_than_s
    tags: list[bytes] = client.zrangebyscore(UNACKED_INDEX, "-inf", cutoff, start=0, num=PAGE)  # type: ignore[assignment]
    if not tags:
        return []
    found = []
    for tag, payload in zip(tags, client.hmget(UNACKED, tags), strict=True):
        message = _decode(payload)
        if message is not None:
            found.append(Orphan(tag, message))
    return found


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
