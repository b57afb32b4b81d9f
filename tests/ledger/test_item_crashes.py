"""Map items whose delivery crashes in the executor after the claim, driven in-process on
both ledgers (``execute_step`` fans the items out, ``execute_item`` runs them, a
recording publisher instead of Celery): where the re-sent item goes, and how its crash
count is kept. The same with real workers: tests/distributed/test_executor_crashes."""

from __future__ import annotations

from typing import Any

import pytest

from pocoflow import BatchFlow, Flow, MapNode, Node, flow
from pocoflow.distributed import executor
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.distributed.itemtask import execute_item
from pocoflow.distributed.message import ItemMessage, StepMessage
from pocoflow.ledger import liveness
from tests.ledger.test_distributed_executor import LEASE_S, start

pytestmark = pytest.mark.ledger


class Recorder:
    """What the executor publishes, by message and queue, marked sent as a Publisher
    marks it."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.sent: list[tuple[StepMessage | ItemMessage, str | None]] = []

    def send(self, message: Any, *, queue: str | None = None, **_: Any) -> bool:
        self.sent.append((message, queue))
        if isinstance(message, StepMessage):
            self.db.mark_sent(message.run_id, message.step, message.attempt, task_id="t")
        return True

    def send_items(self, messages: list[ItemMessage], *, queue: str | None = None, **_: Any) -> int:
        self.sent.extend((m, queue) for m in messages)
        return len(messages)

    def revoke(self, task_id: str, **kwargs: Any) -> None:
        pass

    def take(self) -> list[tuple[Any, str | None]]:
        sent, self.sent = self.sent, []
        return sent


class OnGpu(MapNode):
    queue = "gpu"

    def prep(self, store: Any) -> list[int]:
        return [1, 2]

    def exec(self, item: int) -> int:
        return item * 10

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["results"] = results
        return "default"


@flow("items_on_gpu")
def items_on_gpu() -> Flow:
    return Flow(start=OnGpu(name="gpu_map"))


class BadLimit(OnGpu):
    rate_limit = "10/d"  # no such period


@flow("items_bad_limit")
def items_bad_limit() -> Flow:
    return Flow(start=BadLimit(name="bad_limit_map"))


@pytest.fixture
def recorder(db: Any) -> Recorder:
    return Recorder(db)


@pytest.fixture
def wctx(db: Any, recorder: Recorder) -> WorkerContext:
    return WorkerContext(db=db, publisher=recorder, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]


def fan_out(db: Any, wctx: WorkerContext, recorder: Recorder, name: str) -> list[ItemMessage]:
    first = start(db, name)
    recorder.take()
    assert execute_step(first.to_dict(), worker_id="h:1", context=wctx) == "fanned_out"
    items = [m for m, _ in recorder.take()]
    assert items and all(isinstance(m, ItemMessage) for m in items)
    return items  # type: ignore[return-value]


def test_an_item_crashing_before_its_node_is_loaded_is_sent_again_to_the_nodes_queue(
    db: Any, wctx: WorkerContext, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    item, _ = fan_out(db, wctx, recorder, "items_on_gpu")

    def broken(name: str) -> Any:
        raise RuntimeError(f"graph of {name} broke")

    monkeypatch.setattr(wctx.graphs, "get", broken)
    assert execute_item(item.to_dict(), worker_id="h:1", context=wctx) == executor.CRASHED
    [(again, queue)] = recorder.take()
    assert isinstance(again, ItemMessage) and (again.idx, again.attempt) == (item.idx, 2)
    assert queue == "gpu"


def test_item_crashes_on_one_of_two_live_workers_do_not_fail_the_run(
    db: Any, wctx: WorkerContext, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for steps: past the budget on one worker of two alive, the item is sent again;
    a crash on the other fails the run naming both, and the item's ``crashes`` counts
    what the run's error says."""
    item, _ = fan_out(db, wctx, recorder, "items_on_gpu")
    wctx.max_crashes, wctx.dead_after_s = 3, 600.0
    for worker in ("h:1", "h:2"):
        liveness.record_beat(db, worker, "h", 1)

    def broken(name: str) -> Any:
        raise RuntimeError(f"graph of {name} broke")

    monkeypatch.setattr(wctx.graphs, "get", broken)
    for _ in range(4):
        assert execute_item(item.to_dict(), worker_id="h:1", context=wctx) == executor.CRASHED
        [(item, _queue)] = recorder.take()
    row = db.get_item(item.run_id, item.step, item.idx)
    assert (row["status"], row["crashes"]) == ("queued", 4)
    assert db.get_run(item.run_id)["status"] == "running"
    assert execute_item(item.to_dict(), worker_id="h:2", context=wctx) == "failed"
    error = db.get_run(item.run_id)["error_msg"]
    assert "5 times in a row, on 2 worker process(es): h:1, h:2" in error, error
    assert db.get_item(item.run_id, item.step, item.idx)["crashes"] == 5


