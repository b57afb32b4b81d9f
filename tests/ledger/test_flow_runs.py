"""Flows recording into the ledger, on every backend: runs, resume, fork, lossless state."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal
from uuid import UUID

import pytest

from pocoflow import Flow, Node, Store
from pocoflow.db import WorkflowDB
from pocoflow.flow import RunSetupError, UnknownRunError
from tests.helpers import wait_until


class Count(Node):
    """Adds one to ``n``; fails once at ``fail_at`` when the class flag is set."""

    fail_at: int | None = None

    def prep(self, store):
        return store["n"]

    def exec(self, n):
        if n == type(self).fail_at:
            type(self).fail_at = None
            raise RuntimeError(f"boom at {n}")
        return n + 1

    def post(self, store, prep_result, result):
        store["n"] = result
        store["trail"] = [*store.get("trail", []), result]
        return "next" if result < store["until"] else "done"


def counter_flow(db_url: str) -> Flow:
    node = Count()
    node.then("next", node)
    return Flow(start=node, db_path=db_url, flow_name="count")


def test_run_records_one_checkpoint_per_node(ledger_url):
    flow = counter_flow(ledger_url)
    flow.run({"n": 0, "until": 3})
    db = WorkflowDB(ledger_url)
    run = db.get_run(flow.last_run_id)
    assert run["status"] == "completed" and run["total_steps"] == 3
    assert [c["step"] for c in db.get_checkpoints(flow.last_run_id)] == [0, 1, 2]
    assert db.load_checkpoint(flow.last_run_id, 1)["n"] == 2
    assert db.load_checkpoint(flow.last_run_id, -1)["n"] == 0  # the initial Store
    events = [e["event"] for e in db.get_events(flow.last_run_id)]
    assert events[0] == "flow_start" and events[-1] == "flow_end"
    assert events.count("node_end") == 3


def test_failed_run_resumes_from_last_checkpoint(ledger_url):
    Count.fail_at = 2
    flow = counter_flow(ledger_url)
    with pytest.raises(RuntimeError, match="boom at 2"):
        flow.run({"n": 0, "until": 5})
    run_id = flow.last_run_id
    db = WorkflowDB(ledger_url)
    assert db.get_run(run_id)["status"] == "failed"
    assert "boom at 2" in db.get_run(run_id)["error_msg"]

    store = counter_flow(ledger_url).resume(run_id)
    assert store["n"] == 5 and store["trail"] == [1, 2, 3, 4, 5]
    run = db.get_run(run_id)
    assert run["status"] == "completed" and run["total_steps"] == 5
    assert [c["step"] for c in db.get_checkpoints(run_id)] == [0, 1, 2, 3, 4]


def test_run_that_failed_at_its_first_node_resumes_from_the_initial_store(ledger_url):
    Count.fail_at = 0
    flow = counter_flow(ledger_url)
    with pytest.raises(RuntimeError, match="boom at 0"):
        flow.run({"n": 0, "until": 2})
    store = counter_flow(ledger_url).resume(flow.last_run_id)
    assert store["trail"] == [1, 2]
    assert [c["step"] for c in WorkflowDB(ledger_url).get_checkpoints(flow.last_run_id)] == [0, 1]


def test_resume_refuses_completed_unknown_and_changed_graph(ledger_url):
    flow = counter_flow(ledger_url)
    flow.run({"n": 0, "until": 1})
    with pytest.raises(RunSetupError, match="is completed"):
        flow.resume(flow.last_run_id)
    with pytest.raises(UnknownRunError, match="nope"):
        flow.resume("nope")

    Count.fail_at = 0
    with pytest.raises(RuntimeError):
        flow.run({"n": 0, "until": 2})
    other = Count()
    other.then("next", Count())  # a different graph
    with pytest.raises(RunSetupError, match="another graph"):
        Flow(start=other, db_path=ledger_url, flow_name="count").resume(flow.last_run_id)


def test_fork_starts_a_new_run_and_leaves_the_original(ledger_url):
    flow = counter_flow(ledger_url)
    flow.run({"n": 0, "until": 4})
    original = flow.last_run_id
    db = WorkflowDB(ledger_url)
    before = db.get_checkpoints(original)

    store = flow.fork(original, from_step=1)
    fork_id = flow.last_run_id
    assert fork_id != original
    assert store["trail"] == [1, 2, 3, 4]
    fork = db.get_run(fork_id)
    assert fork["status"] == "completed"
    assert fork["parent_run_id"] == original and fork["forked_from_step"] == 1
    # the fork opens with a copy of checkpoint 1, then runs steps 2 and 3 itself
    assert [c["step"] for c in db.get_checkpoints(fork_id)] == [1, 2, 3]
    assert db.get_checkpoints(original) == before

    with pytest.raises(RunSetupError, match="No checkpoint|step 9"):
        flow.fork(original, from_step=9)


def test_unchanged_values_are_not_rewritten(ledger_url):
    class Tick(Node):
        def post(self, store, prep_result, result):
            store["counter"] += 1
            return "again" if store["counter"] < 10 else "done"

    node = Tick()
    node.then("again", node)
    flow = Flow(start=node, db_path=ledger_url)
    big = "x" * 100_000
    flow.run({"blob": big, "counter": 0})
    db = WorkflowDB(ledger_url)
    assert db.count_values(flow.last_run_id, "blob") == 1
    assert db.count_values(flow.last_run_id, "counter") == 11
    restored = db.load_checkpoint(flow.last_run_id, 7)
    assert restored["blob"] == big and restored["counter"] == 8


def test_rich_values_round_trip_through_checkpoints(ledger_url):
    values = {
        "when": dt.datetime(2026, 11, 24, 8, 30, tzinfo=dt.UTC),
        "day": dt.date(2026, 1, 2),
        "price": Decimal("12.340"),
        "raw": b"\x00\xffbytes",
        "pair": (1, "a"),
        "tags": {"x", "y"},
        "id": UUID("12345678-1234-5678-1234-567812345678"),
        "nested": {"list": [1.5, None, True], "t": (dt.date(2020, 1, 1),)},
    }

    class Keep(Node):
        def post(self, store, prep_result, result):
            store["seen"] = True

    flow = Flow(start=Keep(), db_path=ledger_url)
    flow.run(Store(dict(values)))
    restored = WorkflowDB(ledger_url).load_checkpoint(flow.last_run_id, 0)
    for key, value in values.items():
        assert restored[key] == value and type(restored[key]) is type(value), key


def test_value_that_cannot_round_trip_names_the_key_and_keeps_prior_rows(ledger_url):
    class Poison(Node):
        def post(self, store, prep_result, result):
            store["handle"] = threading.Lock()
            return "x"

    first = Count()
    first.then("done", Poison())
    flow = Flow(start=first, db_path=ledger_url)
    with pytest.raises(TypeError, match="handle"):
        flow.run({"n": 0, "until": 1})
    db = WorkflowDB(ledger_url)
    assert db.load_checkpoint(flow.last_run_id, 0)["n"] == 1  # step 0 kept
    run = db.get_run(flow.last_run_id)
    assert run["status"] == "failed" and "handle" in run["error_msg"]


def test_background_run_status_and_events_from_ledger(ledger_url):
    handle = counter_flow(ledger_url).run_background({"n": 0, "until": 3})
    assert handle.wait(10)["n"] == 3
    wait_until(lambda: handle.status == "completed", timeout=5)
    assert [e["event"] for e in handle.events()].count("node_end") == 3
    assert handle.store()["n"] == 3


class Gate(Node):
    """Holds its exec until released, so a test can act while a node is running."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def exec(self, prep_result):
        self.entered.set()
        assert self.release.wait(10)

    def post(self, store, prep_result, result):
        store["gate"] = True
        return "next"


