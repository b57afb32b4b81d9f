"""Group commit of map items, on SQLite and PostgreSQL: the claims and commits of one
process's threads that wait for the write lock together share one SQLite transaction,
each in a savepoint of its own, with the same outcome for each as alone. PostgreSQL
runs each alone (its transactions do not queue on a file lock): the same outcomes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pocoflow.ledger import events, pipeline, txn
from pocoflow.ledger.items import ItemClaim

pytestmark = pytest.mark.ledger

LEASE = 10.0
RUN = "r1"
WAIT_S = 10.0


def _queued_together(db, calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` on threads of their own; on SQLite, hold the write lock until all of
    them wait for it, so that the thread that gets it next runs them as one group.
    Returns each call's result (or the exception it raised)."""
    ledger = db._ledger
    sqlite = ledger.dialect == "sqlite"
    results: list[Any] = [None] * len(calls)

    def call(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    if sqlite:
        ledger.writers.acquire()
    try:
        for t in threads:
            t.start()
        if sqlite:
            deadline = time.monotonic() + WAIT_S
            while len(ledger.grouped) < len(calls):  # poll with a timeout, no sleep-sync
                assert time.monotonic() < deadline, "the calls never queued as one group"
                time.sleep(0.005)
    finally:
        if sqlite:
            ledger.writers.release()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.fixture
def fanned(db):
    """Run r1 whose step 0 (node M) fanned out into 4 items."""
    db.create_run(RUN, "f", initial_store={}, status="running")
    db.insert_step(RUN, 0, "M", lease_s=LEASE)
    assert db.claim_step(RUN, 0, 1, "w0", LEASE, holder="w0#1")
    assert db.fan_out(RUN, 0, 1, "w0#1", "w0", ['"a"', '"b"', '"c"', '"d"'], [])
    return db


def _c(idx: int, holder: str) -> ItemClaim:
    return ItemClaim(RUN, 0, idx, 1, holder)


def test_a_group_where_one_compare_and_set_misses_commits_the_others(fanned):
    """Four item commits in one group; item 3's holder lost its claim: its commit writes
    nothing and says so, the three others land with their results and counts."""
    db = fanned
    for idx in range(4):
        assert db.claim_item(_c(idx, f"w{idx}#1"), "M", LEASE)[0]
    holders = {0: "w0#1", 1: "w1#1", 2: "w2#1", 3: "stale#9"}
    calls = [
        (lambda i=i: db.commit_item(_c(i, holders[i]), result_json=f'"R{i}"', lease_s=LEASE))
        for i in range(4)
    ]
    got = _queued_together(db, calls)
    assert [g[0] for g in got] == [True, True, True, False]
    assert got[3] == (False, None)
    rows = {r["idx"]: r for r in db.get_items(RUN, 0)}
    assert [(rows[i]["status"], rows[i]["result_json"]) for i in range(3)] == [
        ("done", '"R0"'),
        ("done", '"R1"'),
        ("done", '"R2"'),
    ]
    assert (rows[3]["status"], rows[3]["result_json"], rows[3]["lease_owner"]) == (
        "running",
        None,
        "w3#1",
    )
    join = db.get_join(RUN, 0)
    assert (join["done"], join["total"]) == (3, 4)
    assert db.get_step(RUN, 0)["attempt"] == 1  # not complete: the step stays parked
    # The lost holder's claim is still fenced out, the true one commits and completes.
    assert db.commit_item(_c(3, "w3#1"), result_json='"R3"', lease_s=LEASE)[1]["done"] == 4


def test_claims_in_one_group_each_get_their_own_answer(fanned):
    """Claims of four items and a duplicate claim of item 0 by another holder, queued
    together: exactly one claim of item 0 wins, each gets its value and try."""
    db = fanned
    calls = [(lambda i=i: db.claim_item(_c(i, f"w{i}#1"), "M", LEASE)) for i in range(4)]
    calls.append(lambda: db.claim_item(_c(0, "dup#1"), "M", LEASE))
    got = _queued_together(db, calls)
    assert [g[0] for g in got[1:4]] == [True, True, True]
    assert [g[2] for g in got[1:4]] == [('"b"', 1), ('"c"', 1), ('"d"', 1)]
    assert sorted([got[0][0], got[4][0]]) == [False, True]  # one of the two holders
    owner = db.get_item(RUN, 0, 0)["lease_owner"]
    assert owner == ("w0#1" if got[0][0] else "dup#1")
    assert all(g[1]["status"] == "running" for g in got)  # the run's guard, read by each


def test_a_call_that_fails_in_a_group_rolls_back_alone(db):
    """Three grouped bodies writing an event each: one returns, one raises an error, one
    aborts. Only the first one's row is written; each caller gets its own outcome."""
    db.create_run(RUN, "f", initial_store={}, status="running")

    def body(name: str, ending: BaseException | None) -> Callable[[Any], str]:
        def write(conn: Any) -> str:
            op = events.insert_op(events.rows_of(RUN, [{"event": name, "step": 0}]))
            assert pipeline.run(conn, [op])
            if ending is not None:
                raise ending
            return name

        return write

    def grouped(fn: Callable[[Any], str]) -> Callable[[], str]:
        return lambda: txn.run(
            db._ledger, fn, write=True, what="testing", batched=True, grouped=True
        )

    got = _queued_together(
        db,
        [
            grouped(body("kept", None)),
            grouped(body("failed", ValueError("boom"))),
            grouped(body("aborted", txn.Abort("refused"))),
        ],
    )
    assert got[0] == "kept"
    assert isinstance(got[1], ValueError) and str(got[1]) == "boom"
    assert got[2] == "refused"
    names = [e["event"] for e in db.get_events(RUN)]
    assert "kept" in names and "failed" not in names and "aborted" not in names
