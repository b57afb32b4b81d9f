"""A local run's MapNode keeps each finished item in the ledger (``pf_items``), on SQLite
and PostgreSQL: a process killed with kill -9 mid fan-out, resumed with ``Flow.resume``,
runs only the items that had not finished (threads and asyncio maps) and ends with the
Store of an uninterrupted run; a failed item runs again with all its tries; a changed
item is not taken from the earlier attempt; and the ledger calls underneath."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from pocoflow import BatchFlow, Flow, MapNode, Node, codec, itemlog
from pocoflow.db import WorkflowDB
from tests.helpers import wait_until
from tests.ledger import local_map_kill_flows as kill_flows
from tests.ledger.local_map_kill_flows import FINISHING, ITEMS, build

pytestmark = pytest.mark.ledger

MAP_STEP = 1  # start (0) -> upper (1) -> end (2)


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_a_local_map_killed_with_kill_9_resumes_running_only_unfinished_items(
    ledger_url: str, tmp_path: Path, kind: str
) -> None:
    side = tmp_path / "side"
    run_id = f"local_map_{kind}-0000dead"
    proc = kill_flows.start_blocked(ledger_url, kind, run_id, side)
    db = WorkflowDB(ledger_url)
    try:
        try:
            # Items before FINISHING are kept as they end; the others block, in flight.
            wait_until(
                lambda: (
                    len(db.kept_items(run_id, MAP_STEP)) >= FINISHING
                    and max(kill_flows.ran_by(side).get(proc.pid, [0])) >= FINISHING
                ),
                60,
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            output = proc.communicate(timeout=30)[0]
        assert proc.returncode == -signal.SIGKILL, output
        assert db.get_run(run_id)["status"] == "running"  # nobody could record the end
        assert [c["step"] for c in db.get_checkpoints(run_id)] == [0]  # the map never ended
        kept = db.kept_items(run_id, MAP_STEP)
        assert [r["idx"] for r in kept] == list(range(FINISHING))
        in_flight = set(kill_flows.ran_by(side)[proc.pid]) - set(range(FINISHING))
        assert in_flight  # the kill caught items running, not a finished map

        (side / "block").unlink()
        store = build(ledger_url, kind).resume(run_id)

        ran = kill_flows.ran_by(side)
        assert sorted(ran[os.getpid()]) == list(range(FINISHING, ITEMS))  # only unfinished
        assert sorted(ran[proc.pid])[:FINISHING] == list(range(FINISHING))  # once each
        clean = build(None, kind).run({"side": str(side)})
        assert store.as_dict() == clean.as_dict()
        assert store["upper"] == [f"{i}:W{i}" for i in range(ITEMS)]  # in item order
        assert db.get_run(run_id)["status"] == "completed"
        rows = db.get_items(run_id, MAP_STEP)
        assert [(r["idx"], r["status"]) for r in rows] == [(i, "done") for i in range(ITEMS)]
        assert db.load_checkpoint(run_id, 2).as_dict() == clean.as_dict()
    finally:
        db.close()


# ── in-process: what a resume takes and what it runs again ─────────────────────


class Flaky(MapNode):
    """Squares its items (0..5 unless given); item ``i`` fails its next ``fail_times[i]``
    tries; every try is counted in ``tries``. ``crash``: post raises, standing for a
    process that dies after the map and before the step's commit."""

    max_parallel = 2
    max_retries = 2

    def __init__(self, fail_times: dict[int, int], items: list[int] | None = None) -> None:
        super().__init__(name="flaky")
        self.fail_times = dict(fail_times)
        self.items = items if items is not None else list(range(6))
        self.tries: list[int] = []
        self.crash = False

    def prep(self, store: Any) -> list[int]:
        return self.items

    def exec(self, item: int) -> Any:
        self.tries.append(item)
        if self.fail_times.get(item, 0) > 0:
            self.fail_times[item] -= 1
            raise ValueError(f"item {item} is flaky")
        return Opaque() if item < 0 else item * item

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        if self.crash:
            raise RuntimeError("crash after the map")
        store["squares"] = [r if not isinstance(r, Opaque) else "opaque" for r in results]
        return "default"


