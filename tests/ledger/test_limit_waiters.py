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
from sqlalchemy import text

from pocoflow import Flow, MapNode, Node, flow
from pocoflow.distributed import lifecycle
from pocoflow.distributed.control import CANCEL, RemoteControl, set_flag
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


def deliver_as_pause_is_withdrawn(
    db: Any, wctx: WorkerContext, run_id: str, message: ItemMessage
) -> str:
    """``deliver`` after a pause request, which a resume withdraws just before the
    delivery's guard parks the run (between its missed claim and its park)."""
    assert lifecycle.request_pause(db, run_id)
    real = db.update_run_if

    def resume_lands_first(run: str, **kw: Any) -> bool:
        if kw.get("status") == "paused" and kw.get("control_in") == ("pause",):
            real(run, control_in=("pause",), control=None)  # the resume, just before
        return real(run, **kw)

    db.update_run_if = resume_lands_first
    try:
        return deliver(wctx, message)
    finally:
        del db.update_run_if


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


class Plain(Node):
    def exec(self, prep_result: Any) -> Any:
        return None


@flow("review_plain")
def review_plain() -> Flow:
    return Flow(start=Plain(name="plain"))


class CountingRedis(redis.Redis):
    """A client that counts the commands it sends (pipelines included)."""

    sent: list[str]

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        self.sent.append("PIPELINE")
        return super().pipeline(transaction, shard_hint)


def test_a_run_without_limits_costs_no_redis_round_trip_when_it_completes(
    db: Any, recorder: Recorder, redis_url: str
) -> None:
    """A flow with no limited node can have no waiters and no record: the commit that
    completes it should not ask Redis anything (today: one SMEMBERS per completed run,
    every run, after the flow_end hook, on the worker's task)."""
    counting = CountingRedis.from_url(redis_url)
    counting.sent = []
    ctx = WorkerContext(
        db=db,
        publisher=recorder,  # type: ignore[arg-type]
        redis=counting,
        lease_s=LEASE_S,
        limiter=RedisLimiter(counting, lease_s=30),
    )
    first = start(db, "review_plain", {})
    assert deliver(ctx, first) == "committed"
    assert db.get_run(first.run_id)["status"] == "completed"
    assert counting.sent == [], f"a run without limits sent {counting.sent} to Redis"
    counting.close()


def test_an_item_whose_park_lost_to_a_resume_leaves_the_live_runs_waiters_queued(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, key: str, held: Any
) -> None:
    """An item's claim misses on a pause request, and a resume withdraws it before the
    item's guard parks the run: ``_ItemRun._guard`` still returns ``paused`` (whatever
    ``update_run_if`` said), so the delivery purges the waiters of a run that never
    stopped. Its items then come back to find their places gone."""
    run_id, again = queued_items(db, wctx, recorder, key, [f"i{i}" for i in range(4)])
    assert client.zcard(waiters_key(key)) == 4
    outcome = deliver_as_pause_is_withdrawn(db, wctx, run_id, again[0])
    run = db.get_run(run_id)
    assert run["status"] == "running" and run["control"] is None  # the run never stopped
    assert client.zcard(waiters_key(key)) == 4, "a live run's waiters were purged"
    assert outcome != "paused", "the item reports a pause that did not happen"


def test_a_pause_withdrawn_before_any_worker_parks_keeps_the_runs_places(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, redis_url: str,
    key: str, held: Any,
) -> None:  # fmt: skip
    """``RemoteControl.pause`` purges as it raises the request, before the run stopped:
    pause + resume (nothing parked in between) leaves a running run whose waiting items
    lost their places (each comes back to the tail, told a new full wait)."""
    run_id, _again = queued_items(db, wctx, recorder, key, [f"i{i}" for i in range(4)])
    control = RemoteControl(
        run_id, db, redis_url=redis_url, publisher_factory=lambda: recorder,  # type: ignore[arg-type,return-value]
        lease_s=LEASE_S,
    )  # fmt: skip
    control.pause()
    control.resume()
    assert db.get_run(run_id)["status"] == "running"
    assert client.zcard(waiters_key(key)) == 4, "the waiters of a run that never paused were purged"


def test_a_first_refusal_racing_the_cancel_purge_leaves_no_waiter_queued(
    db: Any, client: redis.Redis, redis_url: str, key: str, held: Any, recorder: Recorder
) -> None:
    """The two round trips of a first refusal (ACQUIRE queues the waiter, REMEMBER_WAIT
    records it) with a cancel's purge in between: the purge does not see the waiter, the
    record is written (re-created) after it, and the waiter of a cancelled run keeps its
    place until its own message comes back to meet the cancel (its turn)."""
    limiter = RedisLimiter(client, lease_s=30, poll_s=0.2)
    run_id = f"race-{uuid.uuid4().hex[:8]}"
    db.create_run(run_id, flow_name="any")
    control = RemoteControl(
        run_id, db, redis_url=redis_url, publisher_factory=lambda: recorder,  # type: ignore[arg-type,return-value]
        lease_s=LEASE_S,
    )  # fmt: skip
    real = limiter._remember_wait

    def cancel_lands_between(*args: Any) -> None:
        control.cancel()  # flag, then purge: it finds nothing recorded yet
        real(*args)

    limiter._remember_wait = cancel_lands_between  # type: ignore[method-assign]
    assert not limiter.acquire(Limits(concurrency=1), key, "h", f"{run_id}:0", run_id).go
    assert db.get_run(run_id)["status"] == "cancelled"
    assert client.zcard(waiters_key(key)) == 0, "a cancelled run's waiter is still queued"
    assert not client.exists(run_waits_key(run_id)), "the record came back after the purge"


