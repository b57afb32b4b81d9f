"""The sweeper on both ledgers, with an injected clock: unsent outbox rows are re-sent,
expired leases taken over under a new attempt, idle runs left alone, and racing sweepers
have exactly one winner per step (G1, G3)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pocoflow import Flow, Node, flow
from pocoflow.distributed import lifecycle
from pocoflow.distributed.client import record_run
from pocoflow.distributed.message import StepMessage
from pocoflow.distributed.sweeper import REQUEUE_AFTER_S, UNSENT_GRACE_S, sweep
from pocoflow.ledger import liveness
from pocoflow.registry import build_flow
from pocoflow.store import Store

pytestmark = pytest.mark.ledger

LEASE_S = 2.0


class Noop(Node):
    pass


@flow("sweep_two")
def two() -> Flow:
    a = Noop(name="a")
    a.then("default", Noop(name="b"))
    return Flow(start=a)


class Sent:
    def __init__(self, db: Any) -> None:
        self.db = db
        self.messages: list[tuple[StepMessage, str | None]] = []
        self.lock = threading.Lock()

    def __call__(self, message: StepMessage, queue: str | None = None, **_: Any) -> bool:
        with self.lock:
            self.messages.append((message, queue))
        self.db.mark_sent(message.run_id, message.step, message.attempt)
        return True

    send = __call__  # as a Publisher, for lifecycle's resumes


def submitted(db: Any, *, queue: str | None = None) -> tuple[StepMessage, float]:
    """A run whose step-0 outbox row was written at the returned time (the database's
    clock, as the row has it) and never sent."""
    first = record_run(db, build_flow("sweep_two"), Store({}), queue=queue, lease_s=LEASE_S)
    return first, db.get_step(first.run_id, 0)["queued_at"]


def test_an_unsent_row_is_sent_after_the_grace_period(db: Any) -> None:
    first, t0 = submitted(db, queue="gpu")
    sent = Sent(db)
    assert not sweep(db, sent, lease_s=LEASE_S, now=t0 + UNSENT_GRACE_S / 2)
    report = sweep(db, sent, lease_s=LEASE_S, now=t0 + UNSENT_GRACE_S + 0.1)
    assert report.resent == [(first.run_id, 0)]
    assert sent.messages == [(first, "gpu")]  # same attempt, the run's queue
    assert not sweep(db, sent, lease_s=LEASE_S, now=t0 + UNSENT_GRACE_S + 0.2)  # marked sent


class OnGpu(Node):
    queue = "gpu"


@flow("sweep_gpu")
def gpu_first() -> Flow:
    start = OnGpu(name="g")
    start.then("default", Noop(name="b"))
    return Flow(start=start)


def test_a_node_queue_is_kept_with_its_step_for_every_resend(db: Any) -> None:
    """``Node.queue`` routes the step's first send and every re-send: the sweeper's, the
    bulk one after a broker loss, and a resume's, from the step row, not the graph."""
    first = record_run(db, build_flow("sweep_gpu"), Store({}), queue="cpu", lease_s=LEASE_S)
    t0 = db.get_step(first.run_id, 0)["queued_at"]
    assert db.get_step(first.run_id, 0)["queue"] == "gpu"
    sent = Sent(db)
    sweep(db, sent, lease_s=LEASE_S, now=t0 + UNSENT_GRACE_S + 0.1)
    assert sent.messages == [(first, "gpu")]
    page = liveness.queued_steps(db, None, 10)
    assert [(r["step"], r["queue"]) for r in page] == [(0, "gpu")]
    assert liveness.queues_in_use(db, "pocoflow") == ["cpu", "gpu", "pocoflow"]
    lifecycle.requeue_outstanding(db, first.run_id, sent, lease_s=LEASE_S)
    assert sent.messages[-1][1] == "gpu"