class Opaque:
    """Not registered with the codec: a result that cannot be kept (G7)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)


def _flow(ledger_url: str | None, node: MapNode) -> Flow:
    return Flow(start=node, db_path=ledger_url, flow_name="flaky")


def _kept(ledger_url: str, run_id: str | None, step: int = 0) -> list[int]:
    assert run_id is not None
    return [r["idx"] for r in WorkflowDB(ledger_url).kept_items(run_id, step)]


def test_a_collected_item_error_is_not_kept_and_runs_again_with_all_its_tries(
    ledger_url: str,
) -> None:
    node = Flaky(fail_times={2: 2, 4: 2})
    node.on_item_error, node.crash = "collect", True
    flow = _flow(ledger_url, node)
    with pytest.raises(RuntimeError, match="crash after the map"):
        flow.run({})
    assert sorted(node.tries) == [0, 1, 2, 2, 3, 4, 4, 5]  # two tries each failing item
    assert _kept(ledger_url, flow.last_run_id) == [0, 1, 3, 5]

    # On the resume item 4 fails once more: its second try (of two) is still there.
    node.fail_times, node.tries, node.crash = {4: 1}, [], False
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert sorted(node.tries) == [2, 4, 4]
    assert store["squares"] == [0, 1, 4, 9, 16, 25]
    assert _kept(ledger_url, flow.last_run_id) == list(range(6))


def test_an_item_that_failed_its_run_runs_again_and_the_finished_ones_do_not(
    ledger_url: str,
) -> None:
    node = Flaky(fail_times={3: 2})
    node.max_parallel = 1  # in order: 0, 1, 2 finish, 3 fails the node, 4 and 5 never start
    flow = _flow(ledger_url, node)
    with pytest.raises(Exception, match="item 3 failed"):
        flow.run({})
    assert node.tries == [0, 1, 2, 3, 3]
    node.tries = []
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert node.tries == [3, 4, 5]
    assert store["squares"] == [0, 1, 4, 9, 16, 25]


def test_a_kept_result_is_taken_only_for_the_same_item(ledger_url: str) -> None:
    node = Flaky(fail_times={5: 2})
    flow = _flow(ledger_url, node)
    with pytest.raises(Exception, match="item 5 failed"):
        flow.run({})
    assert _kept(ledger_url, flow.last_run_id) == [0, 1, 2, 3, 4]
    # The resume's prep returns other items at 1 and 3, and one item fewer.
    node.items, node.tries = [0, 7, 2, 8, 4], []
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert sorted(node.tries) == [7, 8]
    assert store["squares"] == [0, 49, 4, 64, 16]
    rows = WorkflowDB(ledger_url).kept_items(flow.last_run_id, 0)  # type: ignore[arg-type]
    assert [(r["idx"], r["item_json"], r["result_json"]) for r in rows] == [
        (i, _digest(item), str(item * item)) for i, item in enumerate([0, 7, 2, 8, 4])
    ]


def _digest(item: Any) -> str:
    """What a row keeps of its item: a digest of its codec text, not the text."""
    return itemlog.digest(codec.encode(item, key="item"))


def test_a_result_the_codec_cannot_carry_is_not_kept_and_runs_again(
    ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    node = Flaky(fail_times={}, items=[0, -1, 2])
    node.crash = True
    flow = _flow(ledger_url, node)
    with caplog.at_level(logging.WARNING, logger="pocoflow"), pytest.raises(RuntimeError):
        flow.run({})
    assert "item 1 is not kept in the ledger" in caplog.text
    assert _kept(ledger_url, flow.last_run_id) == [0, 2]
    node.tries, node.crash = [], False
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert node.tries == [-1]  # only the item that was not kept ran again
    assert store["squares"] == [0, "opaque", 4]


class Seeing(Flaky):
    """Flaky, noting the item log its step had (None: none) when prep ran."""

    def prep(self, store: Any) -> list[int]:
        self.seen = itemlog.CURRENT.get()
        return super().prep(store)


def test_a_map_writes_a_row_per_finished_item_and_only_with_a_ledger(
    ledger_url: str,
) -> None:
    node = Seeing(fail_times={})
    flow = _flow(ledger_url, node)
    flow.run({})
    assert node.seen is not None and node.seen.run_id == flow.last_run_id
    rows = WorkflowDB(ledger_url).get_items(flow.last_run_id, 0)  # type: ignore[arg-type]
    assert [(r["idx"], r["result_json"], r["status"]) for r in rows] == [
        (i, str(i * i), "done") for i in range(6)
    ]
    plain = Seeing(fail_times={})
    assert _flow(None, plain).run({})["squares"] == [0, 1, 4, 9, 16, 25]
    assert plain.seen is None  # no ledger: no log, no rows, nothing read or written


def test_inner_nodes_of_a_sub_flow_keep_nothing(ledger_url: str) -> None:
    """An inner node's step numbers are the sub-flow's own, not the run's: its items
    must not land under the outer run's step."""
    inner = Seeing(fail_times={})
    outer = Flow(start=Flow(start=inner, flow_name="sub"), db_path=ledger_url, flow_name="outer")
    assert outer.run({})["squares"] == [0, 1, 4, 9, 16, 25]
    assert WorkflowDB(ledger_url).get_items(outer.last_run_id, 0) == []  # type: ignore[arg-type]
    assert inner.seen is None


