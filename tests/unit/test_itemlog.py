"""ItemLog on a fake ledger: which kept results a resume takes, how finished items are
batched into transactions, and what a failed write does."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from pocoflow import codec
from pocoflow.itemlog import ItemLog, digest
from pocoflow.node import Node
from tests.helpers import wait_until

TIMEOUT_S = 10.0


class FakeLedger:
    """The three ledger calls ItemLog makes, recorded."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = rows or []
        self.batches: list[list[int]] = []
        self.dropped_from: list[int] = []
        self.reads = 0
        self.fail_with: BaseException | None = None
        self.entered = threading.Event()  # a write started
        self.release = threading.Event()  # let it finish
        self.release.set()
        self.failed: list[list[int]] = []
        self.written: list[tuple[int, str, str]] = []

    def kept_items(self, run_id: str, step: int) -> list[dict[str, Any]]:
        self.reads += 1
        return self.rows

    def drop_items_from(self, run_id: str, step: int, first_idx: int) -> int:
        self.dropped_from.append(first_idx)
        return 1

    def keep_items(self, run_id: str, step: int, rows: Sequence[tuple[int, str, str]]) -> None:
        self.entered.set()
        assert self.release.wait(TIMEOUT_S)
        if self.fail_with is not None:
            self.failed.append([idx for idx, _, _ in rows])
            raise self.fail_with
        self.batches.append([idx for idx, _, _ in rows])
        self.written += rows


def _log(db: FakeLedger, *, resumed: bool = True) -> ItemLog:
    return ItemLog(db, "r1", 2, Node(name="M"), may_have_kept=resumed)  # type: ignore[arg-type]


def _row(idx: int, item: Any, result_json: str) -> dict[str, Any]:
    return {"idx": idx, "item_json": _digest(item), "result_json": result_json}


def _digest(item: Any) -> str:
    return digest(codec.encode(item, key="item"))


def test_a_resume_takes_a_kept_result_for_an_equal_item_wherever_it_is_now() -> None:
    db = FakeLedger(
        [
            _row(0, "a", '"A"'),
            _row(1, "changed", '"X"'),
            _row(2, "c", "{not json"),
            _row(3, "b", '"B"'),
            _row(7, "h", '"H"'),
        ]
    )
    log = _log(db)
    assert log.open(["a", "b", "c", "d"]) == {0: "A", 1: "B"}
    assert log.kept == {0: "A", 1: "B"}
    assert db.dropped_from == [4]  # one range, however many rows: no list of indexes
    log.close()
    assert db.written == [(1, _digest("b"), '"B"')]  # moved to its new index, not re-encoded


def test_equal_items_each_take_a_kept_result_of_their_own() -> None:
    db = FakeLedger([_row(0, 1, "10"), _row(1, 2, "20"), _row(2, 1, "11")])
    log = _log(db)
    assert log.open([2, 1, 1, 1]) == {0: 20, 1: 10, 2: 11}  # the third 1 runs again
    log.close()


def test_a_fresh_step_reads_nothing_and_starts_no_writer_before_an_item_ends() -> None:
    db = FakeLedger([_row(0, "a", '"A"')])
    log = _log(db, resumed=False)
    assert log.open(["a"]) == {}
    assert db.reads == 0 and log._writer is None
    log.keep(0, "A")
    assert log._writer is not None
    log.close()
    assert db.written == [(0, _digest("a"), '"A"')]


def test_finished_items_that_queue_up_during_a_write_share_the_next_one() -> None:
    db = FakeLedger()
    db.release.clear()
    log = _log(db)
    assert log.open(list(range(10))) == {}
    log.keep(0, 0)
    assert db.entered.wait(TIMEOUT_S)  # the writer holds item 0's transaction open
    for idx in range(1, 10):
        log.keep(idx, idx * 2)
    db.release.set()
    log.close()
    assert db.batches == [[0], list(range(1, 10))]


def test_a_step_whose_items_were_all_kept_starts_no_writer() -> None:
    db = FakeLedger([_row(0, 1, "2")])
    log = _log(db)
    assert log.open([1]) == {0: 2}
    assert log._writer is None
    log.close()
    assert db.batches == []


def test_a_failed_write_is_tried_again_with_the_next_batch_and_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = FakeLedger()
    db.fail_with = OSError("ledger gone")
    db.release.clear()
    log = _log(db)
    log.open([0, 1, 2])
    with caplog.at_level(logging.WARNING, logger="pocoflow"):
        log.keep(0, 0)
        assert db.entered.wait(TIMEOUT_S)
        log.keep(1, 1)  # queued while the first write fails
        db.release.set()
        wait_until(lambda: db.failed == [[0], [0, 1]], TIMEOUT_S)  # the retry carried item 0 again
        db.fail_with = None  # the ledger is back
        log.keep(2, 2)
        log.close()  # no error: the map's outcome is its checkpoint's
    assert sorted(i for batch in db.batches for i in batch) == [0, 1, 2]
    assert "trying again (ledger gone)" in caplog.text


def test_rows_still_unwritten_at_close_are_said_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = FakeLedger()
    db.fail_with = OSError("ledger gone")
    log = _log(db)
    log.open([0, 1])
    with caplog.at_level(logging.WARNING, logger="pocoflow"):
        log.keep(0, 0)
        log.keep(1, 1)
        log.close()
    assert db.batches == []
    assert "2 finished items not kept, they run again on a resume (ledger gone)" in caplog.text


def test_an_item_or_result_the_codec_cannot_carry_is_not_kept_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = FakeLedger()
    log = _log(db, resumed=False)
    with caplog.at_level(logging.WARNING, logger="pocoflow"):
        log.open([object(), 1, 2])
        log.keep(0, "fine")  # its item could not be encoded: nothing to find it by
        log.keep(1, object())
        log.keep(2, "two")
        log.close()
    assert db.batches == [[2]]
    warnings = [r for r in caplog.records if "is not kept in the ledger" in r.getMessage()]
    assert len(warnings) == 1 and "item 0" in warnings[0].getMessage()
    message = warnings[0].getMessage()
    assert "the codec cannot carry the item: cannot checkpoint value of type object" in message
    assert "Store key" not in message  # an item is no Store key


def test_a_kept_result_that_cannot_be_read_back_is_said_and_runs_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = _log(FakeLedger([_row(0, "a", "{not json")]))
    with caplog.at_level(logging.WARNING, logger="pocoflow"):
        assert log.open(["a"]) == {}
    assert "item 0 is not kept in the ledger" in caplog.text
    assert "its kept result cannot be read back: checkpoint text is not JSON" in caplog.text
    assert "Store key" not in caplog.text
