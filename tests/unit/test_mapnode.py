"""MapNode in one process: item order, bounded concurrency, per-item retries, failure
policies, async exec, cancel and pause between items, nested sub-flows."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from pocoflow import AsyncNode, Flow, MapNode, Node
from pocoflow.mapnode import ItemFailed
from pocoflow.runner import RunControl
from tests import pause_maps
from tests.helpers import wait_until

WAIT_S = 10.0


class Square(MapNode):
    def prep(self, store: Any) -> Any:
        return store["numbers"]

    def exec(self, item: int) -> int:
        return item * item

    def post(self, store: Any, items: Any, results: Any) -> str:
        store["squares"] = results
        return "default"


def test_results_come_back_in_item_order() -> None:
    store = Flow(start=Square()).run({"numbers": list(range(50))})
    assert store["squares"] == [n * n for n in range(50)]


def test_an_empty_list_runs_post_with_no_results() -> None:
    assert Flow(start=Square()).run({"numbers": []})["squares"] == []


def test_prep_must_return_a_list_and_the_error_names_the_node() -> None:
    with pytest.raises(TypeError, match="MapNode 'Square'.*list of items.*got int"):
        Flow(start=Square()).run({"numbers": 3})


def test_at_most_max_parallel_items_run_at_once_and_that_many_do() -> None:
    class Overlap(MapNode):
        max_parallel = 3

        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()
            self.inflight = 0
            self.peak = 0
            self.three_in = threading.Barrier(3, timeout=WAIT_S)

        def prep(self, store: Any) -> Any:
            return list(range(9))

        def exec(self, item: int) -> int:
            with self.lock:
                self.inflight += 1
                self.peak = max(self.peak, self.inflight)
            if item < 3:
                self.three_in.wait()  # the first three must be in flight together
            with self.lock:
                self.inflight -= 1
            return item

        def post(self, store: Any, items: Any, results: Any) -> str:
            store["out"] = results
            return "default"

    node = Overlap()
    assert Flow(start=node).run({})["out"] == list(range(9))
    assert node.peak == 3


def test_a_failing_item_is_retried_on_its_own() -> None:
    calls: dict[int, int] = {}
    lock = threading.Lock()

    class Flaky(Square):
        max_retries = 3

        def exec(self, item: int) -> int:
            with lock:
                calls[item] = calls.get(item, 0) + 1
            if item == 4 and calls[item] < 3:
                raise ConnectionError("flaky")
            return item * item

    store = Flow(start=Flaky()).run({"numbers": list(range(6))})
    assert store["squares"] == [n * n for n in range(6)]
    assert calls == {0: 1, 1: 1, 2: 1, 3: 1, 4: 3, 5: 1}


def test_an_item_out_of_tries_fails_the_node_naming_its_index() -> None:
    class Broken(Square):
        max_retries = 2

        def exec(self, item: int) -> int:
            if item == 7:
                raise ValueError("bad document")
            return item

    with pytest.raises(
        ItemFailed, match=r"MapNode 'Broken': item 7 failed: ValueError: bad"
    ) as err:
        Flow(start=Broken()).run({"numbers": list(range(10))})
    assert err.value.index == 7 and isinstance(err.value.cause, ValueError)


def test_collect_puts_the_exception_in_the_item_place() -> None:
    class Collect(Square):
        on_item_error = "collect"

        def exec(self, item: int) -> int:
            if item % 2:
                raise ValueError(f"odd {item}")
            return item

    results = Flow(start=Collect()).run({"numbers": [0, 1, 2, 3]})["squares"]
    assert results[0] == 0 and results[2] == 2
    assert [str(r) for r in results[1::2]] == ["odd 1", "odd 3"]
    assert all(isinstance(r, ValueError) for r in results[1::2])


def test_a_bad_policy_is_a_clear_error() -> None:
    class Wrong(Square):
        on_item_error = "ignore"

    with pytest.raises(ValueError, match="on_item_error must be one of raise, collect"):
        Flow(start=Wrong()).run({"numbers": [1]})


def test_an_async_exec_runs_the_items_on_one_loop_bounded_by_max_parallel() -> None:
    class Fetch(MapNode, AsyncNode):
        max_parallel = 4

        def __init__(self) -> None:
            super().__init__()
            self.inflight = 0
            self.peak = 0
            self.threads: set[int] = set()

        def prep(self, store: Any) -> Any:
            return list(range(20))

        async def exec_async(self, item: int) -> int:
            self.threads.add(threading.get_ident())
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            await asyncio.sleep(0)  # let the others in
            await asyncio.sleep(0)
            self.inflight -= 1
            return -item

        def post(self, store: Any, items: Any, results: Any) -> str:
            store["out"] = results
            return "default"

    node = Fetch()
    assert Flow(start=node).run({})["out"] == [-n for n in range(20)]
    assert node.peak == 4 and len(node.threads) == 1


def test_a_cancel_stops_the_map_between_items() -> None:
    started: list[int] = []
    first_in = threading.Event()
    release = threading.Event()

    class Slow(Square):
        max_parallel = 1

        def exec(self, item: int) -> int:
            started.append(item)
            first_in.set()
            assert release.wait(WAIT_S)
            return item

    handle = Flow(start=Slow()).run_background({"numbers": list(range(5))})
    assert first_in.wait(WAIT_S)
    handle.cancel()
    release.set()
    handle.wait(timeout=WAIT_S)
    assert handle.status == "cancelled"
    assert started == [0]


def test_an_item_may_run_a_sub_flow() -> None:
    class Double(Node):
        def prep(self, store: Any) -> Any:
            return store["n"]

        def post(self, store: Any, n: Any, _: Any) -> str:
            store["n"] = n * 2
            return "default"

    class Nested(Square):
        def exec(self, item: int) -> int:
            return Flow(start=Double()).run({"n": item})["n"]

    assert Flow(start=Nested()).run({"numbers": [1, 2, 3]})["squares"] == [2, 4, 6]


def test_usage_reported_by_items_on_pool_threads_is_kept_per_item() -> None:
    class Priced(Square):
        max_parallel = 4

        def exec(self, item: int) -> int:
            self.report_usage(model="m", input_tokens=item, output_tokens=1, cost_usd=0.5)
            return item

    from pocoflow import usage

    items: list[int | None] = []
    usage.listeners.append(lambda report: items.append(report.item))
    try:
        flow = Flow(start=Priced())
        flow.run({"numbers": list(range(10))})
    finally:
        usage.listeners.pop()
    assert sorted(items, key=str) == list(range(10))  # every report names its item
    totals = flow.usage()
    assert (totals["calls"], totals["input_tokens"], totals["output_tokens"]) == (10, 45, 10)
    assert totals["cost_usd"] == 5.0 and totals["by_node"]["Priced"]["calls"] == 10


def test_an_items_exception_survives_the_ledger_as_type_and_message() -> None:
    from pocoflow.mapnode import ItemError, error_record, revive_error

    record = error_record(ValueError("bad item 3"))
    assert record == {"type": "ValueError", "message": "bad item 3", "args": ["bad item 3"]}
    del record["args"]  # a record written before args were kept
    revived = revive_error(record)
    assert type(revived) is ValueError and str(revived) == "bad item 3"

    class QuotaExceeded(Exception):
        pass

    other = revive_error(error_record(QuotaExceeded("slow down")))
    assert isinstance(other, ItemError) and other.type_name == "QuotaExceeded"
    assert str(other) == "slow down"
    # A name that is a builtin but not an exception is never called.
    assert isinstance(revive_error({"type": "print", "message": "x"}), ItemError)


def test_async_items_honour_the_default_step_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """POCOFLOW_STEP_TIMEOUT is the timeout of every node that sets none, async map items
    included."""
    monkeypatch.setenv("POCOFLOW_STEP_TIMEOUT", "0.05")

    class Stuck(MapNode, AsyncNode):
        on_item_error = "collect"

        def prep(self, store: Any) -> Any:
            return [0]

        async def exec_async(self, item: Any) -> Any:
            await asyncio.sleep(30)
            return item

        def post(self, store: Any, items: Any, results: Any) -> str:
            store["errors"] = [type(r).__name__ for r in results]
            return "done"

    assert Flow(Stuck()).run({})["errors"] == ["TimeoutError"]


@pytest.mark.parametrize(
    "exc",
    [KeyError("doc-7"), FileNotFoundError(2, "No such file", "a.txt"), ValueError("a", 1)],
    ids=["KeyError", "FileNotFoundError", "two-args"],
)
def test_a_collected_builtin_exception_comes_back_as_post_would_see_it_locally(
    exc: Exception,
) -> None:
    """On workers ``post`` gets a collected item's exception back from the ledger: a
    built-in must equal what a local run hands over (its ``args``, so ``str``, a
    KeyError's key, an OSError's errno and filename), not a copy built from ``str(exc)``
    (``KeyError("'doc-7'")``, whose ``str`` gains a second pair of quotes)."""
    import json

    from pocoflow.mapnode import error_record, revive_error

    revived = revive_error(json.loads(json.dumps(error_record(exc))))
    assert type(revived) is type(exc)
    assert revived.args == exc.args and str(revived) == str(exc)


# ── item_index: which item an exec runs (issue 7) ────────────────────────────


class Indexed(MapNode):
    """exec answers ``(item, self.item_index)`` after every item has read its index and
    before any reads it again: all the items are in flight at once on one instance."""

    max_parallel = 8

    def __init__(self) -> None:
        super().__init__()
        self.all_in = threading.Barrier(8, timeout=WAIT_S)
        self.outside: list[int | None] = []

    def prep(self, store: Any) -> Any:
        self.outside.append(self.item_index)
        return [f"item-{i}" for i in range(8)]

    def exec(self, item: str) -> tuple[str, int | None]:
        before = self.item_index
        self.all_in.wait()  # every other item set its own index meanwhile
        assert self.item_index == before
        return item, self.item_index

    def post(self, store: Any, items: Any, results: Any) -> str:
        self.outside.append(self.item_index)
        store["out"] = [list(r) for r in results]
        return "default"


def test_each_concurrent_item_reads_its_own_item_index_on_threads() -> None:
    node = Indexed()
    out = Flow(start=node).run({})["out"]
    assert out == [[f"item-{i}", i] for i in range(8)]
    assert node.outside == [None, None]  # prep and post run outside any item


def test_item_index_survives_a_timed_exec_and_reaches_the_fallback() -> None:
    """A node with a timeout runs each try on a helper thread; the fallback of a spent
    item still knows which one it is."""

    class Timed(Indexed):
        timeout = WAIT_S

        def exec(self, item: str) -> tuple[str, int | None]:
            if item == "item-5":
                raise ValueError("spent")
            return super().exec(item)

        def exec_fallback(self, item: str, exc: BaseException) -> tuple[str, int | None]:
            self.all_in.wait()
            return f"fallback {item}", self.item_index

    out = Flow(start=Timed()).run({})["out"]
    assert out[5] == ["fallback item-5", 5]
    assert [index for _, index in out] == list(range(8))


def test_each_async_item_reads_its_own_item_index_across_awaits() -> None:
    class Fetch(MapNode, AsyncNode):
        max_parallel = 8

        def prep(self, store: Any) -> Any:
            return list(range(8))

        async def exec_async(self, item: int) -> list[Any]:
            before = self.item_index
            await asyncio.sleep(0)  # the other items run and set theirs meanwhile
            await asyncio.sleep(0)
            key = f"{self.run_id}/{self.step}/{self.item_index}/{self.attempt}"
            return [item, before, self.item_index, key]

        def post(self, store: Any, items: Any, results: Any) -> str:
            store["out"] = results
            return "default"

    out = Flow(start=Fetch()).run({})["out"]
    assert [row[:3] for row in out] == [[i, i, i] for i in range(8)]
    assert out[3][3].endswith("/0/3/1")  # run id / step 0 / item 3 / attempt 1


def test_item_index_is_read_only() -> None:
    with pytest.raises(AttributeError):
        Indexed().item_index = 3  # type: ignore[misc]


def test_assigning_item_index_is_refused_naming_the_node() -> None:
    """A subclass that assigns ``self.item_index`` (a name it used for its own value)
    gets a clear error, not every item failing on a bare "property has no setter"."""

    class Assigns(MapNode):
        def prep(self, store: Any) -> Any:
            self.item_index = 0
            return [1]

    with pytest.raises(AttributeError, match=r"MapNode 'Assigns': item_index is set by PocoFlow"):
        Flow(start=Assigns()).run({})


@pytest.mark.parametrize("kind", pause_maps.KINDS)
def test_a_pause_stops_a_local_map_between_items_and_resume_runs_the_rest(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``handle.pause()`` while items run: those finish, no other item starts, and the
    run holds in the map (no ledger: ``wait_until_resumed`` tells the test it holds);
    ``resume()`` runs the items not started, each once, and the rest of the flow."""
    held = threading.Event()
    real = RunControl.wait_until_resumed

    def holding(self: RunControl, timeout: float | None = None) -> bool:
        held.set()
        return real(self, timeout)

    monkeypatch.setattr(RunControl, "wait_until_resumed", holding)
    items = pause_maps.Items()
    handle = pause_maps.build(kind, items).run_background({})
    try:
        wait_until(lambda: len(items.started) == len(pause_maps.IN_FLIGHT), WAIT_S)
        handle.pause()
        items.release.set()  # the items in flight end
        assert held.wait(WAIT_S)
        assert handle.status == "paused" and not handle.is_done
        assert sorted(items.started) == pause_maps.IN_FLIGHT  # none started after the pause

        handle.resume()
        store = handle.wait(timeout=WAIT_S)
    finally:
        items.release.set()
        handle.cancel()  # a failed check leaves no run held in a thread
    assert sorted(items.started) == list(range(pause_maps.ITEMS))  # the others, once each
    assert store.as_dict() == pause_maps.uninterrupted(kind)
    assert handle.status == "completed"
