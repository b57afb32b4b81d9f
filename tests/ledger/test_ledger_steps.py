"""Outbox, leases, take-over and attempts for the distributed executor, with an injected clock."""

from __future__ import annotations

import pytest

from pocoflow.commit import StepFailure

pytestmark = pytest.mark.ledger

LEASE = 10.0


@pytest.fixture
def run(db):
    db.create_run("r1", "f", initial_store={"n": 0})
    return "r1"


def test_insert_step_is_an_unsent_leased_outbox_row(db, run):
    assert db.insert_step(run, 0, "A", lease_s=LEASE, now=100.0) is True
    assert db.insert_step(run, 0, "A", lease_s=LEASE, now=101.0) is False
    row = db.get_step(run, 0)
    assert row["status"] == "queued" and row["attempt"] == 1 and row["node_id"] == "A"
    assert (row["lease_expires_at"], row["sent_at"], row["created_at"]) == (110.0, None, 100.0)
    assert db.get_step(run, 5) is None
    with pytest.raises(KeyError, match="ghost"):
        db.insert_step("ghost", 0, "A")


def test_unsent_steps_until_marked_sent(db, run):
    db.insert_step(run, 0, "A", lease_s=LEASE, now=100.0)
    assert db.unsent_steps(older_than_s=5, now=104.0) == []  # still within the grace
    (row,) = db.unsent_steps(older_than_s=5, now=106.0)
    assert (row["run_id"], row["step"], row["attempt"]) == (run, 0, 1)
    assert db.mark_sent(run, 0, 1, task_id="task-1", now=106.5) is True
    assert db.mark_sent(run, 0, 1, now=107.0) is False  # already sent
    assert db.mark_sent(run, 0, 2, now=107.0) is False  # stale attempt
    assert db.unsent_steps(older_than_s=5, now=200.0) == []
    assert db.get_step(run, 0)["sent_at"] == 106.5
    assert db.running_task_ids(run) == ["task-1"]


def test_claim_is_exclusive_while_the_lease_lives(db, run):
    db.insert_step(run, 0, "A", lease_s=LEASE, now=100.0)
    assert db.claim_step(run, 0, 1, "w1", LEASE, now=101.0) is True
    row = db.get_step(run, 0)
    assert (row["status"], row["lease_owner"], row["lease_expires_at"]) == ("running", "w1", 111.0)
    assert db.claim_step(run, 0, 1, "w2", LEASE, now=105.0) is False  # duplicate delivery
    assert db.claim_step(run, 0, 2, "w2", LEASE, now=105.0) is False  # unknown attempt
    assert db.claim_step(run, 0, 1, "w1", LEASE, now=106.0) is True  # same worker again
    # The holder died: the broker redelivers the same attempt after the lease ran out.
    assert db.claim_step(run, 0, 1, "w2", LEASE, now=117.0) is True
    assert db.get_step(run, 0)["lease_owner"] == "w2"
    assert [a["worker"] for a in db.get_attempts(run)] == ["w1", "w1", "w2"]


def test_renew_lease_only_for_the_holder(db, run):
    db.insert_step(run, 0, "A", lease_s=LEASE, now=100.0)
    db.claim_step(run, 0, 1, "w1", LEASE, now=100.0)
    assert db.renew_lease(run, 0, 1, "w1", LEASE, now=108.0) is True
    assert db.get_step(run, 0)["lease_expires_at"] == 118.0
    assert db.renew_lease(run, 0, 1, "w2", LEASE, now=108.0) is False
    assert db.expired_steps(now=115.0) == []
    assert db.take_over(run, 0, 1, LEASE, now=119.0) == 2
    assert db.renew_lease(run, 0, 1, "w1", LEASE, now=119.5) is False  # lost it: stop


def test_expired_steps_and_take_over(db, run):
    db.insert_step(run, 0, "A", lease_s=LEASE, now=100.0)
    db.claim_step(run, 0, 1, "w1", LEASE, now=100.0)
    assert db.expired_steps(now=109.0) == []
    (row,) = db.expired_steps(now=111.0)
    assert (row["step"], row["attempt"], row["lease_owner"]) == (0, 1, "w1")

    assert db.take_over(run, 0, 1, LEASE, now=111.0) == 2
    assert db.take_over(run, 0, 1, LEASE, now=111.0) is None  # another sweeper was first
    row = db.get_step(run, 0)
    assert (row["status"], row["attempt"], row["lease_owner"]) == ("queued", 2, None)
    assert (row["lease_expires_at"], row["sent_at"]) == (121.0, None)
    (unsent,) = db.unsent_steps(older_than_s=0, now=111.0)
    assert unsent["attempt"] == 2
    (old,) = db.get_attempts(run)
    assert (old["outcome"], old["ended_at"]) == ("lost", 111.0)
    # A lease that is still alive is never taken, unless forced (resume).
    assert db.take_over(run, 0, 2, LEASE, now=115.0) is None
    assert db.take_over(run, 0, 2, LEASE, now=115.0, force=True) == 3


