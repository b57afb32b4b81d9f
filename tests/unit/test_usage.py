"""report_usage, the price table, the per-attempt contextvar and budgets of local runs
without a ledger (the ledger side is in tests/ledger/test_usage_ledger.py)."""

from __future__ import annotations

import json
import threading

import pytest

import pocoflow
from pocoflow import AsyncNode, Flow, Node, usage
from pocoflow.usage import Budget, MemorySink, UsageReport, recording
from tests.helpers import wait_until
from tests.usage_nodes import Ask, Summarise, ask_then_summarise


@pytest.fixture(autouse=True)
def clean_prices(monkeypatch):
    monkeypatch.delenv(usage.PRICES_ENV, raising=False)
    usage.set_prices({}, replace=True)
    monkeypatch.setattr(usage, "_file_prices", None)
    yield
    usage.set_prices({}, replace=True)


# ── prices ────────────────────────────────────────────────────────────────────


def test_cost_from_price_table_and_given_cost_wins():
    pocoflow.set_prices({"small": {"input": 1e-6, "output": 4e-6}})
    sink = MemorySink()
    with recording("r", 0, 1, "N", sink=sink):
        priced = usage.report("N", model="small", input_tokens=1000, output_tokens=500)
        given = usage.report("N", model="small", input_tokens=1000, cost_usd=0.5)
        unknown = usage.report("N", model="mystery", input_tokens=7)
        no_model = usage.report("N", output_tokens=3)
    assert priced.cost_usd == pytest.approx(1000 * 1e-6 + 500 * 4e-6)
    assert given.cost_usd == 0.5
    assert unknown.cost_usd is None and no_model.cost_usd is None
    summary = sink.summary()
    assert summary["calls"] == 4 and summary["input_tokens"] == 2007
    assert summary["cost_usd"] == pytest.approx(0.503)  # unknown costs count 0


def test_price_file_named_by_env_and_code_prices_win(tmp_path, monkeypatch):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"a": {"input": 0.01, "output": 0.02}, "b": [0.1, 0.2]}))
    monkeypatch.setenv(usage.PRICES_ENV, str(path))
    assert usage.cost_of("a", 1, 1) == pytest.approx(0.03)
    assert usage.cost_of("b", 1, 0) == pytest.approx(0.1)
    usage.set_prices({"a": {"input": 1.0, "output": 0.0}})
    assert usage.cost_of("a", 2, 5) == pytest.approx(2.0)


def test_bad_prices_and_bad_reports_are_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="'m'"):
        usage.set_prices({"m": {"input": -1}})
    with pytest.raises(ValueError, match="'m'"):
        usage.set_prices({"m": "cheap"})

    with pytest.raises(ValueError, match="Node 'Ask'.*input_tokens"):
        usage.report("Ask", input_tokens=-1)
    with pytest.raises(ValueError, match="Node 'Ask'.*output_tokens"):
        usage.report("Ask", output_tokens=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cost_usd"):
        usage.report("Ask", cost_usd=float("nan"))


def test_an_unreadable_price_file_keeps_tokens_and_logs(tmp_path, monkeypatch, caplog):
    """The call was billed: its tokens are recorded even when pricing it fails."""
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]")
    monkeypatch.setenv(usage.PRICES_ENV, str(path))
    sink = MemorySink()
    with recording("r", 0, 1, "N", sink=sink):
        entry = usage.report("N", model="x", input_tokens=4)
    assert entry.cost_usd is None and sink.totals() == (4, 0.0)
    assert "POCOFLOW_PRICES" in caplog.text and "bad.json" in caplog.text


def test_a_thread_started_by_exec_reports_to_its_step():
    """Threads do not inherit contextvars; the node's running step is the fallback."""

    class Fan(Node):
        def exec(self, prep_result):
            workers = [
                threading.Thread(target=self.report_usage, kwargs={"input_tokens": 5})
                for _ in range(3)
            ]
            for t in workers:
                t.start()
            for t in workers:
                t.join(10)

    node = Fan()
    flow = Flow(node)
    flow.run({})
    assert flow.usage()["by_node"]["Fan"]["input_tokens"] == 15
    assert node._usage_scope is None  # nothing left behind after the step


