"""Retention's pure parts: the ``30d`` durations, ``POCOFLOW_PRUNE_OLDER_THAN`` and how
often the sweeper's ``Pruner`` prunes (a backlog at every pass, else once per period)."""

from __future__ import annotations

from typing import Any

import pytest

from pocoflow.ledger.prune import DEFAULT_BATCH, PRUNE_BATCHES_PER_PASS, Pruner
from pocoflow.settings import Settings, parse_duration

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("45s", 45), ("2w", 1209600),
     ("1.5h", 5400), ("600", 600), (" 7D ", 7 * 86400), (0, 0)],
)  # fmt: skip
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "30 days", "-1d", "d", ""])
def test_bad_durations_name_the_setting(text: str) -> None:
    with pytest.raises(ValueError, match="POCOFLOW_PRUNE_OLDER_THAN"):
        parse_duration(text, "POCOFLOW_PRUNE_OLDER_THAN")


def test_prune_setting_is_off_by_default_and_read_from_the_environment() -> None:
    assert Settings.from_env({}).prune_older_than is None
    assert Settings.from_env({"POCOFLOW_PRUNE_OLDER_THAN": "30d"}).prune_older_than == 2592000
    with pytest.raises(ValueError, match="POCOFLOW_PRUNE_OLDER_THAN"):
        Settings.from_env({"POCOFLOW_PRUNE_OLDER_THAN": "a while"})


class FakeDB:
    def __init__(self, results: list[int]) -> None:
        self.results = results
        self.calls: list[tuple[float, int | None]] = []

    def prune_runs(self, older_than_s: float, *, max_batches: int | None = None) -> int:
        self.calls.append((older_than_s, max_batches))
        return self.results.pop(0)


def test_the_pruner_works_off_a_backlog_then_waits_its_period() -> None:
    full = PRUNE_BATCHES_PER_PASS * DEFAULT_BATCH
    db = FakeDB([full, 3, 0])
    pruner = Pruner(86400.0, every_s=3600.0)
    assert pruner.tick(db, now=100.0) == full  # a full pass: more may be left
    assert pruner.tick(db, now=104.0) == 3  # so the next sweep prunes again
    assert pruner.tick(db, now=108.0) == 0  # caught up: nothing until an hour later
    assert pruner.tick(db, now=104.0 + 3599.0) == 0
    assert len(db.calls) == 2
    assert pruner.tick(db, now=104.0 + 3600.0) == 0
    assert db.calls == [(86400.0, PRUNE_BATCHES_PER_PASS)] * 3
