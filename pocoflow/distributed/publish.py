"""Sending step messages: the only place a message leaves a PocoFlow process.

A send that fails (Redis down, a network blip) is logged and reported, never raised:
the step's outbox row stays unsent and the sweeper sends it later (G3). A sent message
is marked in the ledger under the attempt it carries, so a stale send never marks a
newer attempt's row.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from celery.signals import after_task_publish, before_task_publish
from kombu.transport import redis as kombu_redis
from kombu.utils.uuid import uuid

from pocoflow.distributed.celery_app import (
    DEFAULT_QUEUE,
    ITEM_TASK_NAME,
    PUBLISH_RETRY_POLICY,
    TASK_NAME,
)
from pocoflow.distributed.message import ItemMessage, StepMessage
from pocoflow.distributed.transport import keep_one_client
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from celery import Celery

    from pocoflow.db import WorkflowDB

_log = get_logger("distributed.publish")

#: A fan-out marks its published items sent at least this often (messages, seconds): well
#: within the sweeper's grace for unsent rows (``sweeper.UNSENT_GRACE_S``, 1 s).
MARK_EVERY = 200
MARK_AFTER_S = 0.25
#: A fan-out's item messages go to the broker this many at a time in one pipelined batch
#: (kombu's ``Producer.batch``: one round trip on Redis), because one round trip per
#: message, from a worker whose threads run items, cost 0.6-0.9 ms a message and held
#: back the start of every item behind it.
PUBLISH_BATCH = 100
#: The first batch is this small, and each next one twice the last up to
#: ``PUBLISH_BATCH``, so the workers start on the first items at once.
FIRST_BATCH = 8


def task_labels(message: StepMessage | ItemMessage) -> dict[str, str]:
    """What Flower, ``celery events`` and worker logs show for a step task, instead of
    ``pocoflow.step`` and a dict: a name saying the flow and node (Celery's ``shadow``)
    and arguments saying the run, step, node and attempt (``argsrepr``), and the item's
    index for a map item (``FLOW.NODE[item]``). Display only: the worker runs the task
    named ``pocoflow.step`` (``pocoflow.item``) with the JSON body, whatever these say,
    and they carry no more than the message itself (ids, no Store values)."""
    item = f"item={message.idx} " if isinstance(message, ItemMessage) else ""
    return {
        "shadow": f"{message.flow}.{message.node_id}" + ("[item]" if item else ""),
        "argsrepr": (
            f"run_id={message.run_id} step={message.step} node={message.node_id} {item}"
            f"attempt={message.attempt}"
        ),
        "kwargsrepr": "{}",
    }


def _plain_publish(app: Any, queue: str) -> bool:
    """Whether ``Publisher`` may publish to ``queue`` without ``send_task``: a Celery app
    whose queue is bound to a direct exchange (``send_task`` too sends those through the
    default exchange, the routing key naming the queue), and no receiver of the publish
    signals (tracing and error-reporting libraries connect ``before_task_publish`` to add
    headers: their messages keep the full path)."""
    amqp = getattr(app, "amqp", None)
    if amqp is None or before_task_publish.receivers or after_task_publish.receivers:
        return False
    return amqp.queues[queue].exchange.type == "direct"  # type: ignore[no-any-return]


def publish_plainly(
    app: Celery,
    producer: Any,
    task_id: str,
    task: str,
    args: list[Any],
    queue: str,
    countdown: float | None = None,
    labels: dict[str, str] | None = None,
) -> None:
    """The message ``send_task`` would send, built by Celery's own ``amqp`` and put
    through kombu's ``Producer.publish``, without what ``send_task`` does around it for
    the general case: routing a task whose queue we name, resolving the queue and its
    exchange, a declare check before every message on Redis, where nothing needs it
    (``declare`` below), the task signals nobody listens to (``_plain_publish``) and an
    ``AsyncResult`` nobody reads. The publish was the largest part of a step's CPU in its
    pool child (issue 6's load goal): 720 us of CPU a message through ``send_task``
    against 270 us this way (one process, one Redis); in a worker under load 1,220 us a
    step against 510 us, with the Redis client kept (``transport``). ``labels``: what
    Flower and the logs show (``task_labels``)."""
    labels = labels or {}
    parent = app.current_worker_task
    parent_id = parent.request.id if parent else None
    headers, properties, body, _ = app.amqp.create_task_message(
        task_id,
        task,
        args,
        {},
        countdown=countdown,
        shadow=labels.get("shadow"),
        argsrepr=labels.get("argsrepr"),
        kwargsrepr=labels.get("kwargsrepr"),
        root_id=(parent.request.root_id or parent_id) if parent else None,
        parent_id=parent_id,
        reply_to=app.thread_oid,
        ignore_result=None,  # the task's own setting, as send_task leaves it
    )
    conf = app.conf
    amqp_queue = app.amqp.queues[queue]
    redis_channel = isinstance(producer.channel, kombu_redis.Channel)
    producer.publish(
        body,
        exchange="",  # the direct default exchange: the routing key is the queue
        routing_key=queue,
        serializer=conf.task_serializer,
        compression=conf.task_compression,
        headers=headers,
        delivery_mode=amqp_queue.exchange.delivery_mode or conf.task_default_delivery_mode,
        retry=True,
        retry_policy=PUBLISH_RETRY_POLICY,
        # Redis needs no declared queue for the default exchange (the message is pushed
        # on the queue's list), so its declare check, which cost more than the rest of
        # the publish, is skipped; elsewhere (RabbitMQ drops a message for a queue it
        # does not have) kombu declares once per connection, again after a reconnect.
        declare=[] if redis_channel else [amqp_queue],
        **properties,
    )
    keep_one_client(producer.channel)


class SentMarker:
    """Marks published outbox rows sent from a background thread, in batches.

    Because a mark only spares the sweeper a resend, it need not hold up the step: a
    worker that dies before its batch lands just lets the sweeper resend those messages
    after the grace period, and the duplicate is refused by the step's claim (G1).
    """

    # 0.1 s because a batch should hold several marks at load (a worker publishes some 40
    # steps a second: every 20 ms that was one mark, three statements, per step), while a
    # mark still lands long before the sweeper's 1 s grace for unsent rows.
    def __init__(self, db: WorkflowDB, interval_s: float = 0.1) -> None:
        self.db = db
        self.interval_s = interval_s
        self._pending: queue.SimpleQueue[tuple[str, int, int, str | None, float]] = (
            queue.SimpleQueue()
        )
        self._items: queue.SimpleQueue[tuple[str, int, int, int]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="pocoflow-sent", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def add(self, run_id: str, step: int, attempt: int, task_id: str | None, now: float) -> None:
        self._pending.put((run_id, step, attempt, task_id, now))

    def add_item(self, key: tuple[str, int, int, int]) -> None:
        """A published item message ``(run_id, step, idx, attempt)``."""
        self._items.put(key)

    def flush(self) -> None:
        batch = []
        while not self._pending.empty():
            batch.append(self._pending.get_nowait())
        items = []
        while not self._items.empty():
            items.append(self._items.get_nowait())
        try:
            self.db.mark_sent_many(batch)
            self.db.mark_items_sent(items)
        except Exception as exc:  # the sweeper resends; nothing is lost
            _log.warning("Could not mark %d sent steps and items: %s", len(batch), exc)

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            if not (self._pending.empty() and self._items.empty()):
                self.flush()


class Publisher:
    """Publishes step messages on ``app``'s broker and marks their outbox rows sent
    (at once, or through a ``SentMarker`` when the caller is on a hot path)."""

    def __init__(self, app: Celery, db: WorkflowDB, *, marker: SentMarker | None = None) -> None:
        self.app = app
        self.db = db
        self.marker = marker
        # Per thread: a kombu producer (its channel) must not be used by two threads at
        # once, and a threads-pool worker publishes from every pool thread.
        self._local = threading.local()
        self._lock = threading.Lock()
        self._held: tuple[int, int] = (0, 0)  # (pid, producers this process holds)

    def _held_producer(self) -> Any:
        """This thread's broker producer, kept: acquiring one from the pool for every
        message costs about a tenth of a step. None (send_task then borrows one for the
        message) without a pool, or once held producers fill half the pool's limit
        (``broker_pool_limit``): threads beyond that borrow, and there are always some
        left to borrow, so no thread waits forever on a pool its peers keep."""
        pool = getattr(self.app, "producer_pool", None)
        if pool is None:  # a stand-in app without a pool: let it publish its own way
            return None
        local, pid = self._local, os.getpid()
        if getattr(local, "pid", None) != pid:  # a new thread, or a forked child
            local.pid, local.producer = pid, None
            with self._lock:
                held = self._held[1] if self._held[0] == pid else 0
                if not pool.limit or held < max(1, pool.limit // 2):
                    local.producer = pool.acquire(block=True)
                    self._held = (pid, held + 1)
        return local.producer

    def _drop_producer(self) -> None:
        """Forget this thread's producer (after a failed send): a fresh one next time."""
        producer, self._local.pid = getattr(self._local, "producer", None), None
        if producer is None:
            return
        with self._lock:
            self._held = (self._held[0], max(0, self._held[1] - 1))
        try:
            producer.release()
        except Exception:
            pass

    def _publish(
        self, message: StepMessage | ItemMessage, queue: str | None, countdown: float | None
    ) -> str | None:
        """The broker's task id for ``message``, or None when it failed: the row stays
        unsent and the sweeper sends it later."""
        try:  # no lock: each thread publishes through a producer of its own
            return self._send_task(message, queue, countdown, self._held_producer())
        except Exception as exc:  # broker down: the sweeper resends the unsent row
            self._drop_producer()  # a fresh one (and connection) next time
            error = exc
        what = f" item {message.idx}" if isinstance(message, ItemMessage) else ""
        _log.warning(
            "Could not publish step %d%s of run %s (attempt %d): %s; the sweeper will resend it",
            message.step,
            what,
            message.run_id,
            message.attempt,
            error,
        )
        return None

    def _send_task(
        self,
        message: StepMessage | ItemMessage,
        queue: str | None,
        countdown: float | None,
        producer: Any,
    ) -> str:
        """Publish ``message``; its task id."""
        task = ITEM_TASK_NAME if isinstance(message, ItemMessage) else TASK_NAME
        queue = queue or DEFAULT_QUEUE
        countdown = countdown if countdown and countdown > 0 else None
        task_id = uuid()
        if producer is not None and _plain_publish(self.app, queue):
            publish_plainly(
                self.app,
                producer,
                task_id,
                task,
                [message.to_dict()],
                queue,
                countdown,
                task_labels(message),
            )
        else:
            self.app.send_task(
                task,
                args=[message.to_dict()],
                task_id=task_id,
                queue=queue,
                countdown=countdown,
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
                producer=producer,
                **task_labels(message),
            )
        return task_id

    def _publish_batch(
        self, messages: list[ItemMessage], queue: str | None, countdown: float | None
    ) -> list[tuple[str, int, int, int]]:
        """Publish ``messages`` in one pipelined batch of this thread's producer; the keys
        of those the broker took: all of them, or none when the batch failed (its
        delivery is then uncertain: the rows stay unsent, the sweeper sends them again
        and a copy that arrives twice is refused by the item's claim, G1). One message at
        a time where the producer cannot batch (kombu before 5.7, a borrowed producer)."""
        producer = self._held_producer()
        batch = getattr(producer, "batch", None)
        if batch is None:
            return [m.key for m in messages if self._publish(m, queue, countdown) is not None]
        try:
            # max_size counts Redis commands, not messages: kombu buffers one LPUSH per
            # message and, for a queue with an expiry, one PEXPIRE per priority step
            # (4 by default). Room for all, so the batch goes in one round trip (a
            # flush at max_size would only cost another).
            with batch(max_size=5 * len(messages)):
                for message in messages:
                    self._send_task(message, queue, countdown, producer)
        except Exception as exc:  # broker down: the sweeper resends the unsent rows
            self._drop_producer()
            first = messages[0]
            _log.warning(
                "Could not publish items %d-%d of step %d of run %s: %s; the sweeper will "
                "resend them",
                first.idx,
                messages[-1].idx,
                first.step,
                first.run_id,
                exc,
            )
            return []
        return [m.key for m in messages]

    def send_items(
        self,
        messages: list[ItemMessage],
        *,
        queue: str | None = None,
        countdown: float | None = None,
    ) -> int:
        """Publish a fan-out's item messages through this thread's producer,
        ``PUBLISH_BATCH`` to a round trip, marking them sent as they go, every
        ``MARK_EVERY`` messages or ``MARK_AFTER_S`` (one statement each); returns how
        many the broker took. Marked as they go, because a thousand messages may take
        longer than the sweeper's grace for unsent rows, and marking them only at the end
        would have every one of them sent twice."""
        taken = 0
        batch: list[tuple[str, int, int, int]] = []
        marked_at = time.monotonic()
        start, size = 0, FIRST_BATCH
        while start < len(messages):
            chunk = messages[start : start + size]
            start, size = start + size, min(PUBLISH_BATCH, 2 * size)
            batch += self._publish_batch(chunk, queue, countdown)
            if len(batch) >= MARK_EVERY or time.monotonic() - marked_at > MARK_AFTER_S:
                taken += len(batch)
                self.send_items_marked(batch)
                batch, marked_at = [], time.monotonic()
        self.send_items_marked(batch)
        return taken + len(batch)

    def send(
        self,
        message: StepMessage | ItemMessage,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Publish ``message`` (on ``queue``, after ``countdown`` seconds); True if the
        broker took it. The outbox row is marked sent only then."""
        result = self._publish(message, queue, countdown)
        if result is None:
            return False
        if isinstance(message, ItemMessage):
            if self.marker is not None:
                self.marker.add_item(message.key)
            else:
                self.send_items_marked([message.key])
            return True
        if self.marker is not None:
            self.marker.add(
                message.run_id, message.step, message.attempt, result, now or time.time()
            )
            return True
        try:
            self.db.mark_sent(
                message.run_id, message.step, message.attempt, task_id=result, now=now
            )
        except Exception as exc:  # the message is out; a resend would only be a duplicate
            _log.warning(
                "Could not mark step %d of run %s sent: %s", message.step, message.run_id, exc
            )
        return True

    def send_items_marked(self, keys: list[tuple[str, int, int, int]]) -> None:
        """Mark published items sent now (one transaction)."""
        if not keys:
            return
        try:
            self.db.mark_items_sent(keys)
        except Exception as exc:  # the messages are out; a resend would only duplicate
            _log.warning("Could not mark %d items sent: %s", len(keys), exc)

    def revoke(self, task_id: str, *, terminate: bool = False, signal: str = "SIGTERM") -> None:
        """Revoke a task on every worker; with ``terminate`` its process is signalled."""
        try:
            self.app.control.revoke(task_id, terminate=terminate, signal=signal)
        except Exception as exc:
            _log.warning("Could not revoke task %s: %s", task_id, exc)

    def __call__(
        self, message: StepMessage | ItemMessage, queue: str | None = None, **kwargs: Any
    ) -> bool:
        return self.send(message, queue=queue, **kwargs)