# ── the ledger calls ────────────────────────────────────────────────────────────

RUN = "r1"


@pytest.fixture
def run_db(db: WorkflowDB) -> WorkflowDB:
    db.create_run(RUN, "f", initial_store={}, status="running")
    return db


def test_keep_items_writes_a_row_once_per_item_and_index(run_db: WorkflowDB) -> None:
    db = run_db
    db.keep_items(RUN, 3, [(2, '"c"', '"C"'), (0, '"a"', '"A"')])
    db.keep_items(RUN, 3, [(0, '"a"', '"other"'), (1, '"b"', '"B"')])  # 0 is kept already
    db.keep_items(RUN, 3, [(2, '"d"', '"D"')])  # another item at 2: it replaces the row
    db.keep_items(RUN, 3, [])
    rows = db.get_items(RUN, 3)
    assert [(r["idx"], r["item_json"], r["result_json"], r["status"]) for r in rows] == [
        (0, '"a"', '"A"', "done"),
        (1, '"b"', '"B"', "done"),
        (2, '"d"', '"D"', "done"),
    ]
    assert all(r["lease_owner"] is None and r["error_json"] is None for r in rows)
    assert db.get_items(RUN, 4) == [] and db.get_join(RUN, 3) is None  # no join row


def test_kept_items_reads_a_steps_results_in_order_and_drop_items_from_forgets_a_tail(
    run_db: WorkflowDB,
) -> None:
    db = run_db
    db.keep_items(RUN, 0, [(i, str(i), str(i * 10)) for i in range(4)])
    db.keep_items(RUN, 1, [(0, "9", "90")])
    assert [(r["idx"], r["result_json"]) for r in db.kept_items(RUN, 0)] == [
        (0, "0"),
        (1, "10"),
        (2, "20"),
        (3, "30"),
    ]
    assert db.drop_items_from(RUN, 0, 2) == 2
    assert db.drop_items_from(RUN, 0, 7) == 0
    assert [r["idx"] for r in db.kept_items(RUN, 0)] == [0, 1]
    assert [r["idx"] for r in db.kept_items(RUN, 1)] == [0]  # another step untouched