def gated_flow(ledger_url: str) -> tuple[Flow, Gate]:
    gate = Gate()
    gate.then("next", Count())
    return Flow(start=gate, db_path=ledger_url, flow_name="gated"), gate


def test_background_cancel_is_recorded_as_cancelled(ledger_url):
    flow, gate = gated_flow(ledger_url)
    ends: list[int] = []
    flow.on("flow_end", lambda steps, store: ends.append(steps))
    handle = flow.run_background({"n": 0, "until": 5})
    assert gate.entered.wait(10)
    handle.cancel()
    gate.release.set()
    assert handle.wait(10)["n"] == 0  # Count never ran
    run = WorkflowDB(ledger_url).get_run(handle.run_id)
    assert run["status"] == "cancelled" and handle.status == "cancelled"
    assert [e["event"] for e in handle.events()][-1] == "run_cancelled"
    assert ends == [1]  # flow_end fires on cancel, as in 0.2


def test_background_pause_holds_the_next_node_until_resume(ledger_url):
    flow, gate = gated_flow(ledger_url)
    handle = flow.run_background({"n": 0, "until": 1})
    assert gate.entered.wait(10)
    handle.pause()
    gate.release.set()
    db = WorkflowDB(ledger_url)
    wait_until(lambda: db.get_run(handle.run_id)["status"] == "paused", timeout=10)
    assert "run_paused" in [e["event"] for e in handle.events()]
    assert handle.store()["n"] == 0 and not handle.is_done  # Count is held back
    handle.resume()
    assert handle.wait(10)["n"] == 1
    assert db.get_run(handle.run_id)["status"] == "completed"


