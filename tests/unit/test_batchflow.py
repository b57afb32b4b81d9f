"""BatchFlow: a sub-flow once per param dict, sequential (one shared Store) or parallel
(each pass on a copy of the Store, merged back in pass order)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pocoflow import BatchFlow, Flow, MapNode, Node, Store, WorkflowDB
from pocoflow.batchflow import BatchPassFailed
from tests.helpers import wait_until

TIMEOUT_S = 10.0


class Record(Node):
    """Appends (its name, the pass's params) to ``store["seen"]``."""

    def prep(self, store: Any) -> Any:
        return dict(self.params)

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["seen"] = [*store.get("seen", []), [self.name, prep_result]]
        return "default"


class Docs(BatchFlow):
    def prep(self, store: Any) -> list[dict[str, Any]]:
        return [{"doc": d} for d in store["docs"]]


def two_node_batch(batch_cls: type[BatchFlow] = Docs, **attrs: Any) -> BatchFlow:
    first = Record(name="first")
    first.then("default", Record(name="second"))
    batch = batch_cls(start=first, flow_name="docs")
    for key, value in attrs.items():
        setattr(batch, key, value)
    return batch


# ── sequential ────────────────────────────────────────────────────────────────


def test_sequential_passes_run_every_node_with_their_params_in_order():
    store = two_node_batch().run({"docs": ["a", "b"]})
    assert store["seen"] == [
        ["first", {"doc": "a"}],
        ["second", {"doc": "a"}],
        ["first", {"doc": "b"}],
        ["second", {"doc": "b"}],
    ]


def test_sequential_passes_share_the_store_as_in_pocketflow():
    class Count(Node):
        def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
            store["total"] = store.get("total", 0) + self.params["n"]
            store["order"] = [*store.get("order", []), store["total"]]
            return "default"

    class Numbers(BatchFlow):
        def prep(self, store: Any) -> list[dict[str, Any]]:
            return [{"n": n} for n in (1, 2, 3)]

    assert Numbers(start=Count()).run({})["order"] == [1, 3, 6]


def test_nodes_keep_no_params_outside_a_pass():
    batch = two_node_batch()
    batch.run({"docs": ["a"]})
    assert dict(batch.start.params) == {} and dict(batch.params) == {}
    with pytest.raises(TypeError):
        batch.start.params["x"] = 1  # type: ignore[index]  # the default is read-only


def test_no_passes_and_none_run_nothing():
    class Nothing(BatchFlow):
        def prep(self, store: Any) -> None:
            return None

    assert "seen" not in two_node_batch().run({"docs": []})
    assert "seen" not in Nothing(start=Record()).run({})


@pytest.mark.parametrize(
    ("prep_result", "message"),
    [("abc", "must return a list of param dicts, got str"), ([{}, 3], "pass 1 params")],
)
def test_prep_must_return_param_dicts(prep_result: Any, message: str):
    class Bad(BatchFlow):
        def prep(self, store: Any) -> Any:
            return prep_result

    with pytest.raises(TypeError, match=message):
        Bad(start=Record(), flow_name="bad").run({})


@pytest.mark.parametrize("parallel", [False, True])
def test_a_failing_pass_names_batch_index_params_and_node(parallel: bool):
    class Boom(Node):
        def exec(self, prep_result: Any) -> None:
            if self.params["doc"] == "bad":
                raise ValueError("cannot read")

    batch = Docs(start=Boom(name="reader"), flow_name="docs")
    batch.parallel = parallel
    with pytest.raises(BatchPassFailed) as info:
        batch.run({"docs": ["ok", "bad", "ok2"]})
    error = info.value
    assert (error.index, error.params) == (1, {"doc": "bad"})
    assert isinstance(error.cause, ValueError)
    assert str(error) == (
        "BatchFlow 'docs': pass 1 (params {'doc': 'bad'}) failed at node 'reader': "
        "ValueError: cannot read"
    )


# ── parallel ──────────────────────────────────────────────────────────────────


class Meet(Node):
    """Every pass waits in exec until all have arrived: proves the passes overlap, and
    that each still reads its own params afterwards from the shared node object."""

    barrier: threading.Barrier

    def prep(self, store: Any) -> Any:
        return self.params["doc"]

    def exec(self, prep_result: Any) -> Any:
        self.barrier.wait(TIMEOUT_S)
        return prep_result, self.params["doc"], self.step, self.run_id

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store[f"out/{self.params['doc']}"] = list(exec_result)
        return "default"


def test_parallel_passes_overlap_and_each_sees_its_own_params():
    docs = [f"d{i}" for i in range(6)]
    meet = Meet(name="meet")
    meet.barrier = threading.Barrier(len(docs))
    batch = Docs(start=meet, flow_name="docs")
    batch.parallel = True
    store = batch.run({"docs": docs})
    run_id = batch.last_run_id
    for doc in docs:  # prep's, exec's (after the barrier) and post's params agree
        assert store[f"out/{doc}"] == [doc, doc, 0, run_id]
    assert dict(meet.params) == {} and meet.step is None  # the shared node is untouched


def test_parallel_passes_run_at_most_max_parallel_at_once():
    lock = threading.Lock()
    running, peak = [0], [0]

    class Track(Node):
        def exec(self, prep_result: Any) -> None:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            wait_until(lambda: peak[0] >= 2, TIMEOUT_S)
            with lock:
                running[0] -= 1

    batch = Docs(start=Track())
    batch.parallel, batch.max_parallel = True, 2
    batch.run({"docs": list("abcdef")})
    assert peak[0] == 2


class Write(Node):
    """Each pass: reads ``base``, sets ``last`` and ``out/<doc>``, appends to ``log`` in
    place, and the pass of doc ``del`` deletes ``gone``."""

    def prep(self, store: Any) -> Any:
        return store["base"]

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        doc = self.params["doc"]
        store["base_seen"] = prep_result
        store[f"out/{doc}"] = doc.upper()
        store["last"] = doc
        store["log"].append(doc)  # in place: no store write
        store["base"] = f"changed by {doc}"
        if doc == "del":
            del store["gone"]
        return "default"


def test_parallel_passes_see_the_store_from_before_and_merge_in_pass_order():
    batch = Docs(start=Write())
    batch.parallel = True
    store = batch.run({"docs": ["x", "del", "y"], "base": 0, "log": [], "gone": 1})
    assert store.as_dict() == {
        "docs": ["x", "del", "y"],
        "base": "changed by y",  # last pass wins
        "base_seen": 0,  # every pass read the Store as it was before the batch
        "out/x": "X",
        "out/del": "DEL",
        "out/y": "Y",
        "last": "y",
        "log": ["y"],  # in-place changes merge like writes: last pass wins
    }


def test_parallel_merge_goes_through_the_store_schema_and_observers():
    seen: list[tuple[str, Any]] = []
    batch = Docs(start=Write())
    batch.parallel = True
    store = Store({"docs": ["x", "y"], "base": 0, "log": [], "gone": 1}, schema={"last": str})
    store.add_observer(lambda key, old, new: seen.append((key, new)))
    batch.run(store)
    assert [new for key, new in seen if key == "last"] == ["x", "y"]  # in pass order
    assert ("gone", 1) not in seen and "gone" in store  # no pass deleted it

    class WrongType(Node):
        def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
            store["last"] = 5
            return "default"

    with pytest.raises(BatchPassFailed, match="TypeError"):
        Docs(start=WrongType(), flow_name="typed").run(store)


# ── nesting ───────────────────────────────────────────────────────────────────


class Summarise(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["summary"] = sorted(k for k in store if k.startswith("out/"))
        return "default"


class Start(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["docs"] = ["a", "b", "c"]
        return "default"


def outer_flow(db_path: str | None = None, parallel: bool = True) -> Flow:
    batch = Docs(start=Write(name="write"), flow_name="per_doc")
    batch.parallel = parallel
    start = Start()
    start.then("default", batch)
    batch.then("default", Summarise())
    return Flow(start=start, db_path=db_path, flow_name="outer")


@pytest.mark.parametrize("parallel", [False, True])
def test_a_batch_is_one_step_of_an_outer_flow_in_its_ledger(tmp_path, parallel: bool):
    db_path = str(tmp_path / "ledger.db")
    flow = outer_flow(db_path, parallel)
    store = flow.run({"base": 0, "log": [], "gone": 1})
    assert store["summary"] == ["out/a", "out/b", "out/c"]
    assert store["log"] == (["c"] if parallel else ["a", "b", "c"])
    db = WorkflowDB(db_path)
    run_id = flow.last_run_id
    assert db.get_run(run_id)["status"] == "completed"
    checkpoints = db.get_checkpoints(run_id)
    assert [(c["step"], c["node_name"]) for c in checkpoints] == [
        (0, "Start"),
        (1, "per_doc"),
        (2, "Summarise"),
    ]
    assert db.load_checkpoint(run_id, 1)["out/b"] == "B"
    ends = [e["node_name"] for e in db.get_events(run_id) if e["event"] == "node_end"]
    assert ends == ["Start", "per_doc", "Summarise"]  # inner nodes are not outer steps


def test_a_batch_run_on_its_own_is_a_one_step_run(tmp_path):
    db_path = str(tmp_path / "ledger.db")
    batch = Docs(start=Write(), db_path=db_path, flow_name="per_doc")
    batch.parallel = True
    store = batch.run({"docs": ["a", "b"], "base": 0, "log": [], "gone": 1})
    db = WorkflowDB(db_path)
    run = db.get_run(batch.last_run_id)
    assert run["status"] == "completed" and run["total_steps"] == 1
    assert db.load_checkpoint(batch.last_run_id, 0).as_dict() == store.as_dict()


def test_nested_batches_merge_params_and_subflows_get_them():
    class Inner(BatchFlow):
        def prep(self, store: Any) -> list[dict[str, Any]]:
            return [{"page": p} for p in (1, 2)]

    class Outer(BatchFlow):
        def prep(self, store: Any) -> list[dict[str, Any]]:
            return [{"doc": d} for d in ("a", "b")]

    sub = Flow(start=Record(name="in_sub"), flow_name="sub")
    inner = Inner(start=sub)
    outer = Outer(start=inner)
    assert outer.run({})["seen"] == [
        ["in_sub", {"doc": "a", "page": 1}],
        ["in_sub", {"doc": "a", "page": 2}],
        ["in_sub", {"doc": "b", "page": 1}],
        ["in_sub", {"doc": "b", "page": 2}],
    ]


def test_a_parallel_batch_of_subflows_and_mapnodes_keeps_params_per_pass():
    class PerPage(MapNode):
        max_parallel = 3

        def prep(self, store: Any) -> list[int]:
            return [1, 2, 3]

        def exec(self, item: int) -> str:
            return f"{self.params['doc']}{item}"

        def post(self, store: Any, items: Any, results: list[str]) -> str:
            store[f"pages/{self.params['doc']}"] = results
            return "default"

    sub = Flow(start=PerPage(), flow_name="sub")
    batch = Docs(start=sub)
    batch.parallel = True
    store = batch.run({"docs": ["a", "b", "c", "d"]})
    for doc in "abcd":
        assert store[f"pages/{doc}"] == [f"{doc}1", f"{doc}2", f"{doc}3"]


# ── control ───────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("parallel", [False, True])
def test_cancel_stops_the_batch_between_passes(parallel: bool):
    release = threading.Event()
    started: list[str] = []

    class Hold(Node):
        def exec(self, prep_result: Any) -> None:
            started.append(self.params["doc"])
            if self.params["doc"] == "a":
                release.wait(TIMEOUT_S)

    batch = Docs(start=Hold())
    batch.parallel, batch.max_parallel = parallel, 1
    handle = batch.run_background({"docs": ["a", "b", "c"]})
    wait_until(lambda: started, TIMEOUT_S)
    handle.cancel()
    release.set()
    handle.wait(TIMEOUT_S)
    assert handle.status == "cancelled"
    assert started == ["a"]


@pytest.mark.parametrize("try_number", [None, 1])
def test_a_subflow_step_runs_its_inner_graph_on_the_workers_path_too(try_number: int | None):
    """The distributed executor runs a step with ``try_number`` (one exec try per task):
    a Flow or BatchFlow node has no exec of its own, so it must still run whole."""
    from pocoflow.hooks import Hooks
    from pocoflow.step import run_step

    batch = Docs(start=Write(), flow_name="per_doc")
    batch.parallel = True
    store = Store({"docs": ["a", "b"], "base": 0, "log": [], "gone": 1})
    done = run_step(batch, store, step=3, hooks=Hooks(), run_id="r-1", try_number=try_number)
    assert done.action == "default"
    assert (store["out/a"], store["out/b"], store["last"]) == ("A", "B", "b")


def test_a_failed_parallel_batch_merges_nothing():
    class FailLast(Write):
        def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
            super().post(store, prep_result, exec_result)
            if self.params["doc"] == "z":
                raise RuntimeError("late failure")
            return "default"

    batch = Docs(start=FailLast())
    batch.parallel = True
    store = Store({"docs": ["x", "z"], "base": 0, "log": [], "gone": 1})
    with pytest.raises(BatchPassFailed, match="pass 1"):
        batch.run(store)
    assert store.as_dict() == {"docs": ["x", "z"], "base": 0, "log": [], "gone": 1}


@pytest.mark.parametrize("parallel", [False, True])
def test_post_gets_every_pass_params_and_picks_the_action(parallel: bool):
    class Routed(Docs):
        def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
            store["post_got"] = [prep_result, exec_result]
            return "done"

    batch = Routed(start=Record())
    batch.parallel = parallel
    batch.params = {"tenant": "t1"}  # as an enclosing batch would set it
    end = Record(name="end")
    batch.then("done", end)
    store = Flow(start=batch).run({"docs": ["a", "b"]})
    assert store["post_got"] == [[{"tenant": "t1", "doc": "a"}, {"tenant": "t1", "doc": "b"}], None]
    assert store["seen"][-1] == ["end", {}]


def test_parallel_passes_are_json_map_items_an_executor_can_run_anywhere():
    """What a distributed map needs: prep gives JSON items; an item runs on a fresh
    BatchPasses bound to the step's input Store (another process); post merges."""
    import json

    from pocoflow.batchflow import BatchPasses

    batch = Docs(start=Write(), flow_name="per_doc")
    before = {"docs": ["x", "del", "y"], "base": 0, "log": [], "gone": 1}
    items = json.loads(json.dumps(BatchPasses(batch).prep(Store(before))))
    assert items[1] == {"index": 1, "params": {"doc": "del"}}
    results = []
    for item in reversed(items):  # any order, any process
        worker_side = BatchPasses(batch)
        worker_side.bind(Store(before))
        results.insert(0, json.loads(json.dumps(worker_side.exec(item))))
    assert results[1] == {
        "set": {
            "base_seen": 0,
            "out/del": "DEL",
            "last": "del",
            "log": ["del"],
            "base": "changed by del",
        },
        "deleted": ["gone"],
    }
    store = Store(before)
    assert BatchPasses(batch).post(store, items, results) == "default"
    assert (store["last"], store["log"], "gone" in store) == ("y", ["y"], False)


class Overlap(Node):
    """Counts the passes inside its exec at once (the most seen in ``peak``)."""

    lock = threading.Lock()
    inside = 0
    peak = 0

    def exec(self, prep_result: Any) -> None:
        with Overlap.lock:
            Overlap.inside += 1
            Overlap.peak = max(Overlap.peak, Overlap.inside)
        threading.Event().wait(0.2)  # long enough for the other threads to start
        with Overlap.lock:
            Overlap.inside -= 1


def test_a_parallel_batchs_max_concurrency_holds_its_passes_locally_too():
    """As on workers (and as a MapNode's): max_parallel threads, max_concurrency passes."""
    peaks = []
    for concurrency in (None, 1):
        Overlap.inside = Overlap.peak = 0
        batch = Docs(start=Overlap(), flow_name="docs")
        batch.parallel, batch.max_parallel, batch.max_concurrency = True, 4, concurrency
        batch.run({"docs": [f"d{i}" for i in range(4)]})
        peaks.append(Overlap.peak)
    assert peaks[0] >= 2 and peaks[1] == 1, peaks  # side by side, then one at a time
