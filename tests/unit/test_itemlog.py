"""ItemLog on a fake ledger: which kept results a resume takes, how finished items are
batched into transactions, and what a failed write does."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from pocoflow.itemlog import ItemLog

TIMEOUT_S = 10.0


class FakeLedger:
    """The three ledger calls ItemLog makes, recorded."""

    def __init__(self, rows: list[dict[str, Any]] | None = None) -> None:
        self.rows = rows or []
        self.batches: list[list[int]] = []
        self.dropped: list[int] = []
        self.fail_with: BaseException | None = None
        self.entered = threading.Event()  # a write started
        self.release = threading.Event()  # let it finish
        self.release.set()

    def kept_items(self, run_id: str, step: int) -> list[dict[str, Any]]:
        return self.rows

    def drop_items(self, run_id: str, step: int, idxs: Sequence[int]) -> int:
        self.dropped += idxs
        return len(idxs)

    def keep_items(self, run_id: str, step: int, rows: Sequence[tuple[int, str, str]]) -> None:
        self.entered.set()
        assert self.release.wait(TIMEOUT_S)
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append([idx for idx, _, _ in rows])


def _log(db: FakeLedger) -> ItemLog:
    return ItemLog(db, "r1", 2, "M")  # type: ignore[arg-type]


def test_a_resume_takes_a_kept_result_only_for_the_same_item_at_its_index() -> None:
    db = FakeLedger(
        [
            {"idx": 0, "item_json": '"a"', "result_json": '"A"'},
            {"idx": 1, "item_json": '"changed"', "result_json": '"X"'},
            {"idx": 2, "item_json": '"c"', "result_json": "{not json"},
            {"idx": 7, "item_json": '"h"', "result_json": '"H"'},
        ]
    )
    log = _log(db)
    assert log.open(["a", "b", "c"]) == {0: "A"}
    assert log.kept == {0: "A"}
    assert db.dropped == [1, 2, 7]
    log.close()


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
    db = FakeLedger([{"idx": 0, "item_json": "1", "result_json": "2"}])
    log = _log(db)
    assert log.open([1]) == {0: 2}
    assert log._writer is None
    log.close()
    assert db.batches == []


def test_a_failed_write_is_raised_by_close_and_the_rest_is_not_written() -> None:
    db = FakeLedger()
    db.fail_with = OSError("ledger gone")
    log = _log(db)
    log.open([0, 1, 2])
    log.keep(0, 0)
    assert db.entered.wait(TIMEOUT_S)
    log.keep(1, 1)
    log.keep(2, 2)
    with pytest.raises(OSError, match="ledger gone"):
        log.close()
    assert db.batches == []


def test_a_failed_write_under_a_failing_map_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = FakeLedger()
    db.fail_with = OSError("ledger gone")
    log = _log(db)
    log.open([0])
    log.keep(0, 0)
    with caplog.at_level(logging.ERROR, logger="pocoflow"):
        log.close(failing=True)  # the map's own error is the one raised
    assert "finished items not kept: ledger gone" in caplog.text


def test_an_item_or_result_the_codec_cannot_carry_is_not_kept_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = FakeLedger()
    log = _log(db)
    with caplog.at_level(logging.WARNING, logger="pocoflow"):
        log.open([object(), 1, 2])
        log.keep(0, "fine")  # its item could not be encoded: nothing to compare it with
        log.keep(1, object())
        log.keep(2, "two")
        log.close()
    assert db.batches == [[2]]
    warnings = [r for r in caplog.records if "is not kept in the ledger" in r.getMessage()]
    assert len(warnings) == 1 and "item 0" in warnings[0].getMessage()
