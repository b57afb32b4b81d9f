"""The Redis limiter's Lua scripts against a real Redis: every decision atomic, on the
server's clock, slots freed by their lease, and fail-closed while Redis is away."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pocoflow.distributed.limiter import (
    OUTAGE_WAIT_S,
    RedisLimiter,
    forget_waiters,
    run_waits_key,
    slots_key,
    tokens_key,
    waiters_key,
)
from pocoflow.limits import Limits, Rate, release, use_limiter
from tests.distributed.faults import restart_redis
from tests.helpers import wait_until
from tests.servers import start_redis

pytestmark = pytest.mark.distributed


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def key() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_rate_decisions_race_and_exactly_n_win(client: redis.Redis, key: str) -> None:
    limiter = RedisLimiter(client, lease_s=5)
    limits = Limits(rate=Rate(3, 10.0))
    barrier = threading.Barrier(12)
    decisions = []

    def decide(i: int) -> None:
        barrier.wait()
        decisions.append(limiter.acquire(limits, key, f"h{i}"))

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(d.go for d in decisions) == 3
    waits = [d.wait_s for d in decisions if not d.go]
    assert all(9.0 < w <= 10.0 for w in waits), waits


def test_rate_wait_ends_when_the_oldest_start_leaves_the_window(
    client: redis.Redis, key: str
) -> None:
    limiter = RedisLimiter(client, lease_s=5)
    limits = Limits(rate=Rate(1, 0.3))
    assert limiter.acquire(limits, key, "a").go
    wait = limiter.acquire(limits, key, "b").wait_s
    assert 0 < wait <= 0.3
    time.sleep(wait)  # the wait itself is what is measured here
    assert limiter.acquire(limits, key, "b").go


def test_concurrency_slot_is_freed_by_release_or_by_its_lease(
    client: redis.Redis, key: str
) -> None:
    limits = Limits(concurrency=1)
    limiter = RedisLimiter(client, lease_s=0.3, poll_s=1.0)
    first = limiter.acquire(limits, key, "a")
    assert first.go and first.slot is not None
    refused = limiter.acquire(limits, key, "b")
    assert 0 < refused.wait_s <= 0.3  # the lease ends before the poll interval
    release(first.slot)
    assert client.zcard(slots_key(key)) == 0
    # A holder that dies stops renewing: a second process's decision frees its slot.
    dead = RedisLimiter(client, lease_s=0.3)
    dead._keep = lambda slot: None  # type: ignore[method-assign]  # no renewal thread
    assert dead.acquire(limits, key, "dead").go
    assert not limiter.acquire(limits, key, "c").go
    deadline = time.monotonic() + 5
    while not (freed := limiter.acquire(limits, key, "c")).go:
        assert time.monotonic() < deadline, "the dead holder's slot was never freed"
        time.sleep(0.05)
    release(freed.slot)


def test_a_live_holder_keeps_its_slot_past_the_lease(client: redis.Redis, key: str) -> None:
    limits = Limits(concurrency=1)
    live = RedisLimiter(client, lease_s=0.3)
    decision = live.acquire(limits, key, "live")
    assert decision.slot is not None
    deadline = time.monotonic() + 1.0
    other = RedisLimiter(client, lease_s=0.3)
    while time.monotonic() < deadline:  # three leases long: renewed meanwhile
        assert not other.acquire(limits, key, "other").go
        time.sleep(0.05)
    release(decision.slot)
    after = other.acquire(limits, key, "other")
    assert after.go
    release(after.slot)


def test_a_running_call_takes_its_slot_back_after_a_redis_restart(key: str) -> None:
    """A Redis restarted without persistence forgets every slot while their calls run:
    the next renewal puts the holder back (it was dropped: a second call could start
    beside the first for as long as the first ran)."""
    limits = Limits(concurrency=1)
    with start_redis() as server:
        client = redis.Redis.from_url(server.url)
        running = RedisLimiter(client, lease_s=0.9)  # renewed every 0.3 s
        other = RedisLimiter(client, lease_s=5)
        call = running.acquire(limits, key, "a")
        assert call.slot is not None and not other.acquire(limits, key, "b").go
        restart_redis(server)
        wait_until(lambda: client.zrange(slots_key(key), 0, -1) == [b"a"], 5)
        assert not other.acquire(limits, key, "b").go
        release(call.slot)
        assert other.acquire(limits, key, "b").go
        client.close()


def test_after_a_flush_no_call_starts_once_the_running_ones_hold_their_slots_again(
    client: redis.Redis, key: str
) -> None:
    """Until the running calls renew, the emptied set admits new calls beside them (the
    overshoot the README states, one renewal interval at most); the renewal counts the
    running call again although the set is full, so nothing more starts until both end."""
    limits = Limits(concurrency=1)
    limiter = RedisLimiter(client, lease_s=30)  # no renewal by its thread in this test
    first = limiter.acquire(limits, key, "a")
    assert first.slot is not None and not limiter.acquire(limits, key, "b").go
    client.delete(slots_key(key))  # what a restart without persistence did to the key
    second = limiter.acquire(limits, key, "b")
    assert second.go  # the window before the renewal
    assert limiter.renew(first.slot)
    assert sorted(client.zrange(slots_key(key), 0, -1)) == [b"a", b"b"]
    assert not limiter.acquire(limits, key, "c").go
    release(second.slot)
    assert not limiter.acquire(limits, key, "c").go  # the first call still runs
    release(first.slot)
    third = limiter.acquire(limits, key, "c")
    assert third.go
    release(third.slot)


def test_a_holder_whose_lease_ended_comes_back_only_into_a_free_place(
    client: redis.Redis, key: str
) -> None:
    """A lease that ran out (its process frozen, cut off from Redis) may have been pruned
    and its place given to another call: renewing must not push the set past the limit,
    else a holder that keeps missing its renewals would exceed it again and again."""
    limits = Limits(concurrency=1)
    late = RedisLimiter(client, lease_s=0.3)
    late._renew_loop = lambda: None  # type: ignore[method-assign]  # renews only when told
    stale = late.acquire(limits, key, "late")
    assert stale.slot is not None
    other = RedisLimiter(client, lease_s=30)
    taken = wait_until(lambda: (d := other.acquire(limits, key, "other")).go and d, 5)
    assert not late.renew(stale.slot)  # its place is taken: lost
    assert client.zrange(slots_key(key), 0, -1) == [b"other"]
    release(taken.slot)
    assert late.renew(stale.slot)  # a free place: it holds a slot again
    assert client.zrange(slots_key(key), 0, -1) == [b"late"]
    release(stale.slot)


def test_a_renewal_crossing_the_release_of_its_slot_leaves_no_slot_held(
    client: redis.Redis, key: str
) -> None:
    """The call ends while its renewal is on its way: the renewal, finding the holder
    gone, must not leave it in the set (a slot nobody holds, for a whole lease)."""
    limiter = RedisLimiter(client, lease_s=30)
    call = limiter.acquire(Limits(concurrency=1), key, "a")
    assert call.slot is not None
    script = limiter._renew

    def released_first(**kw: Any) -> Any:
        release(call.slot)
        return script(**kw)

    limiter._renew = released_first  # type: ignore[assignment]
    assert not limiter.renew(call.slot)
    assert client.zcard(slots_key(key)) == 0


def test_token_window_sums_recorded_tokens(client: redis.Redis, key: str) -> None:
    limiter = RedisLimiter(client, lease_s=5)
    window = Rate(100, 60.0)
    limits = Limits(tokens=window)
    assert limiter.acquire(limits, key, "a").go
    limiter.record_tokens(window, key, 60)
    assert limiter.acquire(limits, key, "b").go
    limiter.record_tokens(window, key, 50)
    wait = limiter.acquire(limits, key, "c").wait_s
    assert 59 < wait <= 60  # until the 60 leave the window
    assert client.zcard(tokens_key(key, window)) == 2
    assert client.pttl(tokens_key(key, window)) > 60_000


def test_all_three_limits_in_one_decision(client: redis.Redis, key: str) -> None:
    limiter = RedisLimiter(client, lease_s=5)
    limits = Limits(rate=Rate(2, 60.0), concurrency=5, tokens=Rate(1000, 60.0))
    first = limiter.acquire(limits, key, "a")
    second = limiter.acquire(limits, key, "b")
    assert first.go and second.go
    third = limiter.acquire(limits, key, "c")  # the rate refuses: no slot is taken
    assert not third.go and client.zcard(slots_key(key)) == 2
    for d in (first, second):
        release(d.slot)


def test_redis_down_fails_closed_with_backoff() -> None:
    # No client-side retries (redis-py's own backoff adds ~3 s a call): the backoff under
    # test is the limiter's.
    down = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    limiter = RedisLimiter(down, lease_s=5)
    limits = Limits(rate=Rate(100, 1.0))
    waits = [limiter.acquire(limits, "k", "h").wait_s for _ in range(3)]
    assert waits == [OUTAGE_WAIT_S, OUTAGE_WAIT_S * 2, OUTAGE_WAIT_S * 4]


def test_many_waiters_for_few_slots_are_told_to_ask_less_often(
    client: redis.Redis, key: str
) -> None:
    """W waiters for N slots each ask every poll * W / N: the asks stay near N per poll."""
    limiter = RedisLimiter(client, lease_s=30, poll_s=0.2)
    limits = Limits(concurrency=2)
    held = [limiter.acquire(limits, key, f"h{i}") for i in range(2)]
    waits = [limiter.acquire(limits, key, f"x{i}", f"step-{i}").wait_s for i in range(6)]
    assert waits == pytest.approx([0.2, 0.2, 0.4, 0.4, 0.6, 0.6])
    # A waiter asking again is counted once; once served it is forgotten.
    assert limiter.acquire(limits, key, "x0", "step-0").wait_s == pytest.approx(0.6)
    release(held[0].slot)
    served = limiter.acquire(limits, key, "x0", "step-0")
    assert served.go
    assert limiter.acquire(limits, key, "x9", "step-9").wait_s == pytest.approx(0.6)
    for d in [*held[1:], served]:
        release(d.slot)


def test_a_forked_child_does_not_renew_the_slots_of_its_parent(
    client: redis.Redis, key: str
) -> None:
    """The child inherits the parent's held slots in memory: renewing one the parent
    released would put it back in Redis for as long as the child lives."""
    limiter = RedisLimiter(client, lease_s=30)
    limits = Limits(concurrency=1)
    parents = limiter.acquire(limits, key, "parent-call")
    real_pid = limiter._pid
    limiter._pid = real_pid + 1  # what a forked child sees: a pid other than the one that held
    childs = limiter.acquire(limits, f"{key}-child", "child-call")
    assert set(limiter._held) == {"child-call"}
    release(parents.slot)  # the parent's release, seen by nothing the child renews
    release(childs.slot)


def test_waiters_stay_spread_when_the_slots_lease_ends_before_their_turn(
    client: redis.Redis, key: str
) -> None:
    """Live holders renew their slots: a lease ending within a second says nothing of when
    a slot frees, so it must not call every waiter back at once (default lease 10 s,
    1,000 waiters for 3 slots: every 7 s each, some 30 asks per poll instead of 3)."""
    limiter = RedisLimiter(client, lease_s=1.0, poll_s=0.2)
    limits = Limits(concurrency=2)
    held = [limiter.acquire(limits, key, f"h{i}") for i in range(2)]
    waits = [limiter.acquire(limits, key, f"x{i}", f"step-{i}").wait_s for i in range(20)]
    assert waits == pytest.approx([0.2 * (1 + i // 2) for i in range(20)], abs=0.01)
    for d in held:
        release(d.slot)


def test_rate_waiters_are_each_told_their_own_turn(client: redis.Redis, key: str) -> None:
    """3 per 10 s, 3 started: waiters 0-2 get the places the 3 starts leave, 3-5 the ones
    after, ... and a waiter asking again keeps its turn (it is not queued behind)."""
    limiter = RedisLimiter(client, lease_s=5)
    limits = Limits(rate=Rate(3, 10.0))
    for i in range(3):
        assert limiter.acquire(limits, key, f"h{i}").go
    waits = [limiter.acquire(limits, key, f"x{i}", f"step-{i}").wait_s for i in range(9)]
    assert waits == pytest.approx([10.0] * 3 + [20.0] * 3 + [30.0] * 3, abs=0.5)
    assert limiter.acquire(limits, key, "y0", "step-0").wait_s == pytest.approx(10.0, abs=0.5)
    assert limiter.acquire(limits, key, "y5", "step-5").wait_s == pytest.approx(20.0, abs=0.5)
    assert limiter.acquire(limits, key, "z", "step-new").wait_s == pytest.approx(40.0, abs=0.5)


def test_a_local_run_counts_against_the_workers_shared_limits(
    client: redis.Redis, redis_url: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pocoflow import Flow, Node

    monkeypatch.setenv("POCOFLOW_REDIS_URL", redis_url)
    workers = RedisLimiter(client, lease_s=5)
    limits = Limits(rate=Rate(2, 60.0))
    assert all(workers.acquire(limits, key, f"w{i}").go for i in range(2))  # a worker's calls
    started: list[float] = []

    class Call(Node):
        rate_limit = "2/m"

        def limit_key(self, prep_result: object) -> str:
            return key

        def exec(self, prep_result: object) -> None:
            started.append(time.monotonic())

    handle = Flow(Call(), flow_name="local").run_background({})
    with pytest.raises(TimeoutError):
        handle.wait(timeout=2.0)  # the local call waits for the window the workers filled
    assert not started, "the local call started although the shared window was full"
    handle.cancel()  # and a cancel ends that wait
    handle.wait(timeout=10)
    assert handle.status == "cancelled" and not started


def test_a_stopped_runs_waiters_leave_every_queue_and_a_newcomer_waits_one_poll(
    client: redis.Redis, key: str
) -> None:
    """Run A's 50 items wait for the 1 slot of ``key`` (and one more step under a second
    key); A stops, its waiters are forgotten: a newcomer of run B is told to come back
    as one of the live waiters only (C's and its own: two polls), not of A's 50 too (52
    polls, 10.4 s). Only A's waiters go, under every key they joined; C's stays."""
    limiter = RedisLimiter(client, lease_s=30, poll_s=0.2)
    limits = Limits(concurrency=1)
    other_key = f"{key}-other"
    held = [limiter.acquire(limits, k, f"holder-{k}") for k in (key, other_key)]
    run_a, run_c = f"a-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
    assert limiter.acquire(limits, key, "c", f"{run_c}:0", run_c).wait_s == pytest.approx(0.2)
    waits = [limiter.acquire(limits, key, f"x{i}", f"{run_a}:3:{i}", run_a) for i in range(50)]
    assert waits[-1].wait_s == pytest.approx(0.2 * 51)
    # A waiter asking again is counted once (and recorded once).
    assert limiter.acquire(limits, key, "x0b", f"{run_a}:3:0", run_a).wait_s == pytest.approx(10.2)
    assert not limiter.acquire(limits, other_key, "s", f"{run_a}:4", run_a).go
    assert client.scard(run_waits_key(run_a)) == 51

    assert forget_waiters(client, run_a) == 51

    newcomer = limiter.acquire(limits, key, "b", "b-1:0", "b-1")
    assert newcomer.wait_s == pytest.approx(0.4)  # behind C's waiter only
    assert client.zrange(waiters_key(key), 0, -1) == [f"{run_c}:0".encode(), b"b-1:0"]
    assert client.zcard(waiters_key(other_key)) == 0
    assert not client.exists(run_waits_key(run_a))  # nothing left behind
    assert forget_waiters(client, run_a) == 0  # a second stop finds nothing to do
    for decision in held:
        release(decision.slot)


@pytest.fixture
def ledger(tmp_path: Any) -> Iterator[Any]:
    from pocoflow.db import WorkflowDB

    db = WorkflowDB(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield db
    db.close()


def _control(db: Any, redis_url: str, client: redis.Redis) -> Any:
    """A client's handle on a new running run, steering it through ``client``."""
    from pocoflow.distributed.control import RemoteControl

    run_id = f"run-{uuid.uuid4().hex[:8]}"
    db.create_run(run_id, flow_name="any")
    control = RemoteControl(
        run_id,
        db,
        redis_url=redis_url,
        publisher_factory=lambda: None,  # type: ignore[arg-type,return-value]
        lease_s=5,
    )
    control._redis = lambda: client  # type: ignore[method-assign]
    return control


@pytest.mark.parametrize("stop", ["cancel", "pause"])
def test_a_cancel_or_pause_request_takes_the_runs_waiters_out_at_once(
    client: redis.Redis, redis_url: str, ledger: Any, key: str, stop: str
) -> None:
    """What the client does as it raises the flag: no worker needs to see the stop
    first (``pocoflow cancel`` with Redis at hand)."""
    control = _control(ledger, redis_url, client)
    limiter = RedisLimiter(client, lease_s=30, poll_s=0.2)
    limits = Limits(concurrency=1)
    held = limiter.acquire(limits, key, "holder")
    for i in range(5):
        waiter = f"{control.run_id}:0:{i}"
        assert not limiter.acquire(limits, key, f"x{i}", waiter, control.run_id).go
    getattr(control, stop)()
    # A cancel purges at once; a pause only once a worker parks the run (a resume may
    # withdraw the request first: tests/ledger/test_limit_waiters.py).
    assert client.zcard(waiters_key(key)) == (0 if stop == "cancel" else 5)
    release(held.slot)


def test_a_purge_redis_does_not_answer_leaves_the_cancel_standing(
    redis_url: str, ledger: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis answers the cancel flag, then goes away before the purge: the cancel stands
    (ledger and flag), the failed purge is only a warning. With Redis gone altogether
    the purge returns at once, without raising."""
    from pocoflow.distributed.control import CANCEL, flag_key

    class GoneBeforeThePurge(redis.Redis):
        def smembers(self, name: Any) -> Any:
            raise redis.ConnectionError("Connection refused (Redis went away)")

    flaky = GoneBeforeThePurge.from_url(redis_url)
    control = _control(ledger, redis_url, flaky)
    with caplog.at_level("WARNING", logger="pocoflow.distributed.limiter"):
        control.cancel()
    assert ledger.get_run(control.run_id)["status"] == "cancelled"
    assert flaky.get(flag_key(control.run_id, CANCEL)) == b"1"
    assert "Could not take the limit waiters of run" in caplog.text
    down = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    assert forget_waiters(down, control.run_id) == 0
    flaky.close()


def test_a_cancelled_local_run_leaves_the_shared_queue_and_no_record(
    client: redis.Redis, key: str
) -> None:
    """A local run asking the shared Redis limiter (POCOFLOW_REDIS_URL) records its waits
    as a worker does: when it ends here (cancelled, as here, or done) its waiter leaves
    the queue at once, not after its turn (a whole window), and its record goes."""
    from pocoflow import Flow, Node

    shared = RedisLimiter(client, lease_s=5)
    assert shared.acquire(Limits(rate=Rate(1, 60.0)), key, "a-worker-call").go

    class Call(Node):
        rate_limit = "1/m"

        def limit_key(self, prep_result: object) -> str:
            return key

    previous = use_limiter(shared)
    try:
        handle = Flow(Call(), flow_name="local-review").run_background({})
        wait_until(lambda: client.zcard(waiters_key(key)) == 1, 10.0)
        handle.cancel()
        handle.wait(timeout=10)
    finally:
        use_limiter(previous)
    assert handle.status == "cancelled"
    # The purge runs off the run's thread (wait() is not held by Redis).
    wait_until(lambda: client.zcard(waiters_key(key)) == 0, 5.0)
    wait_until(lambda: not client.exists(run_waits_key(handle.run_id)), 5.0)
