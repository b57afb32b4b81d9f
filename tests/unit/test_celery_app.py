"""The Celery app's settings (JSON only, prefetch 1, no results, queues) and the
publisher's behaviour when the broker is down (the sweeper's job, never an exception)."""

from __future__ import annotations

from typing import Any

import pytest

from pocoflow.distributed.celery_app import (
    DEFAULT_ACKS_LATE,
    DEFAULT_QUEUE,
    TASK_NAME,
    acks_late_from_env,
    create_app,
    task_events_from_env,
)
from pocoflow.distributed.message import StepMessage
from pocoflow.distributed.publish import Publisher
from pocoflow.settings import Settings

pytestmark = pytest.mark.unit

SETTINGS = Settings(broker_url="redis://:secret@127.0.0.1:1/0", db_url="sqlite:///x.db")


def test_json_only_and_no_result_backend() -> None:
    conf = create_app(SETTINGS).conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_ignore_result and not conf.result_backend
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_hijack_root_logger is False
    assert conf.broker_connection_retry_on_startup is True
    assert conf.broker_transport_options["visibility_timeout"] >= 3600
    assert conf.task_default_queue == DEFAULT_QUEUE
    assert conf.task_routes[TASK_NAME] == {"queue": DEFAULT_QUEUE}
    assert conf.task_acks_late is DEFAULT_ACKS_LATE


def test_acks_late_is_a_setting() -> None:
    assert acks_late_from_env({}) is DEFAULT_ACKS_LATE
    assert acks_late_from_env({"POCOFLOW_ACKS_LATE": "1"}) is True
    assert acks_late_from_env({"POCOFLOW_ACKS_LATE": "off"}) is False
    with pytest.raises(ValueError, match="POCOFLOW_ACKS_LATE"):
        acks_late_from_env({"POCOFLOW_ACKS_LATE": "sometimes"})
    assert create_app(SETTINGS, acks_late=True).conf.task_acks_late is True


def test_task_events_are_a_setting_off_by_default() -> None:
    assert task_events_from_env({}) is False
    assert task_events_from_env({"POCOFLOW_TASK_EVENTS": "1"}) is True
    with pytest.raises(ValueError, match="POCOFLOW_TASK_EVENTS"):
        task_events_from_env({"POCOFLOW_TASK_EVENTS": "maybe"})
    assert create_app(SETTINGS).conf.worker_send_task_events is False
    assert create_app(SETTINGS, task_events=True).conf.worker_send_task_events is True


