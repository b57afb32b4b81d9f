"""A pause of a local run lands between the items of its MapNode (G4), on SQLite and
PostgreSQL: no item starts after it, the running ones end and are kept, the run shows
``paused``; going on (``handle.resume()``, or ``pocoflow resume RUN`` withdrawing a
ledger request) runs only the items not started and ends with the Store of an
uninterrupted run; a process killed while held leaves them kept for ``flow.resume``.
A cancel from another process stops the map between items too, recorded once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pocoflow import Flow, MapNode, pausing
from pocoflow.db import WorkflowDB
from pocoflow.distributed.control import LedgerControl
from pocoflow.runner import RunHandle
from tests import pause_maps
from tests.helpers import wait_until
from tests.ledger import local_map_kill_flows as kill_flows
from tests.pause_maps import IN_FLIGHT, ITEMS, WAIT_S, Items

pytestmark = pytest.mark.ledger

MAP_STEP = 1  # start (0) -> tenfold (1) -> end (2)
MAP_KINDS = ["threads", "async"]


def _status(db: WorkflowDB, run_id: str) -> str:
    return str(db.get_run(run_id)["status"])


def _kept(db: WorkflowDB, run_id: str) -> list[int]:
    return [r["idx"] for r in db.kept_items(run_id, MAP_STEP)]


def _events(db: WorkflowDB, run_id: str, name: str) -> list[dict[str, Any]]:
    return [e for e in db.get_events(run_id) if e["event"] == name]


def _assert_held(db: WorkflowDB, run_id: str, items: Items) -> None:
    """Held in the map: paused, no item started after the pause, the ended ones kept."""
    wait_until(lambda: _status(db, run_id) == "paused", WAIT_S)
    assert sorted(items.started) == IN_FLIGHT
    assert _kept(db, run_id) == IN_FLIGHT  # durable while held
    assert [c["step"] for c in db.get_checkpoints(run_id)] == [0]  # the map has not ended
    assert [e["step"] for e in _events(db, run_id, "run_paused")] == [MAP_STEP]


def _hold_mid_map(items: Items, pause: Any, db: WorkflowDB, run_id: str) -> None:
    """Pause once the first items are in flight, let them end, and check the map holds."""
    wait_until(lambda: len(items.started) == len(IN_FLIGHT), WAIT_S)
    pause()
    items.release.set()
    _assert_held(db, run_id, items)


def _stop(handle: RunHandle, items: Items) -> None:
    """A failed check leaves no run held in a thread of this process."""
    items.release.set()
    handle.cancel()


def _assert_completed(db: WorkflowDB, run_id: str, items: Items, store: Any, kind: str) -> None:
    assert sorted(items.started) == list(range(ITEMS))  # each item once
    assert store.as_dict() == pause_maps.uninterrupted(kind)
    assert _status(db, run_id) == "completed"
    assert db.load_checkpoint(run_id, 2).as_dict() == store.as_dict()


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_a_handle_pause_holds_a_local_map_between_items_and_resume_runs_the_rest(
    ledger_url: str, kind: str
) -> None:
    items = Items()
    handle = pause_maps.build(kind, items, ledger_url).run_background({})
    db = WorkflowDB(ledger_url)
    try:
        _hold_mid_map(items, handle.pause, db, handle.run_id)
        assert not handle.is_done

        handle.resume()
        store = handle.wait(timeout=WAIT_S)
        _assert_completed(db, handle.run_id, items, store, kind)
    finally:
        _stop(handle, items)
        db.close()


def test_a_map_held_by_a_pause_has_written_its_finished_items_first(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The item log writes on a thread of its own; a slow write must not leave the run
    ``paused`` (a process that may be killed while held) with finished items unwritten."""
    real = WorkflowDB.keep_items

    def slow(self: WorkflowDB, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # a slow ledger, not a synchronisation
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WorkflowDB, "keep_items", slow)
    items = Items()
    handle = pause_maps.build("threads", items, ledger_url).run_background({})
    db = WorkflowDB(ledger_url)
    try:
        _hold_mid_map(
            items, handle.pause, db, handle.run_id
        )  # every ended item kept once it shows paused
        handle.resume()
        _assert_completed(db, handle.run_id, items, handle.wait(timeout=WAIT_S), "threads")
    finally:
        _stop(handle, items)
        db.close()


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_a_pause_requested_in_the_ledger_holds_a_local_map_between_items(
    ledger_url: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``pocoflow pause RUN`` / ``pocoflow resume RUN`` from another process: the
    requests land in the ledger through a WorkflowDB of their own."""
    monkeypatch.setattr(pausing, "ITEM_POLL_S", 0.0)  # read before every item
    items = Items()
    handle = pause_maps.build(kind, items, ledger_url).run_background({})
    other = WorkflowDB(ledger_url)
    try:
        _hold_mid_map(items, LedgerControl(handle.run_id, other).pause, other, handle.run_id)

        LedgerControl(handle.run_id, other).resume()  # the request withdrawn
        store = handle.wait(timeout=WAIT_S)
        _assert_completed(other, handle.run_id, items, store, kind)
        assert [e["step"] for e in _events(other, handle.run_id, "run_resumed")] == [MAP_STEP]
    finally:
        _stop(handle, items)
        other.close()


def test_a_cancel_requested_in_the_ledger_stops_a_local_map_between_items(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pocoflow cancel RUN`` from another process: the map starts no more items and the
    run ends ``cancelled`` with the one cancel event its requester recorded."""
    monkeypatch.setattr(pausing, "ITEM_POLL_S", 0.0)
    items = Items()
    handle = pause_maps.build("threads", items, ledger_url).run_background({})
    other = WorkflowDB(ledger_url)
    try:
        wait_until(lambda: len(items.started) == len(IN_FLIGHT), WAIT_S)
        LedgerControl(handle.run_id, other).cancel()
        items.release.set()
        handle.wait(timeout=WAIT_S)
        assert sorted(items.started) == IN_FLIGHT
        assert _status(other, handle.run_id) == "cancelled"
        assert len(_events(other, handle.run_id, "run_cancelled")) == 1
        assert _kept(other, handle.run_id) == IN_FLIGHT
    finally:
        _stop(handle, items)
        other.close()


def test_a_run_cancelled_while_held_in_a_map_resumes_with_only_the_unfinished_items(
    ledger_url: str,
) -> None:
    """The run stopped in the ledger while held (here by a cancel): ``flow.resume(run_id)``
    runs ``prep`` again and only the items that had not finished."""
    items = Items()
    flow = pause_maps.build("threads", items, ledger_url)
    handle = flow.run_background({})
    db = WorkflowDB(ledger_url)
    try:
        _hold_mid_map(items, handle.pause, db, handle.run_id)
        handle.cancel()
        handle.wait(timeout=WAIT_S)
        assert _status(db, handle.run_id) == "cancelled"
        assert len(_events(db, handle.run_id, "run_cancelled")) == 1

        store = flow.resume(handle.run_id)
        _assert_completed(db, handle.run_id, items, store, "threads")
    finally:
        _stop(handle, items)
        db.close()


def test_a_local_map_reads_the_ledger_for_requests_at_most_every_poll_interval(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map of many quick items does not read the run's row per item: at most one read
    per ``ITEM_POLL_S`` of the map, none before the first interval has passed."""
    run_id = "quick-00000001"
    reads: list[float] = []
    real = WorkflowDB.get_control

    def counted(self: WorkflowDB, read_id: str) -> str | None:
        if read_id == run_id:  # not another test's run still going on in this process
            reads.append(time.monotonic())
        return real(self, read_id)

    monkeypatch.setattr(WorkflowDB, "get_control", counted)

    class Quick(MapNode):
        max_parallel = 2

        def prep(self, store: Any) -> list[int]:
            return list(range(300))

        def exec(self, item: int) -> int:
            time.sleep(0.002)  # the work of an item, not a synchronisation
            return item

        def post(self, store: Any, items: list[int], results: list[int]) -> None:
            store["sum"] = sum(results)

    started = time.monotonic()
    flow = Flow(start=Quick(), db_path=ledger_url, run_id=run_id)
    assert flow.run({})["sum"] == sum(range(300))
    elapsed = time.monotonic() - started
    # One read before the first node (the loop's), then at most one per interval.
    assert 1 <= len(reads) <= 1 + int(elapsed / pausing.ITEM_POLL_S) + 1, (reads, elapsed)


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_a_process_killed_while_held_in_a_map_resumes_with_only_the_unfinished_items(
    ledger_url: str, tmp_path: Path, kind: str
) -> None:
    """A pause requested in the ledger holds the map of another process (items 5-7 in
    flight end, no other starts), which is then killed with kill -9 while held: its
    finished items are kept, so ``flow.resume(run_id)`` runs only the others."""
    side = tmp_path / "side"
    run_id = f"local_map_{kind}-0000held"
    proc = kill_flows.start_blocked(ledger_url, kind, run_id, side, "0")
    in_flight = list(range(kill_flows.FINISHING + kill_flows.Upper.max_parallel))
    db = WorkflowDB(ledger_url)
    try:
        try:
            wait_until(lambda: sorted(kill_flows.ran_by(side).get(proc.pid, [])) == in_flight, 60)
            LedgerControl(run_id, db).pause()
            (side / "block").unlink()  # the items in flight end
            wait_until(lambda: _status(db, run_id) == "paused", 60)
            assert sorted(kill_flows.ran_by(side)[proc.pid]) == in_flight  # none started after
            assert _kept(db, run_id) == in_flight
        finally:
            proc.send_signal(signal.SIGKILL)
            output = proc.communicate(timeout=30)[0]
        assert proc.returncode == -signal.SIGKILL, output

        store = kill_flows.build(ledger_url, kind).resume(run_id)
        ran = kill_flows.ran_by(side)
        assert sorted(ran[os.getpid()]) == list(range(len(in_flight), kill_flows.ITEMS))
        clean = kill_flows.build(None, kind).run({"side": str(side)})
        assert store.as_dict() == clean.as_dict()
        assert _status(db, run_id) == "completed"
    finally:
        db.close()