def test_a_pause_lets_a_running_sub_flow_finish_and_holds_the_outer_flows_next_node(
    ledger_url,
):
    """README, G4: a sub-flow keeps nothing until its outer step commits, so a pause is
    met after it (its inner nodes all run), before the outer flow's next node."""
    gate = Gate()
    gate.then("next", Count())
    inner = Flow(start=gate, flow_name="inner")
    inner.then("done", Count())
    handle = Flow(start=inner, db_path=ledger_url, flow_name="outer").run_background(
        {"n": 0, "until": 1}
    )
    assert gate.entered.wait(10)
    handle.pause()
    gate.release.set()
    db = WorkflowDB(ledger_url)
    wait_until(lambda: db.get_run(handle.run_id)["status"] == "paused", timeout=10)
    assert handle.store()["trail"] == [1] and not handle.is_done  # the inner Count ran
    handle.resume()
    assert handle.wait(10)["trail"] == [1, 2]  # the outer Count, and nothing twice
    assert db.get_run(handle.run_id)["status"] == "completed"


def test_resume_from_starts_a_new_run_at_that_node(ledger_url):
    first, second = Count(), Count()
    first.then("next", second)
    second.then("next", Count())
    flow = Flow(start=first, db_path=ledger_url)
    store = flow.run({"n": 10, "until": 12}, resume_from=second)
    assert store["trail"] == [11, 12]
    run = WorkflowDB(ledger_url).get_run(flow.last_run_id)
    assert run["status"] == "completed" and run["total_steps"] == 2


def test_fixed_run_id_reused_is_refused_and_the_first_run_kept(ledger_url):
    Flow(start=Count(), db_path=ledger_url, run_id="fixed").run({"n": 0, "until": 1})
    with pytest.raises(RunSetupError, match="'fixed' is already in the ledger"):
        Flow(start=Count(), db_path=ledger_url, run_id="fixed").run({"n": 0, "until": 1})
    assert WorkflowDB(ledger_url).get_run("fixed")["status"] == "completed"


def test_resume_reapplies_schema_and_store_name(ledger_url):
    Count.fail_at = 1
    flow = counter_flow(ledger_url)
    with pytest.raises(RuntimeError):
        flow.run(Store({"n": 0, "until": 3}, schema={"n": int}, name="counter"))
    store = counter_flow(ledger_url).resume(flow.last_run_id, schema={"n": int})
    assert store.name == "counter" and store["n"] == 3
    with pytest.raises(TypeError, match="'n'"):
        store["n"] = "three"


