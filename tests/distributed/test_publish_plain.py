"""A step message published without ``send_task`` (``publish.publish_plainly``) is the
message ``send_task`` sends, on a real Redis broker (and reaches a real RabbitMQ queue the
broker lost); a process whose code listens to the publish signals keeps ``send_task``;
the publisher's and a worker consumer's Redis channels reuse one client."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.signals import before_task_publish

from pocoflow.distributed.celery_app import PUBLISH_RETRY_POLICY, TASK_NAME, create_app
from pocoflow.distributed.message import StepMessage
from pocoflow.distributed.publish import Publisher, task_labels
from pocoflow.distributed.transport import KeepOneRedisClient
from pocoflow.settings import Settings
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

MESSAGE = StepMessage("run-p", "article", 3, "draft", 2, try_number=2)
#: What differs between two publishes of one message: its ids (a message sent outside a
#: task is its own root) and its clock; and ``send_task`` copies its display arguments
#: into the properties too (its options), where no worker or Flower reads them.
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
        app.close()


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
    send_task, app.send_task = app.send_task, None  # the plain path must not need it
    try:
        task_id = publisher._send_task(MESSAGE, queue, 2.5, publisher._held_producer())
    finally:
        app.send_task = send_task
    app.send_task(TASK_NAME, args=[MESSAGE.to_dict()], queue=queue, countdown=2.5,
                  retry=True, retry_policy=PUBLISH_RETRY_POLICY, **task_labels(MESSAGE))  # fmt: skip
    # LPUSH: the head of the list is the last message published.
    theirs, ours = (_flat(json.loads(raw)) for raw in client.lrange(queue, 0, -1))
    assert ours["headers.id"] == ours["headers.root_id"] == task_id
    assert theirs["headers.id"] == theirs["headers.root_id"]
    assert ours["headers.shadow"] == "article.draft"
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


def test_a_step_sent_from_a_task_names_its_parent_and_root(
    broker: tuple[Any, Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``send_task`` does: Flower links a step to the task that sent it."""
    app, client, queue = broker
    request = SimpleNamespace(id="task-7", root_id="task-1")
    monkeypatch.setattr(type(app), "current_worker_task", SimpleNamespace(request=request))
    monkeypatch.setattr(app, "send_task", None)  # the plain path must not need it
    publisher = Publisher(app, db=None)  # type: ignore[arg-type]
    publisher._send_task(MESSAGE, queue, None, publisher._held_producer())
    (raw,) = client.lrange(queue, 0, -1)
    headers = json.loads(raw)["headers"]
    assert (headers["parent_id"], headers["root_id"]) == ("task-7", "task-1")


def _consumer_step_keeps(url: str) -> bool:
    app = create_app(Settings(db_url="sqlite:///unused.db", broker_url=url))
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        KeepOneRedisClient(parent=None).start(
            SimpleNamespace(task_consumer=SimpleNamespace(channel=channel))
        )
        kept = "_create_client" in vars(channel)
        assert not kept or channel._create_client() is channel._create_client()
    app.close()
    return kept


def test_the_consumer_step_keeps_a_redis_channels_client(redis_url: str) -> None:
    """The unacked index and the ack of every message: one client (a real worker:
    ``test_redis_restart``)."""
    assert _consumer_step_keeps(redis_url)


def test_the_consumer_step_leaves_a_rabbitmq_channel_alone(amqp_url: str) -> None:
    assert not _consumer_step_keeps(amqp_url)


def test_the_broker_url_kombu_and_flower_read_is_unchanged(redis_url: str) -> None:
    """kombu turns TLS on from a ``rediss://`` scheme and Flower's broker page parses the
    URL the connection reports: both read the transport's name, which stays kombu's."""
    tls = create_app(Settings(db_url="sqlite:///unused.db", broker_url="rediss://:pw@h:6380/0"))
    assert tls.connection_for_write().ssl
    app = create_app(Settings(db_url="sqlite:///unused.db", broker_url=redis_url))
    assert app.connection().as_uri().startswith("redis://")


def test_a_queue_rabbitmq_lost_is_declared_again(amqp_url: str) -> None:
    """RabbitMQ drops a message for a queue it does not have: after the broker lost the
    queue and the link, the next publish declares it again (kombu's per-connection
    cache, emptied on reconnect), so the message is kept."""
    app = create_app(Settings(db_url="sqlite:///unused.db", broker_url=amqp_url))
    queue = f"gpu-{uuid.uuid4().hex}"
    publisher = Publisher(app, db=None)  # type: ignore[arg-type]
    producer = publisher._held_producer()
    assert publisher._publish(MESSAGE, queue, None)
    with app.connection_for_write() as admin:
        channel = admin.channel()
        try:
            channel.queue_delete(queue)
            producer.connection.connection.transport.sock.shutdown(socket.SHUT_RDWR)
            sent = [publisher._publish(MESSAGE, queue, None) for _ in range(3)]
            assert sent[-1] is not None
            # Passive: a queue the publish did not declare again raises NOT_FOUND. Polled,
            # because RabbitMQ counts a message a moment after the publish returns.
            wait_until(lambda: channel.queue_declare(queue, passive=True)[1] >= 1, 10)
        finally:
            channel.queue_delete(queue)