class DownBroker:
    def send_task(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("broker down")


class Ledger:
    def __init__(self) -> None:
        self.marked: list[tuple[Any, ...]] = []

    def mark_sent(self, *args: Any, **kwargs: Any) -> bool:
        self.marked.append(args)
        return True


class Broker:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def send_task(self, name: str, **kwargs: Any) -> Any:
        self.calls.append({"name": name, **kwargs})
        return type("Result", (), {"id": "task-1"})()


def test_a_failed_publish_is_reported_not_raised_and_not_marked_sent() -> None:
    ledger = Ledger()
    publisher = Publisher(DownBroker(), ledger)  # type: ignore[arg-type]
    assert publisher.send(StepMessage("r", "f", 0, "a", 1)) is False
    assert ledger.marked == []


def test_a_publish_marks_the_row_sent_under_its_attempt() -> None:
    ledger, broker = Ledger(), Broker()
    publisher = Publisher(broker, ledger)  # type: ignore[arg-type]
    assert publisher.send(
        StepMessage("r", "f", 4, "a", 2, try_number=2), queue="gpu", countdown=1.5
    )
    (call,) = broker.calls
    assert call["name"] == TASK_NAME and call["queue"] == "gpu" and call["countdown"] == 1.5
    assert call["args"] == [StepMessage("r", "f", 4, "a", 2, try_number=2).to_dict()]
    assert ledger.marked == [("r", 4, 2)]


def test_a_step_task_shows_its_flow_node_run_and_step_in_monitoring() -> None:
    """Flower and worker logs show FLOW.NODE and the ids, not pocoflow.step and a dict;
    the task that runs is still pocoflow.step with the JSON body."""
    broker = Broker()
    Publisher(broker, Ledger()).send(StepMessage("article-1a2b", "article", 3, "draft", 2))  # type: ignore[arg-type]
    (call,) = broker.calls
    assert call["name"] == TASK_NAME and call["shadow"] == "article.draft"
    assert call["argsrepr"] == "run_id=article-1a2b step=3 node=draft attempt=2"
    assert call["args"] == [StepMessage("article-1a2b", "article", 3, "draft", 2).to_dict()]


class CountingPool:
    """A producer pool stand-in: hands out numbered producers, counts releases."""

    limit = 4
    LimitExceeded = RuntimeError

    def __init__(self) -> None:
        self.acquired = 0
        self.released = 0

    def acquire(self, block: bool = False) -> Any:
        pool = self
        pool.acquired += 1

        class Producer:
            number = pool.acquired

            def release(self) -> None:
                pool.released += 1

        return Producer()


def test_each_thread_holds_its_own_producer_up_to_half_the_pool() -> None:
    """A threads-pool worker publishes from every pool thread: a kombu producer is not
    thread-safe, and threads that keep producers must leave some for others to borrow."""
    import threading

    app = Broker()
    app.producer_pool = CountingPool()  # type: ignore[attr-defined]
    publisher = Publisher(app, Ledger())  # type: ignore[arg-type]
    barrier = threading.Barrier(4)
    got: list[Any] = []

    def thread() -> None:
        barrier.wait(5)
        first = publisher._held_producer()
        assert publisher._held_producer() is first  # kept by the thread
        got.append(first)

    threads = [threading.Thread(target=thread) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    held = [p for p in got if p is not None]
    assert len(got) == 4 and len({p.number for p in held}) == len(held) == 2
    publisher.send(StepMessage("r", "f", 0, "a", 1))  # this thread: the pool is half held
    assert app.calls[-1]["producer"] is None  # send_task borrows one for the message


def test_a_failed_send_releases_the_threads_producer() -> None:
    app, pool = DownBroker(), CountingPool()
    app.producer_pool = pool  # type: ignore[attr-defined]
    publisher = Publisher(app, Ledger())  # type: ignore[arg-type]
    assert publisher.send(StepMessage("r", "f", 0, "a", 1)) is False
    assert (pool.acquired, pool.released) == (1, 1)
    publisher.send(StepMessage("r", "f", 0, "a", 1))
    assert pool.acquired == 2  # a fresh producer after the failure


def test_the_broker_loss_sentinel_is_for_redis_brokers_only() -> None:
    """RabbitMQ keeps durable queues across restarts and returns a dead consumer's
    unacked messages at once: nothing for the Redis sentinel to watch there, only the
    queues' backlog (RabbitQueues, never lost; read in tests/distributed/test_rabbitmq.py)."""
    from pocoflow.distributed.sweeper import BrokerSentinel, RabbitQueues, broker_sentinel

    view = broker_sentinel("amqp://guest:guest@rabbit:5672//")
    assert isinstance(view, RabbitQueues) and not view.lost()
    assert type(broker_sentinel("redis://127.0.0.1:1/0")) is BrokerSentinel
    assert broker_sentinel("sqs://") is None


class BatchingPool(CountingPool):
    """Producers that batch as kombu 5.7's do: messages sent inside ``batch()`` reach the
    broker at its exit; the exits listed in ``failing`` raise (delivery uncertain)."""

    def __init__(self, failing: set[int]) -> None:
        super().__init__()
        self.failing = failing
        self.flushed: list[list[int]] = []
        self.exits = 0

    def acquire(self, block: bool = False) -> Any:
        pool = self
        pool.acquired += 1

        class Producer:
            buffered: list[int] | None = None

            def batch(self, max_size: int) -> Any:
                producer = self

                class Batch:
                    def __enter__(self) -> None:
                        producer.buffered = []

                    def __exit__(self, *exc: object) -> None:
                        pool.exits += 1
                        sent, producer.buffered = producer.buffered, None
                        if pool.exits in pool.failing:
                            raise ConnectionResetError("broker gone mid-batch")
                        pool.flushed.append(sent or [])

                return Batch()

            def release(self) -> None:
                pool.released += 1

        return Producer()


class BatchBroker:
    def __init__(self, pool: BatchingPool) -> None:
        self.producer_pool = pool

    def send_task(self, name: str, *, args: Any, producer: Any, **kwargs: Any) -> Any:
        assert producer.buffered is not None, "an item message published outside a batch"
        producer.buffered.append(args[0]["idx"])


class ItemLedger:
    def __init__(self) -> None:
        self.marked: list[int] = []

    def mark_items_sent(self, keys: list[tuple[str, int, int, int]]) -> None:
        self.marked += [idx for _, _, idx, _ in keys]


def test_item_messages_go_out_in_batches_and_a_failed_batch_stays_unsent() -> None:
    """A fan-out publishes its items a batch (one broker round trip) at a time, growing
    from a small first batch; a batch whose flush failed is not marked sent (the sweeper
    resends it, a copy is refused by the item's claim), the batches around it are."""
    from pocoflow.distributed import publish
    from pocoflow.distributed.message import ItemMessage

    pool, ledger = BatchingPool(failing={3}), ItemLedger()
    publisher = Publisher(BatchBroker(pool), ledger)  # type: ignore[arg-type]
    messages = [ItemMessage("r", "f", 2, "m", idx, 1, 1) for idx in range(300)]
    taken = publisher.send_items(messages)
    sizes = [len(b) for b in pool.flushed]
    first = publish.FIRST_BATCH
    assert sizes[:2] == [first, 2 * first] and max(sizes) == publish.PUBLISH_BATCH
    lost = set(range(3 * first, 7 * first))  # the third batch: 4 x FIRST_BATCH messages
    assert sorted(ledger.marked) == [i for i in range(300) if i not in lost]
    assert taken == 300 - len(lost)
    assert (pool.acquired, pool.released) == (2, 1)  # a fresh producer after the failure