def test_an_expired_lease_is_taken_over_under_a_new_attempt(db: Any) -> None:
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    assert db.claim_step(first.run_id, 0, 1, "dead:1", LEASE_S, now=t0)
    sent = Sent(db)
    assert not sweep(db, sent, lease_s=LEASE_S, now=t0 + LEASE_S - 0.1)  # still leased
    report = sweep(db, sent, lease_s=LEASE_S, now=t0 + LEASE_S + 0.1)
    assert report.taken_over == [(first.run_id, 0, 2)]
    ((message, _),) = sent.messages
    assert (message.step, message.attempt, message.node_id) == (0, 2, "a")
    (old,) = db.get_attempts(first.run_id)
    assert old["outcome"] == "lost"
    # The dead holder's commit would now be refused; the new attempt can claim.
    assert not db.claim_step(first.run_id, 0, 1, "dead:1", LEASE_S, now=t0 + 3)
    assert db.claim_step(first.run_id, 0, 2, "live:2", LEASE_S, now=t0 + 3)


def test_a_queued_step_waiting_in_a_long_queue_is_not_sent_again_every_lease(db: Any) -> None:
    """No duplicate storm: an unclaimed step whose lease ran out is most likely waiting
    behind a backlog; only after REQUEUE_AFTER_S in the queue does the backstop send it
    again (same attempt: the claim lets one copy run)."""
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    sent = Sent(db)
    lease_periods = int(REQUEUE_AFTER_S // LEASE_S) - 1
    for k in range(1, lease_periods + 1):
        assert not sweep(db, sent, lease_s=LEASE_S, now=t0 + k * LEASE_S + 0.1)
    assert sent.messages == []
    later = t0 + REQUEUE_AFTER_S + 0.1
    report = sweep(db, sent, lease_s=LEASE_S, now=later)
    assert report.resent == [(first.run_id, 0)] and report.taken_over == []
    assert [m.attempt for m, _ in sent.messages] == [1]
    row = db.get_step(first.run_id, 0)
    assert (row["attempt"], row["status"]) == (1, "queued")
    # The sweep renewed the lease from its own clock: now + lease, to the float.
    assert row["lease_expires_at"] == pytest.approx(later + LEASE_S, abs=1e-3)
    assert db.claim_step(first.run_id, 0, 1, "w:2", LEASE_S, now=later + 0.1)


def test_try_number_continues_after_recorded_retries(db: Any) -> None:
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    db.claim_step(first.run_id, 0, 1, "w:1", LEASE_S, now=t0)
    db.end_attempt(first.run_id, 0, 1, "w:1", "retry", now=t0)
    assert db.take_over(first.run_id, 0, 1, LEASE_S, now=t0, force=True) == 2
    db.mark_sent(first.run_id, 0, 2, now=t0)  # the retry message, then lost
    sent = Sent(db)
    sweep(db, sent, lease_s=LEASE_S, now=t0 + REQUEUE_AFTER_S + 0.1)
    ((message, _),) = sent.messages
    assert (message.attempt, message.try_number) == (2, 2)


def test_try_number_starts_afresh_after_a_resume(db: Any) -> None:
    first, t0 = submitted(db)
    run_id = first.run_id
    db.mark_sent(run_id, 0, 1, now=t0)
    db.claim_step(run_id, 0, 1, "w:1", LEASE_S, now=t0)
    db.end_attempt(run_id, 0, 1, "w:1", "retry", now=t0)
    assert db.take_over(run_id, 0, 1, LEASE_S, now=t0, force=True) == 2
    db.claim_step(run_id, 0, 2, "w:1", LEASE_S, now=t0)
    db.end_attempt(run_id, 0, 2, "w:1", "failed", now=t0)  # out of tries: the run failed...
    assert db.take_over(run_id, 0, 2, LEASE_S, now=t0, force=True) == 3  # ...and is resumed
    db.claim_step(run_id, 0, 3, "w:1", LEASE_S, now=t0)
    db.end_attempt(run_id, 0, 3, "w:1", "retry", now=t0)
    assert db.take_over(run_id, 0, 3, LEASE_S, now=t0, force=True) == 4
    db.mark_sent(run_id, 0, 4, now=t0)  # the retry message, then lost
    sent = Sent(db)
    sweep(db, sent, lease_s=LEASE_S, now=t0 + REQUEUE_AFTER_S + 0.1)
    ((message, _),) = sent.messages
    assert (message.attempt, message.try_number) == (4, 2)  # one retry since the resume


@pytest.mark.parametrize("idle", ["paused", "cancelled", "failed", "completed"])
def test_idle_runs_are_left_alone(db: Any, idle: str) -> None:
    first, t0 = submitted(db)
    db.update_run(first.run_id, status=idle)
    later = t0 + LEASE_S + UNSENT_GRACE_S + 1
    assert not sweep(db, Sent(db), lease_s=LEASE_S, now=later)


def test_a_pause_request_not_yet_met_is_still_swept(db: Any) -> None:
    """The guard of the re-sent message is what parks the run."""
    first, t0 = submitted(db)
    db.update_run(first.run_id, status="running")
    lifecycle.request_pause(db, first.run_id)
    assert sweep(db, Sent(db), lease_s=LEASE_S, now=t0 + UNSENT_GRACE_S + 0.1).resent


@pytest.mark.parametrize("claimed", [False, True])
def test_racing_sweepers_act_once(db: Any, claimed: bool) -> None:
    first, t0 = submitted(db)
    db.mark_sent(first.run_id, 0, 1, now=t0)
    if claimed:  # a worker took it, then died: taken over under attempt 2
        assert db.claim_step(first.run_id, 0, 1, "w:1", LEASE_S, now=t0)
    sent = Sent(db)
    barrier = threading.Barrier(4)
    reports: list[Any] = []

    def sweeper() -> None:
        barrier.wait()
        reports.append(sweep(db, sent, lease_s=LEASE_S, now=t0 + REQUEUE_AFTER_S + 0.1))

    threads = [threading.Thread(target=sweeper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acted = [len(r.taken_over) if claimed else len(r.resent) for r in reports]
    assert sum(acted) == 1
    expected = 2 if claimed else 1
    assert [m.attempt for m, _ in sent.messages] == [expected]
    assert db.get_step(first.run_id, 0)["attempt"] == expected


def test_a_sweeper_whose_host_clock_is_ahead_takes_over_no_live_step(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leases are written on the database's clock; the sweep must compare them with that
    clock too, or a sweeper on a host running ahead takes over (and doubles) every live
    step (issue 6 defect 9). Nothing injected: the sweep reads the clock itself."""
    first, _ = submitted(db)
    db.mark_sent(first.run_id, 0, 1)
    assert db.claim_step(first.run_id, 0, 1, "live:1", 30.0)
    second, _ = submitted(db)  # sent, not yet claimed: its message is in the queue
    db.mark_sent(second.run_id, 0, 1)
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 3600.0)  # this host runs an hour ahead
    sent = Sent(db)
    assert not sweep(db, sent, lease_s=30.0)
    assert sent.messages == []
    assert db.get_step(first.run_id, 0)["attempt"] == 1
    assert db.get_step(second.run_id, 0)["attempt"] == 1


def test_a_resume_on_a_host_whose_clock_is_ahead_leases_on_the_database_clock(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume re-queues the outstanding step with a lease; written on the resuming
    host's clock an hour ahead, a lost message of that step would wait an hour for the
    sweeper instead of one lease (G3, issue 6 defect 9)."""
    first, _ = submitted(db)
    db.mark_sent(first.run_id, 0, 1)
    assert lifecycle.request_cancel(db, first.run_id)
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 3600.0)  # this host runs an hour ahead
    sent = Sent(db)
    assert lifecycle.restart(db, first.run_id, sent, lease_s=LEASE_S)  # type: ignore[arg-type]
    assert [(m.step, m.attempt) for m, _ in sent.messages] == [(0, 2)]
    row = db.get_step(first.run_id, 0)
    assert row["attempt"] == 2
    db_now = db.clock()
    assert row["queued_at"] <= db_now
    assert row["lease_expires_at"] <= db_now + LEASE_S