def test_report_outside_a_step_is_not_recorded_but_returned():
    got: list[UsageReport] = []
    usage.listeners.append(got.append)
    try:
        entry = usage.report("Loose", input_tokens=3)
    finally:
        usage.listeners.remove(got.append)
    assert entry.run_id is None and entry.input_tokens == 3
    assert got == [entry]  # listeners hear every report


def test_a_failing_listener_does_not_break_exec():
    def broken(report):
        raise RuntimeError("listener down")

    usage.listeners.append(broken)
    try:
        sink = MemorySink()
        with recording("r", 0, 1, "N", sink=sink):
            usage.report("N", input_tokens=1)
    finally:
        usage.listeners.remove(broken)
    assert sink.totals() == (1, 0.0)


# ── the current attempt is per thread / task ──────────────────────────────────


def test_each_thread_records_its_own_item_on_one_node_instance():
    """Map items run one node instance's exec on many threads at once: each report must
    carry its own item, never a neighbour's (a contextvar, not a node attribute)."""
    sink = MemorySink()
    barrier = threading.Barrier(8)

    class Ask(Node):
        def exec(self, item):
            barrier.wait(timeout=10)  # every thread inside its recording at once
            self.report_usage(input_tokens=item, output_tokens=1)

    node = Ask()

    def item(i: int) -> None:
        with recording("run-1", 3, 2, node.name, item=i, sink=sink):
            node.exec(i)

    threads = [threading.Thread(target=item, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted((r.item, r.input_tokens) for r in sink.reports) == [(i, i) for i in range(8)]
    assert {(r.run_id, r.step, r.attempt, r.node_name) for r in sink.reports} == {
        ("run-1", 3, 2, "Ask")
    }


def test_items_on_pool_threads_record_their_index_through_for_item():
    """How a MapNode tags its items: pool threads find the node's running step."""
    from concurrent.futures import ThreadPoolExecutor

    class Fan(Node):
        def prep(self, store):
            return [3, 1, 2]

        def exec(self, items):
            def one(index):
                with usage.for_item(self, index):
                    self.report_usage(input_tokens=items[index])

            with ThreadPoolExecutor(3) as pool:
                list(pool.map(one, range(len(items))))

    flow = Flow(Fan())
    flow.run({})
    reports = flow._usage.reports
    assert sorted((r.item, r.input_tokens) for r in reports) == [(0, 3), (1, 1), (2, 2)]
    assert {(r.step, r.node_name) for r in reports} == {(0, "Fan")}
    with usage.for_item(Fan(), 0) as scope:
        assert scope is None  # outside a step: nothing to record to


def test_recording_without_sink_inherits_the_enclosing_one():
    sink = MemorySink()
    with recording("r", 1, 1, "Outer", sink=sink), recording("r", 1, 1, "Inner", item=4):
        usage.report("Inner", input_tokens=2)
    with recording("r", 1, 1, "Alone") as scope:
        assert scope is None  # nothing to inherit: reports are dropped
    assert [(r.node_name, r.item) for r in sink.reports] == [("Inner", 4)]
    assert usage.current() is None


# ── local runs without a ledger ───────────────────────────────────────────────


def test_usage_of_a_local_run_counts_failed_tries():
    pocoflow.set_prices({"m": {"input": 0.001, "output": 0.002}})
    Ask.fail_tries = 2
    flow = ask_then_summarise()
    flow.run({})
    Ask.fail_tries = 0
    got = flow.usage()
    assert got["by_node"]["Ask"] == {
        "calls": 3,
        "input_tokens": 30,
        "output_tokens": 15,
        "cost_usd": pytest.approx(0.06),
    }
    assert got["calls"] == 4 and got["input_tokens"] == 130 and got["output_tokens"] == 65
    assert got["cost_usd"] == pytest.approx(0.31)


def test_usage_reaches_exec_on_a_timeout_thread_and_an_async_node():
    class Timed(Node):
        timeout = 5.0

        def exec(self, prep_result):
            self.report_usage(input_tokens=1)

    class Async(AsyncNode):
        async def exec_async(self, prep_result):
            self.report_usage(input_tokens=2)

    timed = Timed()
    timed.then("default", Async())
    flow = Flow(timed)
    flow.run({})
    assert {k: v["input_tokens"] for k, v in flow.usage()["by_node"].items()} == {
        "Timed": 1,
        "Async": 2,
    }


def test_sub_flow_nodes_report_under_their_own_names():
    inner = Flow(Summarise(), flow_name="inner")
    outer = Flow(inner, flow_name="outer")
    outer.run({})
    assert set(outer.usage()["by_node"]) == {"Summarise"}


def test_budget_stops_a_foreground_run_before_its_next_node():
    flow = ask_then_summarise(max_tokens=10)
    flow.run({})
    assert Summarise.ran == 0  # Ask used 15 tokens > 10: paused before Summarise
    assert flow.usage()["input_tokens"] == 10


def test_budget_holds_a_background_run_until_resumed_with_more():
    flow = ask_then_summarise(max_cost_usd=0.0)
    pocoflow.set_prices({"m": {"input": 0.001, "output": 0.0}})
    handle = flow.run_background({})
    wait_until(lambda: handle.status == "paused", timeout=10)
    assert Summarise.ran == 0 and not handle.is_done
    handle.resume(max_cost_usd=0.005)  # still over (0.01 spent): stays paused
    wait_until(lambda: handle.status == "paused", timeout=10)
    assert Summarise.ran == 0
    handle.resume(max_cost_usd=1.0)
    handle.wait(timeout=10)
    assert Summarise.ran == 1 and handle.status == "completed"
    assert handle.usage()["calls"] == 2


def test_budget_values_are_checked():
    with pytest.raises(ValueError, match="max_tokens"):
        Flow(Ask(), max_tokens=-1)
    with pytest.raises(ValueError, match="max_cost_usd"):
        Flow(Ask(), max_cost_usd="lots")  # type: ignore[arg-type]
    budget = Budget(max_tokens=100)
    assert budget.exceeded(100, 9.0) is None
    assert "max_tokens=100" in (budget.exceeded(101, 0.0) or "")
    assert budget.raised(None, 2.0) == Budget(100, 2.0)


def test_cancel_of_a_background_run_held_by_its_budget_ends_it():
    """A run held (paused) by its budget must honour handle.cancel(): before, the loop
    checked the budget again first, paused itself anew, and wait() never returned."""
    flow = ask_then_summarise(max_tokens=10)
    handle = flow.run_background({})
    wait_until(lambda: handle.status == "paused", timeout=10)
    handle.cancel()
    handle.wait(timeout=10)
    assert handle.status == "cancelled" and Summarise.ran == 0


def test_an_unpriced_model_is_named_once_in_a_warning(caplog):
    """A model nobody priced costs $0 in totals and budgets: a run with max_cost_usd
    would never pause on it. Said once per model, not silently."""
    usage._unpriced.clear()
    sink = MemorySink()
    with caplog.at_level("WARNING", logger="pocoflow"), recording("r", 0, 1, "N", sink=sink):
        usage.report("N", model="mystery", input_tokens=7)
        usage.report("N", model="mystery", input_tokens=7)
        usage.report("N", input_tokens=7)  # no model: tokens only, nothing to price
        usage.report("N", model="other", input_tokens=7, cost_usd=0.1)  # given: priced
    warned = [r.getMessage() for r in caplog.records if "no price" in r.getMessage()]
    assert len(warned) == 1 and "'mystery'" in warned[0] and "max_cost_usd" in warned[0]
