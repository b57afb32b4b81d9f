"""A fan-out's item messages reach a real Redis broker in pipelined batches: every one
of them, intact and in order, in far fewer round trips than messages (one each before)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis

from pocoflow.distributed.celery_app import ITEM_TASK_NAME, create_app
from pocoflow.distributed.message import ItemMessage
from pocoflow.distributed.publish import Publisher
from pocoflow.settings import Settings

pytestmark = pytest.mark.distributed

ITEMS = 300


class MarkedItems:
    """The ledger's side of a publish: which item keys were marked sent."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, int, int, int]] = []

    def mark_items_sent(self, keys: list[tuple[str, int, int, int]]) -> None:
        self.keys += keys


def _reads(client: Any) -> int:
    return int(client.info("stats")["total_reads_processed"])


def test_item_messages_are_published_in_pipelined_batches(redis_url: str) -> None:
    queue = f"pf-batch-{uuid.uuid4().hex}"  # no worker consumes it
    app = create_app(Settings(db_url="sqlite:///unused.db", broker_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    ledger = MarkedItems()
    publisher = Publisher(app, ledger)  # type: ignore[arg-type]
    messages = [ItemMessage("run-b", "f", 1, "m", idx, 1, 1) for idx in range(ITEMS)]
    publisher._held_producer()  # connect first: the count below is the publish alone
    before = _reads(client)
    assert publisher.send_items(messages, queue=queue) == ITEMS
    reads = _reads(client) - before
    try:
        # The server read each batch in a few socket reads, not one read per message
        # (the slack is for the other clients of a shared test Redis and our INFO).
        assert reads < ITEMS // 3, f"{reads} socket reads for {ITEMS} messages"
        bodies = client.lrange(queue, 0, -1)
        sent = [json.loads(_body(b))[0][0] for b in bodies]  # protocol 2: [args, kwargs, ...]
        # Kombu's Redis transport pushes on the list's head (LPUSH) and a worker pops its
        # tail (BRPOP): the list read head first is the publish order reversed.
        assert [m["idx"] for m in reversed(sent)] == list(range(ITEMS))
        assert {json.loads(b)["headers"]["task"] for b in bodies} == {ITEM_TASK_NAME}
        assert [k[2] for k in ledger.keys] == list(range(ITEMS))  # marked in order
    finally:
        client.delete(queue)
        client.close()


def _body(raw: bytes) -> str:
    import base64

    return base64.b64decode(json.loads(raw)["body"]).decode()
