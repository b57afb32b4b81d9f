"""The in-process run loop: routing, hooks, retries, sub-flows, background control."""

from __future__ import annotations

import logging

import pytest

from pocoflow import AsyncNode, Flow, Node, Store
from pocoflow.backoff import retry_delay
from pocoflow.graph import Graph, shape_difference


class Add(Node):
    def __init__(self, amount: int = 1, action: str = "next") -> None:
        super().__init__()
        self.amount = amount
        self.action = action

    def prep(self, store):
        return store["n"]

    def exec(self, n):
        return n + self.amount

    def post(self, store, prep_result, result):
        store["n"] = result
        return self.action


def test_unknown_action_without_wildcard_ends_flow_and_logs(caplog):
    first = Add(action="nowhere")
    first.then("next", Add())
    with caplog.at_level(logging.INFO, logger="pocoflow"):
        store = Flow(start=first).run({"n": 0})
    assert store["n"] == 1
    assert "nowhere" in caplog.text and "no successor" in caplog.text


def test_unknown_hook_event_names_the_valid_ones():
    with pytest.raises(ValueError, match="node_begin.*node_start"):
        Flow(start=Add()).on("node_begin", print)


def test_failing_hook_is_logged_not_raised(caplog):
    def broken(name, store):
        raise RuntimeError("hook bug")

    flow = Flow(start=Add()).on("node_start", broken)
    with caplog.at_level(logging.WARNING, logger="pocoflow"):
        assert flow.run({"n": 1})["n"] == 2
    assert "hook bug" in caplog.text


def test_max_steps_message_names_node_and_limit():
    loop = Add(action="again")
    loop.then("again", loop)
    with pytest.raises(RuntimeError, match=r"max_steps=3 at node 'Add'"):
        Flow(start=loop, max_steps=3).run({"n": 0})


def test_post_returning_non_str_is_a_clear_error():
    class Bad(Node):
        def post(self, store, prep_result, result):
            return 42

    with pytest.raises(TypeError, match="Bad.*must return an action str"):
        Flow(start=Bad()).run({})


class Flaky(Node):
    max_retries = 4
    retry_delay = 0.0
    retry_on = (ConnectionError,)

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.calls = 0

    def exec(self, prep_result):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return "ok"

    def post(self, store, prep_result, result):
        store["result"] = result
        return "done"


def test_retry_on_retries_listed_errors_only():
    node = Flaky(failures=2)
    assert Flow(start=node).run({})["result"] == "ok"
    assert node.calls == 3

    other = Flaky(failures=1, error=KeyError)
    with pytest.raises(KeyError):
        Flow(start=other).run({})
    assert other.calls == 1  # KeyError is not in retry_on: no second try


def test_exec_fallback_gets_the_last_error():
    class WithFallback(Flaky):
        def exec_fallback(self, prep_result, exc):
            return f"fallback after {exc}"

    node = WithFallback(failures=10)
    assert Flow(start=node).run({})["result"] == "fallback after failure 4"
    assert node.calls == 4


def test_backoff_is_exponential_capped_and_jittered():
    assert retry_delay(1, base=0.5, factor=2) == 0.5
    assert retry_delay(3, base=0.5, factor=2) == 2.0
    assert retry_delay(10, base=0.5, factor=2, maximum=3) == 3
    assert retry_delay(3, base=0.5, factor=2, jitter=0.5, rand=lambda: 1.0) == 1.0
    assert retry_delay(2, base=0.0, factor=2) == 0.0
    with pytest.raises(ValueError, match="failed_attempts"):
        retry_delay(0, base=1)


def test_backoff_sleeps_between_tries(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("pocoflow.node.time.sleep", slept.append)

    class Slow(Flaky):
        retry_delay = 0.1
        backoff_factor = 3.0

    Flow(start=Slow(failures=3)).run({})
    assert slept == pytest.approx([0.1, 0.3, 0.9])


def test_async_node_runs_inside_a_running_event_loop():
    import asyncio

    class Double(AsyncNode):
        def prep(self, store):
            return store["n"]

        async def exec_async(self, n):
            await asyncio.sleep(0)
            return n * 2

        def post(self, store, prep_result, result):
            store["n"] = result

    async def caller():
        return Flow(start=Double()).run({"n": 21})

    assert asyncio.run(caller())["n"] == 42


def test_subflow_is_a_node_and_routes_by_its_last_action():
    inner_start = Add(10, action="next")
    inner_start.then("next", Add(100, action="inner_done"))
    inner = Flow(start=inner_start, flow_name="inner")

    outer_start = Add(1, action="go")
    finish = Add(1000, action="end")
    outer_start.then("go", inner)
    inner.then("inner_done", finish)
    ends: list[str] = []
    outer = Flow(start=outer_start).on("node_end", lambda name, *rest: ends.append(name))
    assert outer.run({"n": 0})["n"] == 1111
    assert ends == ["Add", "inner", "Add"]


def test_graph_ids_are_unique_and_fingerprint_tracks_shape():
    a, b, c = Add(), Add(), Add()
    a.then("next", b)
    b.then("next", c)
    graph = Graph(a)
    assert [graph.id_of(n) for n in (a, b, c)] == ["Add", "Add#2", "Add#3"]
    before, fingerprint = graph.shape(), graph.fingerprint
    b.then("skip", a)
    changed = Graph(a)
    assert changed.fingerprint != fingerprint
    assert "Add#2" in shape_difference(before, changed.shape())


def test_store_must_be_store_or_dict():
    with pytest.raises(TypeError, match="Store or a dict"):
        Flow(start=Add()).run([1, 2])  # type: ignore[arg-type]


def test_node_without_super_init_still_wires():
    class Legacy(Node):
        def __init__(self):
            self.extra = 1  # no super().__init__(): 0.2 code in the wild does this

        def post(self, store, prep_result, result):
            store["ran"] = True
            return "done"

    first = Legacy()
    first.then("done", Add())
    assert Flow(start=first).run(Store({"n": 0}))["n"] == 1


def test_run_ids_follow_the_02_pattern(tmp_path):
    flow = Flow(start=Add(), flow_name="demo")
    flow.run({"n": 0})
    assert flow.last_run_id.startswith("demo-") and len(flow.last_run_id) == len("demo-") + 8


def test_none_action_follows_only_the_wildcard_as_in_02():
    class Quiet(Node):
        def post(self, store, prep_result, result):
            store["quiet"] = True  # returns None

    quiet = Quiet()
    quiet.then("default", Add())
    assert "n" not in Flow(start=quiet).run({})  # no "default" edge taken
    wild = Quiet()
    wild.then("*", Add())
    assert Flow(start=wild).run({"n": 0})["n"] == 1


def test_cancel_after_the_end_leaves_status_completed():
    handle = Flow(start=Add()).run_background({"n": 0})
    assert handle.wait(5)["n"] == 1
    handle.cancel()
    assert handle.status == "completed"
