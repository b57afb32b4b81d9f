"""Node limits: parsing, the in-process limiter (on an injected clock) and the gate that
local runs pass every exec try through."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from pocoflow import AsyncNode, Flow, MapNode, Node
from pocoflow.limits import (
    CONCURRENCY_POLL_S,
    Decision,
    LimitGate,
    Limits,
    LimitWait,
    LocalLimiter,
    Rate,
    acquire,
    limit_key_of,
    limits_of,
    parse_rate,
    record_tokens,
    release,
    use_limiter,
)
from pocoflow.mapnode import running_item
from tests.helpers import wait_until

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.parametrize(
    ("text", "count", "window"),
    [
        ("10/s", 10, 1.0),
        ("100/m", 100, 60.0),
        ("5/h", 5, 3600.0),
        ("5/2s", 5, 2.0),
        (" 3 / 0.5s", 3, 0.5),
    ],
)
def test_parse_rate(text: str, count: int, window: float) -> None:
    assert parse_rate(text) == Rate(count, window)


@pytest.mark.parametrize("text", ["10", "10/d", "0/s", "x/s", "10/0s", "", None, 10])
def test_parse_rate_refuses_bad_text(text: Any) -> None:
    with pytest.raises(ValueError, match="token_limit"):
        parse_rate(text, "token_limit")


def test_limits_of_names_the_node() -> None:
    class Bad(Node):
        max_concurrency = 0

    class Fine(Node):
        rate_limit = "2/s"
        token_limit = "100/m"

    assert limits_of(Node()) is None
    assert limits_of(Fine()) == Limits(rate=Rate(2, 1.0), tokens=Rate(100, 60.0))
    with pytest.raises(ValueError, match="Node 'Bad': max_concurrency"):
        limits_of(Bad())


def test_default_key_is_per_flow_and_node_and_limit_key_overrides() -> None:
    class Tenant(Node):
        def limit_key(self, prep_result: Any) -> str:
            return f"tenant-{prep_result}"

    assert limit_key_of(Node(name="call"), None, "summarise") == "summarise/call"
    assert limit_key_of(Tenant(), "a", "summarise") == "tenant-a"


def test_rate_is_a_sliding_window() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    limits = Limits(rate=Rate(2, 1.0))
    assert limiter.acquire(limits, "k", "h1").go
    clock.now += 0.4
    assert limiter.acquire(limits, "k", "h2").go
    refused = limiter.acquire(limits, "k", "h3")
    assert refused.wait_s == pytest.approx(0.6)  # until the first start leaves the window
    clock.now += 0.6
    assert limiter.acquire(limits, "k", "h3").go
    assert limiter.acquire(limits, "k", "h4").wait_s == pytest.approx(0.4)
    assert limiter.acquire(limits, "other", "h5").go  # another key, another log


def test_concurrency_slots_are_released() -> None:
    limiter = LocalLimiter(Clock())
    limits = Limits(concurrency=2)
    first, second = limiter.acquire(limits, "k", "a"), limiter.acquire(limits, "k", "b")
    assert first.slot is not None and second.slot is not None
    assert limiter.acquire(limits, "k", "c").wait_s == CONCURRENCY_POLL_S
    release(first.slot)
    assert limiter.acquire(limits, "k", "c").go


def test_token_window_admits_calls_while_under_the_limit() -> None:
    clock = Clock()
    limiter = LocalLimiter(clock)
    window = Rate(100, 60.0)
    limits = Limits(tokens=window)
    assert limiter.acquire(limits, "k", "a").go
    limiter.record_tokens(window, "k", 60)
    clock.now += 10
    limiter.record_tokens(window, "k", 50)  # 110 in the window: over
    assert limiter.acquire(limits, "k", "b").wait_s == pytest.approx(50.0)
    clock.now += 50  # the 60 left the window: 50 < 100
    assert limiter.acquire(limits, "k", "b").go


def test_acquire_release_and_record_tokens_api() -> None:
    class Llm(Node):
        max_concurrency = 1
        token_limit = "10/s"

    clock = Clock()
    limiter = LocalLimiter(clock)
    node = Llm()
    decision = acquire(node, "key", limiter=limiter)
    assert decision.go and decision.slot is not None
    assert not acquire(node, "key", limiter=limiter).go
    release(decision.slot)
    record_tokens(node, "key", 10, limiter=limiter)
    assert acquire(node, "key", limiter=limiter).wait_s == pytest.approx(1.0)
    assert acquire(Node(), "key", limiter=limiter).go  # no limits: always


def test_non_blocking_gate_raises_limit_wait() -> None:
    class Limited(Node):
        rate_limit = "1/m"

    gate = LimitGate(LocalLimiter(Clock()), "f", blocking=False)
    node = Limited()
    with gate.entered(node, None):
        pass
    with pytest.raises(LimitWait) as caught, gate.entered(node, None):
        pass
    assert caught.value.key == "f/Limited" and caught.value.wait_s == pytest.approx(60.0)


def test_each_map_item_asks_as_its_own_waiter_and_a_step_as_run_and_step() -> None:
    """A waiter's turn is kept per waiter id: the items of one map must not share one
    (they would all get turn 0 and come back at once), sync and async items alike."""
    asked: list[str | None] = []

    class Refusing(LocalLimiter):
        def acquire(
            self,
            limits: Limits,
            key: str,
            holder: str,
            waiter: str | None = None,
            run_id: str | None = None,
        ) -> Decision:
            assert run_id == "r-1"
            asked.append(waiter)
            return Decision(wait_s=1.0)

    class Items(MapNode):
        max_concurrency = 1

    class Step(Node):
        max_concurrency = 1

    gate = LimitGate(Refusing(), "f", blocking=False)
    items, step = Items(), Step()
    for node in (items, step):
        node.run_id, node.step = "r-1", 4

    async def ask_async(index: int) -> None:
        with running_item(items, index):
            async with gate.entered_async(items, index):
                pass

    for index in (0, 1):
        with pytest.raises(LimitWait), running_item(items, index), gate.entered(items, index):
            pass
    with pytest.raises(LimitWait):
        asyncio.run(ask_async(2))
    with pytest.raises(LimitWait), gate.entered(step, None):
        pass
    assert asked == ["r-1:4:0", "r-1:4:1", "r-1:4:2", "r-1:4"]


def test_gate_without_a_shared_limiter_refuses_to_run_unlimited() -> None:
    class Limited(Node):
        max_concurrency = 1

    with (
        pytest.raises(RuntimeError, match="POCOFLOW_REDIS_URL"),
        LimitGate(None, "f").entered(Limited(), None),
    ):
        pass


def test_local_run_waits_for_its_rate_limit_and_records_tokens_under_the_call_key() -> None:
    clock = Clock()
    starts: list[float] = []

    class Call(Node):
        rate_limit = "2/s"
        token_limit = "1000/m"

        def prep(self, store: Any) -> Any:
            return store["i"]

        def exec(self, prep_result: Any) -> Any:
            starts.append(clock.now)
            record_tokens(self, None, 1)
            return prep_result

        def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
            store["i"] = exec_result + 1
            return "again" if store["i"] < 5 else "done"

    call = Call()
    call.then("again", call)
    limiter = LocalLimiter(clock, clock.sleep)
    previous = use_limiter(limiter)
    try:
        Flow(call, flow_name="loop").run({"i": 0})
    finally:
        use_limiter(previous)
    assert starts == [1000.0, 1000.0, 1001.0, 1001.0, 1002.0]
    assert sum(t for _, t in limiter._tokens[("loop/Call", 60.0)]) == 5


def test_local_concurrency_across_threads() -> None:
    limiter = LocalLimiter()
    limits = Limits(concurrency=2)
    barrier = threading.Barrier(8)
    granted: list[bool] = []

    def take(i: int) -> None:
        barrier.wait()
        granted.append(limiter.acquire(limits, "k", f"h{i}").go)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted.count(True) == 2


def test_report_usage_counts_against_the_token_limit_and_holds_the_next_call() -> None:
    clock = Clock()
    starts: list[float] = []

    class Chat(Node):
        token_limit = "100/m"

        def prep(self, store: Any) -> Any:
            return store["i"]

        def exec(self, prep_result: Any) -> Any:
            starts.append(clock.now)
            self.report_usage(model="m", input_tokens=70, output_tokens=10)
            return prep_result

        def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
            store["i"] = exec_result + 1
            return "again" if store["i"] < 3 else "done"

    chat = Chat()
    chat.then("again", chat)
    limiter = LocalLimiter(clock, clock.sleep)
    previous = use_limiter(limiter)
    try:
        Flow(chat, flow_name="chat").run({"i": 0})
    finally:
        use_limiter(previous)
    # 80 tokens are under 100: the second call starts at once; 160 are not: the third
    # waits until the first call's tokens leave the minute window
    assert starts == [1000.0, 1000.0, 1060.0]


def test_async_map_items_pass_through_the_limits() -> None:
    """An async MapNode's items run on one event loop: each still asks the limiter, waits
    on the loop (not a thread), and its report_usage counts under its own key."""
    window = 0.3
    starts: list[float] = []
    in_flight: list[int] = [0, 0]  # now, most

    class Fetch(MapNode, AsyncNode):
        rate_limit = f"2/{window}s"
        max_concurrency = 1
        token_limit = "1000/m"

        def prep(self, store: Any) -> Any:
            return list(range(5))

        async def exec_async(self, item: Any) -> Any:
            starts.append(time.monotonic())
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            await asyncio.sleep(0.01)
            in_flight[0] -= 1
            self.report_usage(model="m", input_tokens=3)
            return item

        def post(self, store: Any, items: Any, results: Any) -> str:
            store["results"] = results
            return "done"

    limiter = LocalLimiter()
    previous = use_limiter(limiter)
    try:
        store = Flow(Fetch(), flow_name="fetch").run({})
    finally:
        use_limiter(previous)
    assert store["results"] == [0, 1, 2, 3, 4]
    assert in_flight[1] == 1
    # At most 2 starts in any window: start i+2 comes a window after start i.
    assert min(b - a for a, b in zip(starts, starts[2:], strict=False)) >= window * 0.95
    assert sum(t for _, t in limiter._tokens[("fetch/Fetch", 60.0)]) == 15


def _hanging_node(timeout: float, hung: threading.Event) -> Node:
    class Slow(Node):
        max_concurrency = 1

        def exec(self, prep_result: Any) -> Any:
            hung.wait(30)
            return 1

    node = Slow()
    node.timeout = timeout
    return node


def test_a_timed_out_call_keeps_its_concurrency_slot_until_it_really_ends() -> None:
    """A thread cannot be stopped: an exec abandoned at its timeout is still in flight,
    so its slot stays taken (max_concurrency holds) until the call returns."""
    hung = threading.Event()
    limiter = LocalLimiter()
    node = _hanging_node(2.0, hung)
    node._limit_gate = LimitGate(limiter, "f")
    limits = Limits(concurrency=1)
    with pytest.raises(TimeoutError):
        node._exec_once(None)
    assert not limiter.acquire(limits, "f/Slow", "other").go  # the call still runs
    hung.set()  # it returns, well before one more timeout
    freed = wait_until(lambda: limiter.acquire(limits, "f/Slow", "other"), 1.0)
    release(freed.slot)


def test_a_call_hung_for_good_gives_its_slot_back_after_one_more_timeout() -> None:
    hung = threading.Event()
    limiter = LocalLimiter()
    node = _hanging_node(0.1, hung)
    node._limit_gate = LimitGate(limiter, "f")
    try:
        with pytest.raises(TimeoutError):
            node._exec_once(None)
        freed = wait_until(lambda: limiter.acquire(Limits(concurrency=1), "f/Slow", "x"), 5)
        release(freed.slot)
    finally:
        hung.set()


def test_a_long_local_limit_wait_ends_when_the_run_is_cancelled() -> None:
    class Hourly(Node):
        rate_limit = "1/h"

        def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
            store["calls"] = store.get("calls", 0) + 1
            return "again"

    node = Hourly()
    node.then("again", node)
    previous = use_limiter(LocalLimiter())
    try:
        handle = Flow(node, flow_name="hourly", max_steps=5).run_background({})
        wait_until(lambda: handle.store().get("calls") == 1, 5)  # the 2nd call waits 1 h
        handle.cancel()
        wait_until(lambda: handle.is_done, 5)
    finally:
        use_limiter(previous)
    assert handle.status == "cancelled"


def test_a_limited_map_items_jitter_is_capped_as_a_steps_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A limit wait is stretched by at most LIMIT_JITTER_CAP_S (the limiter gives each
    waiter its own turn: 10% of a 10 s turn would leave its place unused for a second, a
    rate run below its limit). A map item waiting for its turn was stretched uncapped."""
    import random
    from types import SimpleNamespace

    from pocoflow.distributed import itemtask
    from pocoflow.distributed.executor import LIMIT_JITTER_CAP_S
    from pocoflow.distributed.message import ItemMessage
    from pocoflow.limits import LimitWait

    sent: list[float] = []
    item = itemtask._ItemRun.__new__(itemtask._ItemRun)
    item.msg = ItemMessage("r", "f", 0, "M", 3, 1, 1)
    item.claim = None
    item.db = SimpleNamespace(retry_item=lambda claim, next_try, due_in: 2)
    item.ctx = SimpleNamespace(
        publisher=SimpleNamespace(send=lambda msg, queue, countdown: sent.append(countdown))
    )
    monkeypatch.setattr(random, "random", lambda: 0.999)
    outcome = item._wait_for_limit({}, SimpleNamespace(queue=None), LimitWait("M", "k", 10.0), 1)
    assert outcome == itemtask.LIMITED
    assert 10.0 <= sent[0] <= 10.0 + LIMIT_JITTER_CAP_S