def test_expired_steps_skip_runs_that_are_not_going(db, run):
    db.insert_step(run, 0, "A", lease_s=LEASE, now=100.0)
    db.create_run("r2", "f")
    db.insert_step("r2", 0, "A", lease_s=LEASE, now=100.0)
    assert {r["run_id"] for r in db.expired_steps(now=200.0)} == {"r1", "r2"}
    db.update_run("r2", status="paused")
    assert [r["run_id"] for r in db.expired_steps(now=200.0)] == ["r1"]
    assert [r["run_id"] for r in db.unsent_steps(older_than_s=1, now=200.0)] == ["r1"]
    assert len(db.expired_steps(now=200.0, limit=0)) == 0


def test_committed_and_failed_steps_are_final(db, run):
    db.insert_step(run, 0, "A", lease_s=LEASE, now=100.0)
    db.update_run(run, status="running")
    db.claim_step(run, 0, 1, "w1", LEASE, now=100.0)
    assert db.fail_step(StepFailure(run, 0, 2, "w1", "w1", "boom"), now=101.0) is False  # stale
    assert db.fail_step(StepFailure(run, 0, 1, "w2", "w2", "boom"), now=101.0) is False  # not w2's
    assert db.get_step(run, 0)["status"] == "running" and db.get_run(run)["status"] == "running"
    assert db.fail_step(StepFailure(run, 0, 1, "w1", "w1", "boom"), now=101.0) is True
    assert db.get_step(run, 0)["status"] == "failed"
    assert (db.get_run(run)["status"], db.get_run(run)["error_msg"]) == ("failed", "boom")
    (attempt,) = db.get_attempts(run)
    assert (attempt["outcome"], attempt["error_msg"], attempt["ended_at"]) == (
        "failed",
        "boom",
        101.0,
    )
    assert db.claim_step(run, 0, 1, "w2", LEASE, now=200.0) is False
    assert db.expired_steps(now=500.0) == []
    assert db.take_over(run, 0, 1, LEASE, now=500.0) is None
    assert db.take_over(run, 0, 1, LEASE, now=500.0, force=True) == 2  # resume after failure


def test_attempt_rows_record_outcomes(db, run):
    db.insert_step(run, 0, "A", lease_s=LEASE, now=100.0)
    db.claim_step(run, 0, 1, "w1", LEASE, now=100.0, task_id="t-1")
    assert db.end_attempt(run, 0, 1, "w2", "committed", now=101.0) is False  # not w2's
    assert db.end_attempt(run, 0, 1, "w1", "failed", "boom", now=102.0) is True
    assert db.end_attempt(run, 0, 1, "w1", "failed", now=103.0) is False  # closed already
    (attempt,) = db.get_attempts(run)
    assert (attempt["worker"], attempt["started_at"], attempt["ended_at"]) == ("w1", 100.0, 102.0)
    assert (attempt["outcome"], attempt["error_msg"]) == ("failed", "boom")


def test_count_committed_counts_node_steps(db, run):
    from tests.ledger.test_ledger_commit import make_commit

    manifest = {"n": -1}
    for step in range(3):
        commit = make_commit(run, step, manifest, {"n": step})
        assert db.commit_step(commit)
        manifest = commit.manifest
    assert db.count_committed(run) == 3
    assert db.count_committed("ghost") == 0


def test_a_claim_its_own_holder_misses_opens_no_second_attempt_row(db, run):
    """The holder of a step claims it again and misses on the run's guard (paused) or on
    the node: nothing of that claim lands, no second open ``pf_attempts`` row (the sweeper
    and the crash budget count those rows)."""
    db.insert_step(run, 0, "Node")
    assert db.claim_if_runnable(run, 0, 1, "w1", 30.0)[0]
    db.set_control(run, "pause")
    claimed, seen = db.claim_if_runnable(run, 0, 1, "w1", 30.0)
    assert not claimed and seen is not None and seen["control"] == "pause"
    assert not db.claim_step(run, 0, 1, "w1", 30.0, node_id="Other")
    assert [(a["attempt"], a["ended_at"]) for a in db.get_attempts(run)] == [(1, None)]