def test_kept_items_skips_rows_without_a_result(run_db: WorkflowDB) -> None:
    """A distributed fan-out's unfinished or errored rows are no kept results."""
    db = run_db
    db.insert_step(RUN, 0, "M", lease_s=10.0)
    assert db.claim_step(RUN, 0, 1, "w0", 10.0, holder="w0#1")
    assert db.fan_out(RUN, 0, 1, "w0#1", "w0", ['"a"', '"b"'], [])
    assert db.kept_items(RUN, 0) == []


def test_keep_items_for_an_unknown_run_names_it(db: WorkflowDB) -> None:
    with pytest.raises(KeyError, match="nope"):
        db.keep_items("nope", 0, [(0, "1", "2")])


def test_a_log_left_by_a_step_whose_prep_failed_serves_no_other_run(ledger_url: str) -> None:
    node = Seeing(fail_times={}, items="not a list")  # type: ignore[arg-type]
    flow = _flow(ledger_url, node)
    with pytest.raises(TypeError, match="must return a list"):
        flow.run({})
    assert node.seen is not None
    assert itemlog.CURRENT.get() is None  # the step's log ended with its step
    node.items = list(range(6))
    assert _flow(None, node).run({})["squares"] == [0, 1, 4, 9, 16, 25]  # no ledger
    assert node.seen is None
    assert WorkflowDB(ledger_url).get_items(flow.last_run_id, 0) == []  # type: ignore[arg-type]


# ── review of the first version: what broke, and stays fixed ────────────────────


def _crashed_run(ledger_url: str, node: Flaky) -> Flow:
    """A run whose map finished and kept its items, then died before the step's commit."""
    node.crash = True
    flow = _flow(ledger_url, node)
    with pytest.raises(RuntimeError, match="crash after the map"):
        flow.run({})
    node.crash, node.tries = False, []
    return flow


def test_a_resume_takes_kept_results_of_the_same_items_in_another_order(
    ledger_url: str,
) -> None:
    """``list(set(...))`` under another PYTHONHASHSEED: the same items, another order."""
    node = Flaky(fail_times={}, items=[3, 1, 4, 1, 5])
    flow = _crashed_run(ledger_url, node)
    node.items, node.crash = [5, 1, 1, 4, 3], True
    with pytest.raises(RuntimeError, match="crash after the map"):
        flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert node.tries == []  # every item was kept, whatever its index now
    rows = WorkflowDB(ledger_url).get_items(flow.last_run_id, 0)  # type: ignore[arg-type]
    # The rows follow the new order: a later resume finds each at its own index.
    assert [(r["idx"], r["item_json"], r["result_json"]) for r in rows] == [
        (i, _digest(item), str(item * item)) for i, item in enumerate(node.items)
    ]
    node.crash = False
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert node.tries == []
    assert store["squares"] == [25, 1, 1, 16, 9]


def test_a_resume_over_more_stale_rows_than_a_statement_takes_parameters(
    ledger_url: str,
) -> None:
    """70,000 kept rows whose items all changed (PostgreSQL takes 65,535 parameters a
    statement, SQLite 32,766): the resume runs, its 3 items run, the stale rows go."""
    node = Flaky(fail_times={}, items=[0, 1, 2])
    flow = _crashed_run(ledger_url, node)
    run_id = flow.last_run_id
    assert run_id is not None
    db = WorkflowDB(ledger_url)
    stale = 70_000
    db.keep_items(run_id, 0, [(i, f'"old {i}"', "0") for i in range(3, stale)])
    db._write(  # the kept rows of 0..2 stale too: their items changed
        lambda conn: conn.execute(
            text("UPDATE pf_items SET item_json = 'changed' WHERE run_id = :r"), {"r": run_id}
        ),
        "test",
        run_id,
    )
    store = flow.resume(run_id)
    assert sorted(node.tries) == [0, 1, 2]
    assert store["squares"] == [0, 1, 4]
    assert [r["idx"] for r in db.get_items(run_id, 0)] == [0, 1, 2]
    assert db.get_run(run_id)["status"] == "completed"