def test_the_gate_takes_a_node_whose_limits_do_not_read_so_its_step_names_it() -> None:
    """A limit that raises when read (a property checking its own value) still passes
    the node through the gate, where ``entered`` fails the step naming the node; raised
    from ``applies`` it would escape before the step, and on a worker the sweeper would
    send the step again for ever. An unlimited node does not pass through."""

    class BadLimit(Node):
        @property
        def rate_limit(self) -> str:  # type: ignore[override]
            raise ValueError("rate_limit: not a rate")

    gate = LimitGate(None, "f")
    assert gate.applies(BadLimit()) is True
    assert gate.applies(Node()) is False


class _Plain(Node):
    pass


class _Limited(Node):
    max_concurrency = 2


def test_a_graph_is_limited_when_a_node_or_a_sub_flows_inner_node_sets_a_limit() -> None:
    """What lets the commit that completes a run skip the limiter's purge: only a graph
    with a limited node, its sub-flows' nodes included, may have queued a call."""
    from pocoflow.graph import Graph

    plain = _Plain()
    plain.then("default", _Plain())
    assert not Graph(plain).limited
    limited = _Plain()
    limited.then("default", _Limited())
    assert Graph(limited).limited
    outer = _Plain()
    outer.then("default", Flow(start=_Limited()))  # the limit lives inside a sub-flow
    assert Graph(outer).limited
