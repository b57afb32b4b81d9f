"""A run's limit waiters leave the queues of their limit keys once a worker delivery
stops the run or meets it stopped, driven in-process on both ledgers against a real
Redis (``execute_step`` / ``execute_item`` with a recording publisher). The client's
purge, as it raises a cancel flag, is covered with real workers in
tests/distributed/test_limits.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from pocoflow import Flow, MapNode, Node, flow
from pocoflow.distributed import lifecycle
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.distributed.itemtask import execute_item
from pocoflow.distributed.limiter import RedisLimiter, run_waits_key, waiters_key
from pocoflow.distributed.message import ItemMessage, StepMessage
from pocoflow.limits import Decision, Limits, release
from tests.ledger.test_distributed_executor import LEASE_S, start
from tests.ledger.test_item_crashes import Recorder

pytestmark = pytest.mark.ledger


class OneSlotItems(MapNode):
    """Items under one slot of ``store["key"]``; the item named ``"boom"`` fails."""

    max_concurrency = 1

    def limit_key(self, item: Any) -> str:
        return str(item[0])

    def prep(self, store: Any) -> list[Any]:
        return [[store["key"], name] for name in store["items"]]

    def exec(self, item: Any) -> Any:
        if item[1] == "boom":
            raise ValueError("boom")
        return item[1]

    def post(self, store: Any, items: Any, results: Any) -> str:
        store["results"] = results
        return "default"


@flow("waiters_items")
def waiters_items() -> Flow:
    return Flow(start=OneSlotItems(name="items"))


class OneSlotStep(Node):
    max_concurrency = 1

    def limit_key(self, prep_result: Any) -> str:
        return str(prep_result)

    def prep(self, store: Any) -> Any:
        return store["key"]


@flow("waiters_step")
def waiters_step() -> Flow:
    return Flow(start=OneSlotStep(name="call"))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def recorder(db: Any) -> Recorder:
    return Recorder(db)


@pytest.fixture
def wctx(db: Any, recorder: Recorder, client: redis.Redis) -> WorkerContext:
    limiter = RedisLimiter(client, lease_s=30)
    return WorkerContext(db=db, publisher=recorder, redis=client, lease_s=LEASE_S, limiter=limiter)  # type: ignore[arg-type]


@pytest.fixture
def key() -> str:
    return f"waiters-{uuid.uuid4().hex}"


@pytest.fixture
def held(wctx: WorkerContext, key: str) -> Iterator[Decision]:
    """The key's only slot, taken by another run's call."""
    assert wctx.limiter is not None
    decision = wctx.limiter.acquire(Limits(concurrency=1), key, "another-runs-call")
    assert decision.slot is not None
    yield decision
    release(decision.slot)


def deliver(wctx: WorkerContext, message: StepMessage | ItemMessage) -> str:
    run = execute_item if isinstance(message, ItemMessage) else execute_step
    return run(message.to_dict(), worker_id="h:1", context=wctx)


def queued_items(
    db: Any, wctx: WorkerContext, recorder: Recorder, key: str, items: list[str]
) -> tuple[str, list[ItemMessage]]:
    """A run whose items were all refused by ``key``'s taken slot: its id and the items'
    messages sent again for their turns."""
    first = start(db, "waiters_items", {"key": key, "items": items})
    assert deliver(wctx, first) == "fanned_out"
    fanned = [m for m, _ in recorder.take() if isinstance(m, ItemMessage)]
    assert [deliver(wctx, m) for m in fanned] == ["limited"] * len(items)
    again = [m for m, _ in recorder.take()]
    assert all(isinstance(m, ItemMessage) for m in again)
    return first.run_id, again  # type: ignore[return-value]


def test_a_cancel_recorded_without_redis_is_cleared_by_the_first_item_back(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, key: str, held: Any
) -> None:
    """A cancel written to the ledger only (a CLI without Redis): the first of the run's
    waiting items to come back meets it and takes every waiter of the run out."""
    run_id, again = queued_items(db, wctx, recorder, key, [f"i{i}" for i in range(6)])
    assert client.zcard(waiters_key(key)) == 6
    assert lifecycle.request_cancel(db, run_id)
    assert deliver(wctx, again[3]) == "cancelled"
    assert client.zcard(waiters_key(key)) == 0
    assert not client.exists(run_waits_key(run_id))


def test_an_item_that_fails_its_run_takes_its_siblings_out_of_the_queue(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, key: str, held: Any
) -> None:
    run_id, again = queued_items(db, wctx, recorder, key, ["a", "boom", "c", "d"])
    release(held.slot)  # the failing item gets the slot, its siblings still wait
    assert deliver(wctx, again[1]) == "failed"
    assert db.get_run(run_id)["status"] == "failed"
    assert client.zcard(waiters_key(key)) == 0


def test_a_completed_run_leaves_no_record_of_its_waits(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, key: str, held: Any
) -> None:
    first = start(db, "waiters_step", {"key": key})
    assert deliver(wctx, first) == "limited"
    assert client.exists(run_waits_key(first.run_id))
    release(held.slot)
    [(again, _queue)] = recorder.take()
    assert deliver(wctx, again) == "committed"
    assert db.get_run(first.run_id)["status"] == "completed"
    assert not client.exists(run_waits_key(first.run_id))


def test_a_step_back_to_a_run_paused_without_redis_leaves_the_queue(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, key: str, held: Any
) -> None:
    """A pause request written to the ledger only: the waiting step comes back, parks
    the run, and is no longer queued under its key."""
    first = start(db, "waiters_step", {"key": key})
    assert deliver(wctx, first) == "limited"
    assert client.zrange(waiters_key(key), 0, -1) == [f"{first.run_id}:0".encode()]
    assert lifecycle.request_pause(db, first.run_id)
    [(again, _queue)] = recorder.take()
    assert deliver(wctx, again) == "paused"
    assert db.get_run(first.run_id)["status"] == "paused"
    assert client.zcard(waiters_key(key)) == 0