def test_a_failed_item_write_does_not_fail_a_map_that_finished(
    ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real write failure (a trigger refuses every pf_items row): the run completes
    (its step checkpoint is what counts), the loss is a warning, nothing is kept."""
    db = WorkflowDB(ledger_url)
    _refuse_item_rows(db)
    node = Flaky(fail_times={})
    flow = _flow(ledger_url, node)
    with caplog.at_level(logging.WARNING, logger="pocoflow"):
        store = flow.run({})
    assert store["squares"] == [0, 1, 4, 9, 16, 25]
    assert db.get_run(flow.last_run_id)["status"] == "completed"  # type: ignore[arg-type]
    assert "not kept" in caplog.text and "no items here" in caplog.text
    assert db.get_items(flow.last_run_id, 0) == []  # type: ignore[arg-type]
    assert not [e for e in db.get_events(flow.last_run_id) if e["event"] == "node_error"]  # type: ignore[arg-type]


def _refuse_item_rows(db: WorkflowDB) -> None:
    if db.dialect == "sqlite":
        sql = [
            "CREATE TRIGGER refuse_items BEFORE INSERT ON pf_items "
            "BEGIN SELECT RAISE(ABORT, 'no items here'); END"
        ]
    else:
        sql = [
            "CREATE FUNCTION refuse_items() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'no items here'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_items BEFORE INSERT ON pf_items "
            "FOR EACH ROW EXECUTE FUNCTION refuse_items()",
        ]

    def create(conn: Any) -> None:
        for statement in sql:
            conn.exec_driver_sql(statement)

    db._write(create, "test trigger", None)


class Counted:
    """How often the ledger's kept items were read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[int] = []
        real = WorkflowDB.kept_items

        def kept_items(db: WorkflowDB, run_id: str, step: int) -> list[dict[str, Any]]:
            self.reads.append(step)
            return real(db, run_id, step)

        monkeypatch.setattr(WorkflowDB, "kept_items", kept_items)


class Again(MapNode):
    """Maps two items, ``loops`` times over (one step each)."""

    def prep(self, store: Any) -> list[int]:
        return [store["n"], store["n"] + 1]

    def exec(self, item: int) -> int:
        return item

    crash_at: int | None = None

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str | None:
        store["n"] += 1
        if store["n"] == self.crash_at:
            raise RuntimeError("crash")
        return "again" if store["n"] < 4 else None


def test_only_a_step_that_can_have_kept_items_reads_them(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = Counted(monkeypatch)
    node = Again()
    node.then("again", node)
    flow = Flow(start=node, db_path=ledger_url, flow_name="again")
    assert flow.run({"n": 0})["n"] == 4
    assert counted.reads == []  # a fresh run's steps have nothing kept
    node.crash_at = 2
    with pytest.raises(RuntimeError, match="crash"):
        flow.run({"n": 0})
    node.crash_at = None
    assert flow.resume(flow.last_run_id)["n"] == 4  # type: ignore[arg-type]
    assert counted.reads == [1]  # the resumed step only


def test_two_runs_of_one_flow_at_once_keep_their_items_under_their_own_run(
    ledger_url: str,
) -> None:
    import threading

    b_in_prep, a_mapped = threading.Event(), threading.Event()

    class Tagged(MapNode):
        def prep(self, store: Any) -> list[str]:
            if store["tag"] == "A":
                assert b_in_prep.wait(30)  # B's step began after A's: A's log is B's now
            else:  # B's step began; A maps, then B does
                b_in_prep.set()
                assert a_mapped.wait(30)
            return [f"{store['tag']}{i}" for i in range(3)]

        def exec(self, item: str) -> str:
            return item.lower()

        def post(self, store: Any, items: list[Any], results: list[Any]) -> None:
            store["out"] = results
            if store["tag"] == "A":
                a_mapped.set()

    flow = Flow(start=Tagged(), db_path=ledger_url, flow_name="tagged")
    outs: dict[str, Any] = {}
    a = threading.Thread(target=lambda: outs.setdefault("A", flow.run({"tag": "A"})))
    a.start()
    b = threading.Thread(target=lambda: outs.setdefault("B", flow.run({"tag": "B"})))
    b.start()
    a.join(60)
    b.join(60)
    assert outs["A"]["out"] == ["a0", "a1", "a2"] and outs["B"]["out"] == ["b0", "b1", "b2"]
    db = WorkflowDB(ledger_url)
    for tag in ("A", "B"):
        run_id = next(
            r["run_id"] for r in db.list_runs() if db.load_checkpoint(r["run_id"], 0)["tag"] == tag
        )
        assert [r["result_json"] for r in db.get_items(run_id, 0)] == [
            f'"{tag.lower()}{i}"' for i in range(3)
        ]


def test_an_async_map_keeps_the_items_in_flight_when_one_fails_its_run(
    ledger_url: str,
) -> None:
    """As a threads map does: item 0 fails the node while item 1 runs; item 1 ends and
    is kept, item 2 (not started) never runs; the resume runs items 0 and 2 only."""
    import asyncio

    from pocoflow import AsyncNode

    class Racing(MapNode, AsyncNode):
        max_parallel = 2
        fail = True

        def prep(self, store: Any) -> list[int]:
            self.failed, self.one_runs = asyncio.Event(), asyncio.Event()
            self.ran: list[int] = []
            return [0, 1, 2]

        async def exec_async(self, item: int) -> int:
            self.ran.append(item)
            if item == 0 and self.fail:
                await self.one_runs.wait()
                self.failed.set()
                raise ValueError("item 0 fails")
            if item == 1 and self.fail:
                self.one_runs.set()
                await self.failed.wait()
                for _ in range(50):  # still running well after item 0's failure is out
                    await asyncio.sleep(0)
            return item * 10

        def post(self, store: Any, items: list[Any], results: list[Any]) -> None:
            store["out"] = results

    node = Racing(name="racing")
    flow = Flow(start=node, db_path=ledger_url, flow_name="racing")
    with pytest.raises(Exception, match="item 0"):
        flow.run({})
    assert node.ran == [0, 1]
    assert _kept(ledger_url, flow.last_run_id) == [1]
    node.fail = False
    assert flow.resume(flow.last_run_id)["out"] == [0, 10, 20]  # type: ignore[arg-type]
    assert node.ran == [0, 2]


def test_a_map_step_run_again_after_a_wait_runs_no_kept_item_again(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """post waits for a value that lands as the run stops to wait: the step runs again
    from prep, its kept items do not run exec again (as on the workers), and only that
    second try of the step reads what the first one kept."""
    from pocoflow.recorder import RunRecorder

    counted = Counted(monkeypatch)
    real_wait = RunRecorder.wait

    def wait(recorder: RunRecorder, step: int, node_name: str, waiting: Any) -> str:
        assert recorder.db is not None
        recorder.db.send_signal(recorder.run_id, "ok", "yes", lease_s=30.0)
        return real_wait(recorder, step, node_name, waiting)

    monkeypatch.setattr(RunRecorder, "wait", wait)

    class Approved(Flaky):
        def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
            store["ok"] = self.wait_for("ok")
            return super().post(store, items, results)

    node = Approved(fail_times={})
    store = _flow(ledger_url, node).run({})
    assert store["ok"] == "yes" and store["squares"] == [0, 1, 4, 9, 16, 25]
    assert sorted(node.tries) == list(range(6))  # each item once
    assert counted.reads == [0]  # the step's second try only


def test_a_map_cancelled_mid_way_keeps_what_finished_and_the_resume_runs_the_rest(
    ledger_url: str,
) -> None:
    """``handle.cancel()`` while item 2 runs (one at a time): item 2 ends and is kept,
    items 3.. never start; the resume runs only them."""
    import threading

    handles: list[Any] = []
    cancelled = threading.Event()

    class Cancelling(Flaky):
        max_parallel = 1

        def exec(self, item: int) -> Any:
            if item == 2 and not cancelled.is_set():
                wait_until(lambda: handles, 30)[0].cancel()
                cancelled.set()
            return super().exec(item)

    node = Cancelling(fail_times={})
    flow = _flow(ledger_url, node)
    handle = flow.run_background({})
    handles.append(handle)
    handle.wait(60)  # a cancelled run ends with the Store it had
    db = WorkflowDB(ledger_url)
    assert db.get_run(handle.run_id)["status"] == "cancelled"
    assert node.tries == [0, 1, 2]
    assert _kept(ledger_url, handle.run_id) == [0, 1, 2]
    node.tries = []
    store = flow.resume(handle.run_id)
    assert node.tries == [3, 4, 5]
    assert store["squares"] == [0, 1, 4, 9, 16, 25]


# ── a parallel BatchFlow: its passes are the items ─────────────────────────────


class Write(Node):
    """One pass's node: counts its runs by language in ``ran``, fails the passes in
    ``failing`` once each."""

    def __init__(self, ran: list[str], failing: set[str]) -> None:
        super().__init__(name="write")
        self.ran, self.failing = ran, failing

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        lang = self.params["lang"]
        self.ran.append(lang)
        if lang in self.failing:
            self.failing.discard(lang)
            raise ValueError(f"pass {lang} is flaky")
        store[f"out/{lang}"] = f"{store['text']} [{lang}]"
        return "default"


class PerLanguage(BatchFlow):
    def prep(self, store: Any) -> list[dict[str, Any]]:
        return [{"lang": lang} for lang in store["langs"]]


LANGS = ["fr", "de", "ja", "es"]
BATCH_STEP = 1  # setup (0) -> the batch (1)


class Setup(Node):
    """Step 0: the batch is step 1, whose resume starts from a checkpoint's Store (keys
    written out of their sorted order), not from the run's initial one."""

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["zeta"], store["alpha"] = 1, 2
        return "default"


def _batch_flow(
    ledger_url: str | None,
    ran: list[str],
    failing: set[str],
    parallel: bool,
    batch_class: type[BatchFlow] | None = None,
) -> Flow:
    batch = (batch_class or PerLanguage)(start=Write(ran, failing), flow_name="per_language")
    batch.parallel, batch.max_parallel = parallel, 1  # in order: fr, de, ja, es
    setup = Setup(name="setup")
    setup.then("default", batch)
    return Flow(start=setup, db_path=ledger_url, flow_name="translate")


def test_the_finished_passes_of_a_parallel_batch_are_kept_and_a_resume_runs_the_others(
    ledger_url: str,
) -> None:
    """As on workers, where each pass is its own map item: pass "ja" fails the run after
    "fr" and "de" finished; the resume runs only "ja" and "es", and ends with the Store
    of an uninterrupted run."""
    ran: list[str] = []
    flow = _batch_flow(ledger_url, ran, {"ja"}, parallel=True)
    with pytest.raises(Exception, match="pass ja is flaky"):
        flow.run({"text": "hi", "langs": LANGS})
    assert ran == ["fr", "de", "ja"]
    assert _kept(ledger_url, flow.last_run_id, BATCH_STEP) == [0, 1]
    ran.clear()
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert ran == ["ja", "es"]
    clean = _batch_flow(None, [], set(), parallel=True).run({"text": "hi", "langs": LANGS})
    assert store.as_dict() == clean.as_dict()
    assert _kept(ledger_url, flow.last_run_id, BATCH_STEP) == [0, 1, 2, 3]


def test_a_kept_pass_serves_no_resume_whose_batch_prep_left_another_store(
    ledger_url: str,
) -> None:
    """A pass's writes depend on the Store the batch's ``prep`` left, and a resume runs
    ``prep`` again: when it leaves another Store (a new batch id here), no kept pass is
    taken and every pass runs from it, so no pass's writes come from the old one."""
    counter = iter(range(1, 10))

    class Numbered(PerLanguage):
        def prep(self, store: Any) -> list[dict[str, Any]]:
            store["text"] = f"batch {next(counter)}"
            return super().prep(store)

    ran: list[str] = []
    flow = _batch_flow(ledger_url, ran, {"ja"}, parallel=True, batch_class=Numbered)
    with pytest.raises(Exception, match="pass ja is flaky"):
        flow.run({"langs": LANGS})
    assert _kept(ledger_url, flow.last_run_id, BATCH_STEP) == [0, 1]
    ran.clear()
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert ran == LANGS
    assert [store[f"out/{lang}"] for lang in LANGS] == [f"batch 2 [{lang}]" for lang in LANGS]


def test_a_sequential_batch_keeps_no_pass_and_runs_again_whole(ledger_url: str) -> None:
    """Sequential passes share one Store (a pass sees the ones before it): kept alone, a
    pass's writes could not be told from the others', so the batch runs again whole."""
    ran: list[str] = []
    flow = _batch_flow(ledger_url, ran, {"ja"}, parallel=False)
    with pytest.raises(Exception, match="pass ja is flaky"):
        flow.run({"text": "hi", "langs": LANGS})
    assert _kept(ledger_url, flow.last_run_id, BATCH_STEP) == []
    ran.clear()
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert ran == LANGS
    assert store["out/es"] == "hi [es]"


def test_a_parallel_batch_inside_a_sub_flow_keeps_nothing(ledger_url: str) -> None:
    """Its passes' step would be the sub-flow's own, not the run's."""
    batch = PerLanguage(start=Write([], set()), flow_name="per_language")
    batch.parallel = True
    outer = Flow(start=Flow(start=batch, flow_name="sub"), db_path=ledger_url, flow_name="outer")
    assert outer.run({"text": "hi", "langs": LANGS})["out/ja"] == "hi [ja]"
    assert WorkflowDB(ledger_url).get_items(outer.last_run_id, 0) == []  # type: ignore[arg-type]


class Helper:
    """A value the codec cannot carry (not registered), equal to its copies."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Helper)


def test_a_batch_whose_prep_leaves_a_value_the_codec_cannot_carry_keeps_no_pass(
    ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The passes' starting Store cannot be told apart from another one: nothing is kept
    (rows no resume could take), and a warning names the batch and the key."""

    class WithHelper(PerLanguage):
        def prep(self, store: Any) -> list[dict[str, Any]]:
            store["helper"] = Helper()  # for the passes; post drops it
            return super().prep(store)

        def post(self, store: Any, prep_result: Any, exec_result: Any) -> str | None:
            del store["helper"]
            return super().post(store, prep_result, exec_result)

    ran: list[str] = []
    flow = _batch_flow(ledger_url, ran, {"ja"}, parallel=True, batch_class=WithHelper)
    with (
        caplog.at_level(logging.WARNING, logger="pocoflow"),
        pytest.raises(Exception, match="pass ja is flaky"),
    ):
        flow.run({"text": "hi", "langs": LANGS})
    assert ran == ["fr", "de", "ja"]
    assert _kept(ledger_url, flow.last_run_id, BATCH_STEP) == []
    warned = [r.getMessage() for r in caplog.records if "are not kept" in r.getMessage()]
    assert len(warned) == 1 and "'per_language'" in warned[0] and "helper" in warned[0], warned
    ran.clear()
    store = flow.resume(flow.last_run_id)  # type: ignore[arg-type]
    assert ran == LANGS
    assert "helper" not in store and store["out/es"] == "hi [es]"
