"""A step message published without ``send_task`` (``Publisher._publish_plainly``) is the
message ``send_task`` sends, on a real Redis broker; a process whose code listens to the
publish signals keeps ``send_task``; the kombu channel reuses one Redis client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.signals import before_task_publish
from kombu.transport import redis as kombu_redis

from pocoflow.distributed import transport
from pocoflow.distributed.celery_app import PUBLISH_RETRY_POLICY, TASK_NAME, create_app
from pocoflow.distributed.message import StepMessage
from pocoflow.distributed.publish import Publisher, task_labels
from pocoflow.settings import Settings

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGE = StepMessage("run-p", "article", 3, "draft", 2, try_number=2)
#: What differs between two publishes of one message: its ids and its clock.
PER_PUBLISH = {"headers.id", "headers.root_id", "headers.eta", "properties.correlation_id",
               "properties.delivery_tag", "properties.argsrepr", "properties.kwargsrepr"}  # fmt: skip


@pytest.fixture
def broker(redis_url: str) -> Iterator[tuple[Any, redis.Redis, str]]:
    queue = f"pf-plain-{uuid.uuid4().hex}"  # no worker consumes it
    app = create_app(Settings(db_url="sqlite:///unused.db", broker_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    try:
        yield app, client, queue
    finally:
        client.delete(queue)
        client.close()


def _flat(envelope: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in envelope.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_a_plain_publish_sends_what_send_task_sends(broker: tuple[Any, Any, str]) -> None:
    app, client, queue = broker
    publisher = Publisher(app, db=None)  # type: ignore[arg-type]
    task_id = publisher._send_task(MESSAGE, queue, 2.5, publisher._held_producer())
    app.send_task(TASK_NAME, args=[MESSAGE.to_dict()], queue=queue, countdown=2.5,
                  retry=True, retry_policy=PUBLISH_RETRY_POLICY, **task_labels(MESSAGE))  # fmt: skip
    # LPUSH: the head of the list is the last message published.
    theirs, ours = (_flat(json.loads(raw)) for raw in client.lrange(queue, 0, -1))
    assert ours["headers.id"] == task_id and ours["headers.shadow"] == "article.draft"
    assert ours["headers.eta"] is not None  # the countdown went out as an ETA
    differ = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert differ <= PER_PUBLISH, {k: (ours.get(k), theirs.get(k)) for k in differ - PER_PUBLISH}


def test_a_publish_signal_receiver_keeps_send_task(broker: tuple[Any, Any, str]) -> None:
    """Tracing libraries add their headers in ``before_task_publish``: with a receiver
    connected, the message goes through ``send_task`` and the receiver sees it."""
    app, client, queue = broker
    seen: list[str] = []

    def receiver(sender: str | None = None, headers: Any = None, **_: Any) -> None:
        seen.append(headers["id"])
        headers["traceparent"] = "00-abc-def-01"

    before_task_publish.connect(receiver, weak=False)
    try:
        publisher = Publisher(app, db=None)  # type: ignore[arg-type]
        task_id = publisher._send_task(MESSAGE, queue, None, publisher._held_producer())
    finally:
        before_task_publish.disconnect(receiver)
    (raw,) = client.lrange(queue, 0, -1)
    assert seen == [task_id] and json.loads(raw)["headers"]["traceparent"] == "00-abc-def-01"


def test_the_broker_channel_reuses_one_redis_client(broker: tuple[Any, Any, str]) -> None:
    app, client, queue = broker
    publisher = Publisher(app, db=None)  # type: ignore[arg-type]
    producer = publisher._held_producer()
    for _ in range(3):
        publisher._send_task(MESSAGE, queue, None, producer)
    channel = producer.channel
    assert channel._create_client() is channel._create_client()
    assert channel._create_client(asynchronous=True) is not channel._create_client()
    assert client.llen(queue) == 3
    # After a fork the channel's pools are new (kombu's ``_after_fork``): so is its client.
    before = channel._create_client()
    channel._disconnect_pools()
    assert channel._create_client() is not before
    assert channel._create_client().connection_pool is channel.pool
    publisher._send_task(MESSAGE, queue, None, producer)
    assert client.llen(queue) == 4


def test_the_raw_relay_keeps_kombus_own_transport(redis_url: str) -> None:
    """The benchmarks' raw Celery relay is stock Celery: PocoFlow's transport is ours."""
    ours = create_app(Settings(db_url="sqlite:///unused.db", broker_url=redis_url))
    with ours.connection_for_read() as conn:
        assert type(conn.default_channel) is transport.Channel
    amqp = create_app(Settings(db_url="sqlite:///unused.db", broker_url="amqp://localhost//"))
    assert amqp.conf.broker_transport is None
    env = {**os.environ, "POCOFLOW_BROKER_URL": redis_url}
    code = ("from bench.relay_app import app\n"
            "with app.connection_for_read() as c: print(type(c.default_channel).__module__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=REPO_ROOT)  # fmt: skip
    assert out.stdout.strip() == kombu_redis.__name__