def test_legacy_02_checkpoint_cannot_be_resumed_blindly(ledger_url):
    db = WorkflowDB(ledger_url)
    db.create_run("old-run", "count")
    db.save_checkpoint("old-run", 0, "Count", Store({"n": 1, "until": 3}))
    db.update_run("old-run", status="failed", error_msg="boom")
    with pytest.raises(RunSetupError, match="does not record the node that runs next"):
        counter_flow(ledger_url).resume("old-run")
    assert db.get_run("old-run")["status"] == "failed"


def test_cancel_inside_a_subflow_stops_between_inner_nodes(ledger_url):
    ran: list[str] = []

    class Mark(Node):
        def post(self, store, prep_result, result):
            ran.append(self.name)
            return "next"

    inner_first = Gate()
    inner_first.then("next", Mark(name="inner2"))
    inner = Flow(start=inner_first, flow_name="inner")
    outer_first = Mark(name="outer1")
    outer_first.then("next", inner)
    inner.then("next", Mark(name="outer3"))
    handle = Flow(start=outer_first, db_path=ledger_url).run_background({})
    assert inner_first.entered.wait(10)
    handle.cancel()
    inner_first.release.set()
    handle.wait(10)
    assert ran == ["outer1"]  # neither inner2 nor outer3 ran after the cancel
    db = WorkflowDB(ledger_url)
    assert db.get_run(handle.run_id)["status"] == "cancelled"
    assert [c["step"] for c in db.get_checkpoints(handle.run_id)] == [0]


def test_attach_pauses_resumes_and_cancels_a_background_run_via_the_ledger(ledger_url):
    from pocoflow import attach

    flow, gate = gated_flow(ledger_url)
    handle = flow.run_background({"n": 0, "until": 3})
    assert gate.entered.wait(10)
    remote = attach(handle.run_id, db_url=ledger_url)  # as another process would
    remote.pause()
    gate.release.set()
    db = WorkflowDB(ledger_url)
    wait_until(lambda: db.get_run(handle.run_id)["status"] == "paused", timeout=10)
    assert remote.status == "paused" and handle.store()["n"] == 0 and not handle.is_done
    remote.resume()
    assert handle.wait(10)["n"] == 1
    assert db.get_run(handle.run_id)["status"] == "completed"
    events = [e["event"] for e in db.get_events(handle.run_id)]
    assert events.index("run_paused") < events.index("run_resumed")

    flow, gate = gated_flow(ledger_url)
    handle = flow.run_background({"n": 0, "until": 3})
    assert gate.entered.wait(10)
    attach(handle.run_id, db_url=ledger_url).cancel()
    gate.release.set()
    assert handle.wait(10)["n"] == 0  # stopped before Count
    assert handle.status == "cancelled"
    assert [e["event"] for e in db.get_events(handle.run_id)].count("run_cancelled") == 1


def test_a_run_held_by_a_ledger_pause_and_cancelled_by_its_handle_records_the_cancel(
    ledger_url,
):
    """Held before a node by another process's pause, then cancelled through its own
    handle: the cancel is this process's, so it records it (it stayed ``paused``)."""
    from pocoflow import attach

    flow, gate = gated_flow(ledger_url)
    handle = flow.run_background({"n": 0, "until": 3})
    assert gate.entered.wait(10)
    attach(handle.run_id, db_url=ledger_url).pause()
    gate.release.set()
    db = WorkflowDB(ledger_url)
    wait_until(lambda: db.get_run(handle.run_id)["status"] == "paused", timeout=10)
    handle.cancel()
    assert handle.wait(10)["n"] == 0
    assert db.get_run(handle.run_id)["status"] == "cancelled"
    assert [e["event"] for e in db.get_events(handle.run_id)].count("run_cancelled") == 1
