"""A local run's MapNode keeps each finished item in the ledger (``pf_items``), on SQLite
and PostgreSQL: a process killed with kill -9 mid fan-out, resumed with ``Flow.resume``,
runs only the items that had not finished (threads and asyncio maps) and ends with the
Store of an uninterrupted run; a failed item runs again with all its tries; a changed
item is not taken from the earlier attempt; and the ledger calls underneath."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pocoflow import Flow, MapNode
from pocoflow.db import WorkflowDB
from tests.helpers import wait_until
from tests.ledger.local_map_kill_flows import FINISHING, ITEMS, build

pytestmark = pytest.mark.ledger

ROOT = Path(__file__).resolve().parents[2]
MAP_STEP = 1  # start (0) -> upper (1) -> end (2)


def _ran_by(side: Path) -> dict[int, list[int]]:
    """pid -> the item indexes it started, in order."""
    out: dict[int, list[int]] = {}
    if not (side / "ran").exists():
        return out
    for line in (side / "ran").read_text().splitlines():
        pid, index = map(int, line.split())
        out.setdefault(pid, []).append(index)
    return out


@pytest.mark.parametrize("kind", ["threads", "async"])
def test_a_local_map_killed_with_kill_9_resumes_running_only_unfinished_items(
    ledger_url: str, tmp_path: Path, kind: str
) -> None:
    side = tmp_path / "side"
    side.mkdir()
    (side / "block").touch()
    run_id = f"local_map_{kind}-0000dead"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ledger.local_map_kill_flows", ledger_url, kind, run_id,
         str(side)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    db = WorkflowDB(ledger_url)
    try:
        try:
            # Items before FINISHING are kept as they end; the others block, in flight.
            wait_until(
                lambda: (
                    len(db.kept_items(run_id, MAP_STEP)) >= FINISHING
                    and max(_ran_by(side).get(proc.pid, [0])) >= FINISHING
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
        in_flight = set(_ran_by(side)[proc.pid]) - set(range(FINISHING))
        assert in_flight  # the kill caught items running, not a finished map

        (side / "block").unlink()
        store = build(ledger_url, kind).resume(run_id)

        ran = _ran_by(side)
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


def _kept(ledger_url: str, run_id: str | None) -> list[int]:
    assert run_id is not None
    return [r["idx"] for r in WorkflowDB(ledger_url).kept_items(run_id, 0)]


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


def test_a_kept_result_is_taken_only_for_the_same_item_at_the_same_index(
    ledger_url: str,
) -> None:
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
        (0, "0", "0"),
        (1, "7", "49"),
        (2, "2", "4"),
        (3, "8", "64"),
        (4, "4", "16"),
    ]


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


def test_a_map_writes_a_row_per_finished_item_and_only_with_a_ledger(
    ledger_url: str,
) -> None:
    node = Flaky(fail_times={})
    flow = _flow(ledger_url, node)
    flow.run({})
    rows = WorkflowDB(ledger_url).get_items(flow.last_run_id, 0)  # type: ignore[arg-type]
    assert [(r["idx"], r["result_json"], r["status"]) for r in rows] == [
        (i, str(i * i), "done") for i in range(6)
    ]
    plain = Flaky(fail_times={})
    assert _flow(None, plain).run({})["squares"] == [0, 1, 4, 9, 16, 25]
    assert plain._item_log is None


def test_inner_nodes_of_a_sub_flow_keep_nothing(ledger_url: str) -> None:
    """An inner node's step numbers are the sub-flow's own, not the run's: its items
    must not land under the outer run's step."""
    inner = Flaky(fail_times={})
    outer = Flow(start=Flow(start=inner, flow_name="sub"), db_path=ledger_url, flow_name="outer")
    assert outer.run({})["squares"] == [0, 1, 4, 9, 16, 25]
    assert WorkflowDB(ledger_url).get_items(outer.last_run_id, 0) == []  # type: ignore[arg-type]
    assert inner._item_log is None


# ── the ledger calls ────────────────────────────────────────────────────────────

RUN = "r1"


@pytest.fixture
def run_db(db: WorkflowDB) -> WorkflowDB:
    db.create_run(RUN, "f", initial_store={}, status="running")
    return db


def test_keep_items_writes_done_rows_once(run_db: WorkflowDB) -> None:
    db = run_db
    db.keep_items(RUN, 3, [(2, '"c"', '"C"'), (0, '"a"', '"A"')])
    db.keep_items(RUN, 3, [(0, '"a"', '"other"'), (1, '"b"', '"B"')])  # 0 is kept already
    db.keep_items(RUN, 3, [])
    rows = db.get_items(RUN, 3)
    assert [(r["idx"], r["item_json"], r["result_json"], r["status"]) for r in rows] == [
        (0, '"a"', '"A"', "done"),
        (1, '"b"', '"B"', "done"),
        (2, '"c"', '"C"', "done"),
    ]
    assert all(r["lease_owner"] is None and r["error_json"] is None for r in rows)
    assert db.get_items(RUN, 4) == [] and db.get_join(RUN, 3) is None  # no join row


def test_kept_items_reads_a_steps_results_in_order_and_drop_items_forgets_some(
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
    assert db.drop_items(RUN, 0, [1, 3, 7]) == 2
    assert db.drop_items(RUN, 0, []) == 0
    assert [r["idx"] for r in db.kept_items(RUN, 0)] == [0, 2]
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
    node = Flaky(fail_times={}, items="not a list")  # type: ignore[arg-type]
    flow = _flow(ledger_url, node)
    with pytest.raises(TypeError, match="must return a list"):
        flow.run({})
    node.items = list(range(6))
    assert _flow(None, node).run({})["squares"] == [0, 1, 4, 9, 16, 25]  # no ledger
    assert WorkflowDB(ledger_url).get_items(flow.last_run_id, 0) == []  # type: ignore[arg-type]
    assert node._item_log is None