def test_a_process_beats_before_its_first_claim_of_a_step_or_an_item(
    db: Any, wctx: WorkerContext, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed right after its first claim must be known to the ledger, or the
    sweeper cannot find it dead and its step waits for the lease backstop (10 s, not 4)."""
    from pocoflow.distributed import liveness as process_liveness

    beaten: dict[str, bool] = {}

    def seen_at_claim(claim: Any, label: str) -> Any:
        def claiming(*args: Any, **kwargs: Any) -> Any:
            holder = kwargs.get("holder") or args[0].holder
            worker = holder.rpartition("#")[0]
            beaten[label] = worker in liveness.last_beats(db)
            return claim(*args, **kwargs)

        return claiming

    first = start(db, "items_on_gpu")
    monkeypatch.setattr(db, "claim_to_run", seen_at_claim(db.claim_to_run, "step"))
    monkeypatch.setattr(db, "claim_item", seen_at_claim(db.claim_item, "item"))
    try:
        assert execute_step(first.to_dict(), worker_id="h:s", context=wctx) == "fanned_out"
        item = next(m for m, _ in recorder.take() if isinstance(m, ItemMessage))
        assert execute_item(item.to_dict(), worker_id="h:i", context=wctx) == "committed"
    finally:
        process_liveness.stop()
    assert beaten == {"step": True, "item": True}


def test_a_map_with_a_bad_limit_fails_at_its_fan_out_naming_the_node(
    db: Any, wctx: WorkerContext, recorder: Recorder
) -> None:
    """Not item by item as executor crashes (three each, then a vague reason): the
    limit is the node's, so the node fails before any item exists, as a step's would."""
    first = start(db, "items_bad_limit")
    recorder.take()
    assert execute_step(first.to_dict(), worker_id="h:1", context=wctx) == "failed"
    assert recorder.take() == []  # no item was sent
    run = db.get_run(first.run_id)
    assert run["status"] == "failed"
    assert "'bad_limit_map'" in run["error_msg"] and "rate_limit" in run["error_msg"]
    assert db.get_items(first.run_id, 0) == []


def test_an_items_budget_check_judges_by_the_budget_a_resume_raised_since_its_claim(
    db: Any,
) -> None:
    """The claim read max_tokens=150; a resume raised it to 10,000 before the check:
    the item runs, and the run is not paused again."""
    from types import SimpleNamespace

    from pocoflow import Node
    from pocoflow.distributed.itemtask import _ItemRun

    class Spend(Node):
        def exec(self, prep_result: Any) -> None:
            self.report_usage(model="m", input_tokens=150, output_tokens=50)

    Flow(start=Spend(), db_path=db.url, run_id="budget-00000001").run({})
    db.update_run(
        "budget-00000001", status="running", max_tokens=10_000, control=None, completed_at=None
    )
    item = _ItemRun.__new__(_ItemRun)
    item.db, item.holder = db, "w#1"
    item.msg = SimpleNamespace(run_id="budget-00000001", step=0, idx=3, attempt=1)
    assert item._over_budget({"max_tokens": 150, "max_cost_usd": None}) is None
    run = db.get_run("budget-00000001")
    assert (run["status"], run["control"]) == ("running", None)
    assert "budget_exceeded" not in [e["event"] for e in db.get_events("budget-00000001")]


class Tally(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store[f"seen/{self.params['i']}"] = store["count"]
        return "default"


class TwoPasses(BatchFlow):
    parallel = True

    def prep(self, store: Any) -> list[dict[str, Any]]:
        return [{"i": 0}, {"i": 1}]


@flow("passes_schema")
def passes_schema() -> Flow:
    return Flow(start=TwoPasses(start=Tally(), flow_name="tally"), schema={"count": int})


def test_a_pass_whose_store_no_longer_fits_the_schema_is_refused_not_crashed(
    db: Any, wctx: WorkerContext, recorder: Recorder
) -> None:
    """As a step's delivery says it (a crash would come back until the crash budget):
    the run fails at once, naming the schema."""
    first = start(db, "passes_schema", {"count": 1})
    recorder.take()
    assert execute_step(first.to_dict(), worker_id="h:1", context=wctx) == "fanned_out"
    item = next(m for m, _ in recorder.take() if isinstance(m, ItemMessage))
    db._write(
        lambda conn: conn.exec_driver_sql(
            "UPDATE pf_values SET value_json = '\"three\"' WHERE key = 'count'"
        ),
        "corrupting",
        None,
    )
    assert execute_item(item.to_dict(), worker_id="h:1", context=wctx) == "refused"
    run = db.get_run(first.run_id)
    error = run["error_msg"]
    assert run["status"] == "failed"
    assert "does not fit the schema" in error and "'count'" in error, error