def test_a_resume_between_the_park_and_its_purge_keeps_the_resumed_runs_waiter(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, key: str, held: Any
) -> None:
    """The delivery that parks a run purges after ``run()`` returned: a resume landing in
    between, whose step is refused and queued again, keeps its live waiter (the purge
    of a pause looks at the run first)."""
    first = start(db, "waiters_step", {"key": key})
    assert deliver(wctx, first) == "limited"
    [(again, _queue)] = recorder.take()
    assert lifecycle.request_pause(db, first.run_id)
    real = db.park_run
    assert wctx.limiter is not None
    limiter = wctx.limiter

    def resumed_at_once(*args: Any, **kw: Any) -> bool:
        parked = real(*args, **kw)
        # The user resumes; the resumed step's delivery is refused and queued again.
        assert lifecycle.resume_paused(db, first.run_id, recorder, lease_s=LEASE_S)  # type: ignore[arg-type]
        client.zrem(waiters_key(key), f"{first.run_id}:0")  # (as if purged at the pause)
        assert not limiter.acquire(
            Limits(concurrency=1), key, "resumed", f"{first.run_id}:0", first.run_id
        ).go
        return parked

    db.park_run = resumed_at_once  # type: ignore[method-assign]
    try:
        assert deliver(wctx, again) == "paused"
    finally:
        del db.park_run
    assert db.get_run(first.run_id)["status"] == "running"
    assert client.zrange(waiters_key(key), 0, -1) == [f"{first.run_id}:0".encode()], (
        "the resumed run's waiter was purged by the stale pause"
    )


def test_a_stale_cancel_flag_does_not_throw_a_live_runs_waiter_out(
    db: Any, client: redis.Redis, key: str, held: Any
) -> None:
    """A resumed run whose CANCEL flag outlived the resume (clear_flag could not reach
    Redis; the executor's guard explicitly ignores such a flag): the run is running in
    the ledger, yet each first refusal of its steps takes itself out of the queue, so a
    later newcomer of another run is put ahead of it, every time."""
    from pocoflow.distributed import executor

    limiter = RedisLimiter(client, lease_s=30, poll_s=0.2)
    if hasattr(executor, "_cancelled_in_ledger"):  # the proposed fix, wired as workers do
        limiter.run_cancelled = lambda r: executor._cancelled_in_ledger(db, r)
    run_id = f"live-{uuid.uuid4().hex[:8]}"
    db.create_run(run_id, flow_name="any")  # status running: the ledger says live
    set_flag(client, run_id, CANCEL)  # left over from before the resume
    assert not limiter.acquire(Limits(concurrency=1), key, "h1", f"{run_id}:0", run_id).go
    assert not limiter.acquire(Limits(concurrency=1), key, "h2", "other:0", "other").go
    assert db.get_run(run_id)["status"] == "running"
    assert client.zrank(waiters_key(key), f"{run_id}:0") == 0, (
        "the live run's waiter was taken out by a stale cancel flag"
    )


def test_a_resume_between_a_cancelled_guard_and_its_purge_keeps_the_resumed_waiter(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, key: str,
    held: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """As test_a_resume_between_the_park_and_its_purge_keeps_the_resumed_runs_waiter, for
    a cancel: the delivery that meets the cancel purges after run() returned; a resume
    (restart) that landed in between, whose step is refused and queued again, loses
    its place (only PAUSED looks at the run first)."""
    first = start(db, "waiters_step", {"key": key})
    assert deliver(wctx, first) == "limited"
    [(again, _queue)] = recorder.take()
    assert lifecycle.request_cancel(db, first.run_id)
    real = lifecycle.stopped
    limiter = wctx.limiter
    assert limiter is not None

    def resumed_at_once(db_: Any, run: dict[str, Any], step: int) -> str | None:
        stop = real(db_, run, step)
        if stop == "cancelled":
            assert lifecycle.restart(db, first.run_id, recorder, lease_s=LEASE_S)  # type: ignore[arg-type]
            client.zrem(waiters_key(key), f"{first.run_id}:0")
            assert not limiter.acquire(
                Limits(concurrency=1), key, "resumed", f"{first.run_id}:0", first.run_id
            ).go
        return stop

    monkeypatch.setattr(lifecycle, "stopped", resumed_at_once)
    assert deliver(wctx, again) == "cancelled"
    assert db.get_run(first.run_id)["status"] == "running"
    assert client.zrange(waiters_key(key), 0, -1) == [f"{first.run_id}:0".encode()], (
        "the resumed run's waiter was purged by the stale cancel"
    )


def test_an_item_whose_pause_was_withdrawn_is_not_dropped(
    db: Any, wctx: WorkerContext, recorder: Recorder, client: redis.Redis, key: str, held: Any
) -> None:
    """A pause withdrawn between an item's missed claim and its park: the item claims
    again and runs (or is sent again), not left to the sweeper's stale-item backstop."""
    run_id, again = queued_items(db, wctx, recorder, key, [f"i{i}" for i in range(2)])
    outcome = deliver_as_pause_is_withdrawn(db, wctx, run_id, again[0])
    sent = recorder.take()
    status = db._read(
        lambda c: c.execute(
            text("SELECT status FROM pf_items WHERE run_id = :r AND idx = :i"),
            {"r": run_id, "i": again[0].idx},
        ).scalar_one()
    )
    # The run goes on (the pause was withdrawn): the item must run now or be sent again,
    # not wait for the sweeper's stale-item backstop (REQUEUE_CAP_S = 600 s while the
    # broker has messages queued, as it has during a limited fan-out).
    assert outcome != "duplicate" or sent or status != "queued", "a live run's item was dropped"
