"""The fence holds against every copy of a step, not only stale attempts (issue 6, defects
3, 4, 6, 8, 9): a re-claimed lease fences out its frozen holder, the ledger decides which
node a step runs, failing a step is one transaction, a cancel cannot slip between the
guard's read and the claim, leases run on the database's clock, and errors do not print
Store values. On both ledgers, with an injected clock where the code allows."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import pytest
from sqlalchemy import insert, update

from pocoflow import Flow, Node, flow
from pocoflow.commit import NextStep, StepFailure
from pocoflow.distributed import executor, lifecycle
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.distributed.message import StepMessage
from pocoflow.hooks import NODE_ERROR
from pocoflow.ledger import liveness
from pocoflow.ledger.tables import pf_values
from tests.ledger.test_distributed_executor import LEASE_S, ON_EXEC, Publish, drain, start
from tests.ledger.test_ledger_commit import make_commit, start as start_run

pytestmark = pytest.mark.ledger


class Broken(Node):
    """Fails for good (no retries): the step and its run fail."""

    def exec(self, prep_result: Any) -> None:
        raise ValueError("broken for good")


@flow("fence_broken")
def broken() -> Flow:
    return Flow(start=Broken())


@pytest.fixture
def publish(db: Any) -> Publish:
    return Publish(db)


@pytest.fixture
def ctx(db: Any, publish: Publish) -> WorkerContext:
    return WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]


# ── defect 3: the fence names the lease holder, not only the attempt ─────────


def test_a_frozen_holder_cannot_commit_after_its_attempt_was_claimed_again(db: Any) -> None:
    manifest = start_run(db)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "w1", lease_s=10, now=100.0)
    # w1 freezes past its lease; the broker delivers the same attempt to w2.
    assert db.claim_step("r1", 0, 1, "w2", lease_s=10, now=111.0)
    frozen = make_commit("r1", 0, manifest, {"n": 1}, attempt=1, worker="w1")
    assert db.commit_step(frozen, now=112.0) is False
    assert db.latest_checkpoint("r1")["step"] == -1
    assert db.renew_lease("r1", 0, 1, "w1", 10, now=112.0) is False
    live = make_commit("r1", 0, manifest, {"n": 2}, attempt=1, worker="w2")
    assert db.commit_step(live, now=113.0) is True
    assert db.load_checkpoint("r1", 0)["n"] == 2


def test_a_frozen_holder_cannot_commit_onto_a_step_failed_by_the_new_holder(db: Any) -> None:
    manifest = start_run(db)
    db.update_run("r1", status="running")
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "w1", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "w2", lease_s=10, now=111.0)
    assert not lifecycle.fail_run(db, "r1", "boom", step=0, attempt=1, holder="w1")
    assert lifecycle.fail_run(db, "r1", "boom", step=0, attempt=1, holder="w2")
    frozen = make_commit("r1", 0, manifest, {"n": 1}, attempt=1, worker="w1")
    assert db.commit_step(frozen, now=112.0) is False
    assert db.get_step("r1", 0)["status"] == "failed"
    assert db.get_run("r1")["status"] == "failed" and db.get_checkpoints("r1") == []


def test_a_frozen_holder_cannot_schedule_a_retry_of_its_attempt_claimed_again(
    db: Any,
) -> None:
    """A retry's take-over is the holder's own: a frozen holder whose exec raised must not
    re-queue the step another delivery of the same attempt now runs (which would fence
    that live holder out and run exec once more)."""
    start_run(db)
    db.update_run("r1", status="running")
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "w1", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "w2", lease_s=10, now=111.0)
    assert db.take_over("r1", 0, 1, 10, now=112.0, holder="w1") is None
    row = db.get_step("r1", 0)
    assert (row["attempt"], row["status"], row["lease_owner"]) == (1, "running", "w2")
    assert db.take_over("r1", 0, 1, 10, now=112.0, holder="w2") == 2  # its own retry


def delivered_twice(
    ctx: WorkerContext, first: StepMessage, meanwhile: Any = None
) -> tuple[str, list[str]]:
    """Outcomes of ``first`` delivered in this process, and of the same message delivered
    again (same worker id) while the first one's exec runs, after ``meanwhile(run_id,
    step)``."""
    inner: list[str] = []

    def deliver_again(run_id: str, step: int, attempt: int) -> None:
        ON_EXEC.clear()  # the copy's own exec, if it ran, must not nest again
        if meanwhile is not None:
            meanwhile(run_id, step)
        inner.append(execute_step(first.to_dict(), worker_id="h:1", context=ctx))

    ON_EXEC.append(deliver_again)
    try:
        outer = execute_step(first.to_dict(), worker_id="h:1", context=ctx)
    finally:
        ON_EXEC.clear()
    return outer, inner


def test_two_deliveries_in_one_process_do_not_share_a_lease(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """A threads pool runs both copies under the same worker id: only one may claim."""
    first = start(db, "exec_grabbed")
    assert delivered_twice(ctx, first) == ("committed", ["duplicate"])
    assert [a["outcome"] for a in db.get_attempts(first.run_id)] == ["committed"]


def test_a_redelivery_in_the_same_process_closes_only_its_own_attempt_row(
    db: Any, ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The executor's side of the two-holder case: the first delivery's lease runs out
    while its exec runs (no renewal here, as in a freeze), the broker delivers the same
    attempt again to the same process, which claims, runs and commits it; the first then
    finishes, its commit is refused, and each closes its own row."""
    from pocoflow.ledger.tables import pf_steps

    monkeypatch.setattr(ctx.leases, "hold", lambda *args, **kwargs: contextlib.nullcontext())
    first = start(db, "exec_grabbed")

    def lease_runs_out(run_id: str, step: int) -> None:
        expire = update(pf_steps).where(pf_steps.c.run_id == run_id, pf_steps.c.step == step)
        db._write(lambda conn: conn.execute(expire.values(lease_expires_at=0.0)), "x", run_id)

    assert delivered_twice(ctx, first, lease_runs_out) == ("lost", ["committed"])
    rows = [a for a in db.get_attempts(first.run_id) if a["step"] == 0]
    assert sorted((a["attempt"], a["worker"], a["outcome"]) for a in rows) == [
        (1, "h:1", "committed"),
        (1, "h:1", "lost"),
    ]
    assert len({a["holder"] for a in rows}) == 2


# ── defect 4: the ledger, not the message, names the node ───────────────────


def test_a_message_naming_another_node_is_refused_and_recorded(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_three")
    forged = StepMessage(first.run_id, "exec_three", 0, "c", 1)  # the last node, at step 0
    assert execute_step(forged.to_dict(), worker_id="h:1", context=ctx) == "malformed"
    assert db.get_checkpoints(first.run_id) == [] and publish.take() == []
    assert db.get_step(first.run_id, 0)["status"] == "queued"  # the real message still runs
    events = [e for e in db.get_events(first.run_id) if e["event"] == "message_malformed"]
    assert len(events) == 1 and "'c'" in events[0]["error_msg"]
    assert "'a'" in events[0]["error_msg"]
    assert db.get_run(first.run_id)["status"] == "queued"  # not failed
    assert drain(ctx, publish, first) == ["committed"] * 3
    assert db.load_checkpoint(first.run_id, 2).as_dict() == {"n": 3}


# ── defect 6: failing a step is one transaction ──────────────────────────────


def test_failing_a_step_is_all_or_nothing(
    db: Any, ctx: WorkerContext, publish: Publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pocoflow.ledger import events

    first = start(db, "fence_broken")
    real_row = events.row

    def crash_on_node_error(run_id: str, event: str, fields: Any) -> dict[str, Any]:
        if event == NODE_ERROR:
            raise RuntimeError("crash while failing the step")
        return real_row(run_id, event, fields)

    monkeypatch.setattr(events, "row", crash_on_node_error)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "crashed"
    # Nothing half done: the step is not failed but sent again as attempt 2 (a crash of
    # the executor, within the crash budget), the run still running, no error event.
    step, run = db.get_step(first.run_id, 0), db.get_run(first.run_id)
    assert (step["status"], step["attempt"], run["status"]) == ("queued", 2, "running")
    assert [e["event"] for e in db.get_events(first.run_id)] == ["flow_start"]
    [again] = publish.take()
    assert (again.step, again.attempt) == (0, 2)

    monkeypatch.setattr(events, "row", real_row)
    assert execute_step(again.to_dict(), worker_id="h:1", context=ctx) == "failed"
    step, run = db.get_step(first.run_id, 0), db.get_run(first.run_id)
    assert (step["status"], run["status"]) == ("failed", "failed")
    assert "broken for good" in run["error_msg"]
    assert [a["outcome"] for a in db.get_attempts(first.run_id)] == ["crashed", "failed"]
    assert [e["event"] for e in db.get_events(first.run_id)].count(NODE_ERROR) == 1


# ── defect 8: PostgreSQL's guard, and a stale commit in pipeline mode ────────


def test_a_cancel_committed_after_the_guard_read_stops_the_claim(
    db: Any, ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard read and the claim go out as one batch, but on PostgreSQL (READ
    COMMITTED) each statement sees what committed before it, so another process's cancel
    can land between the read and the claim. The claim's own statement must see it:
    simulated here by a read that reports the run as it was before the cancel."""
    from pocoflow.db import WorkflowDB
    from pocoflow.ledger import runs

    start_run(db)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    before = db.get_run("r1")
    other = WorkflowDB(ledger_url)
    try:
        lifecycle.request_cancel(other, "r1")
    finally:
        other.close()
    real_row = runs.guard_row

    def stale_row(rows: Any) -> Any:
        return {**real_row(rows), "status": before["status"], "control": None}

    monkeypatch.setattr(runs, "guard_row", stale_row)
    claimed, run = db.claim_if_runnable("r1", 0, 1, "w1", 10, now=101.0)
    assert run is not None and run["control"] is None  # the read found it runnable
    assert not claimed
    assert db.get_step("r1", 0)["status"] == "queued" and db.get_attempts("r1") == []
    assert db.get_run("r1")["status"] == "cancelled"


def test_a_stale_commit_with_a_successor_is_a_clean_loss(db: Any) -> None:
    manifest = start_run(db)
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "w1", lease_s=10, now=100.0)
    assert db.take_over("r1", 0, 1, lease_s=10, now=111.0) == 2
    assert db.claim_step("r1", 0, 2, "w2", lease_s=10, now=112.0)
    nxt = NextStep(1, "Node", 1, 125.0)
    won = make_commit("r1", 0, manifest, {"n": 2}, attempt=2, worker="w2", next_step=nxt)
    assert db.commit_step(won, now=113.0) is True
    # w1 wakes and commits too, changing no value: its successor row collides with the
    # winner's (PostgreSQL sends the whole batch before the fence's row count is seen).
    stale = make_commit("r1", 0, manifest, {}, attempt=1, worker="w1", next_step=nxt)
    assert db.commit_step(stale, now=114.0) is False
    assert db.load_checkpoint("r1", 0)["n"] == 2


def test_a_stale_commit_on_a_worker_is_recorded_as_lost(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """Its node changes no value, so on PostgreSQL only the successor's row collides."""
    first = start(db, "exec_grabbed", {"grabbed": True})
    inner: list[str] = []

    def newer_attempt_commits_first(run_id: str, step: int, attempt: int) -> None:
        ON_EXEC.clear()
        assert db.take_over(run_id, step, attempt, LEASE_S, force=True) == 2
        again = StepMessage(run_id, "exec_grabbed", step, first.node_id, 2)
        inner.append(execute_step(again.to_dict(), worker_id="h:2", context=ctx))

    ON_EXEC.append(newer_attempt_commits_first)
    try:
        outer = execute_step(first.to_dict(), worker_id="h:1", context=ctx)
    finally:
        ON_EXEC.clear()
    assert (outer, inner) == ("lost", ["committed"])
    attempts = [(a["attempt"], a["worker"], a["outcome"]) for a in db.get_attempts(first.run_id)]
    assert attempts == [(1, "h:1", "lost"), (2, "h:2", "committed")]
    assert [c["step"] for c in db.get_checkpoints(first.run_id)] == [0]
    assert len(publish.take()) == 1  # the winner's successor only


# ── defect 9: worker ids, the database's clock, parameters kept out of errors ─


def test_the_worker_id_is_unique_per_process_and_names_host_and_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = executor.default_worker_id()
    assert worker == executor.default_worker_id()  # stable within the process
    host, pid = worker.rsplit(":", 1)
    assert pid == str(os.getpid()) and host.startswith(socket.gethostname())
    # Containers share host names and pids: the id must not be host:pid alone, and
    # another process with the same host and pid (as a fresh one starts) draws another.
    assert worker != f"{socket.gethostname()}:{os.getpid()}"
    monkeypatch.setattr(executor, "_worker_id", None)
    other = executor.default_worker_id()
    assert other != worker and other.rsplit(":", 1)[1] == pid


def test_leases_run_on_the_database_clock(db: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    start_run(db)
    db.update_run("r1", status="running")
    assert db.insert_step("r1", 0, "Node", lease_s=30)
    assert db.claim_step("r1", 0, 1, "live", lease_s=30)
    before, wall = time.time(), time.time
    monkeypatch.setattr(time, "time", lambda: wall() + 3600.0)  # this host runs an hour ahead
    # A sweeper on the host that is ahead sees a live lease, and cannot take it over.
    assert db.expired_steps() == []
    assert db.take_over("r1", 0, 1, lease_s=30) is None
    assert db.renew_lease("r1", 0, 1, "live", lease_s=30)
    expires = db.get_step("r1", 0)["lease_expires_at"]
    assert before + 25 < expires < wall() + 35


def test_a_failing_statement_does_not_print_store_values(db: Any) -> None:
    from pocoflow.ledger import txn

    secret = "hunter2-do-not-log"
    row = {"run_id": "ghost", "step": 0, "key": "password", "value_json": f'"{secret}"'}
    with pytest.raises(Exception) as failure:
        txn.run(db._ledger, lambda conn: conn.execute(insert(pf_values), row), write=True, what="x")
    assert secret not in str(failure.value) and secret not in repr(failure.value)


def test_a_retried_claim_opens_its_attempt_row_once(db: Any) -> None:
    """The claim's retry after a lost COMMIT (PostgreSQL: test_unknown_outcome) writes the
    attempt row only if its first try's row is not there; on both ledgers."""
    from pocoflow.ledger import steps

    start_run(db)
    db.update_run("r1", status="running")
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)

    def retried_claim(conn: Any) -> bool:
        return steps.claim_reading_run(
            conn, "r1", 0, 1, "w1", "w1#1", 10, 100.0, "t1", read_run=False, retried=True
        )[0]

    assert db._write(retried_claim, "claiming", "r1")  # the first try never landed: opens it
    assert db._write(retried_claim, "claiming", "r1")  # it landed: wins again, no second row
    rows = [(a["attempt"], a["worker"], a["task_id"], a["ended_at"]) for a in db.get_attempts("r1")]
    assert rows == [(1, "w1", "t1", None)]
    assert db.get_attempts("r1")[0]["started_at"] == 100.0


def _two_holders_of_one_attempt(db: Any) -> dict[str, Any]:
    """Step 0 of r1 claimed by h:1#1, which froze past its lease, then by h:1#2: two
    deliveries of attempt 1 in one process (threads pool), one worker id."""
    manifest = start_run(db)
    db.update_run("r1", status="running")
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    assert db.claim_step("r1", 0, 1, "h:1", lease_s=10, now=100.0, holder="h:1#1")
    assert db.claim_step("r1", 0, 1, "h:1", lease_s=10, now=111.0, holder="h:1#2")
    return manifest


def _outcomes(db: Any) -> list[tuple[str, str | None]]:
    return sorted((a["holder"], a["outcome"]) for a in db.get_attempts("r1"))


def test_two_holders_in_one_process_close_only_their_own_attempt_rows(db: Any) -> None:
    """Each delivery closes its own ``pf_attempts`` row (by its holder token, not the
    worker id they share): the live holder's commit does not close the frozen holder's
    row as committed too, so the audit shows one commit. It closes it as ``lost``, fenced
    out, in the same transaction: the frozen delivery may never wake to close it, and the
    sweeper never looks at a committed step again (the monitor showed it running)."""
    manifest = _two_holders_of_one_attempt(db)
    live = make_commit("r1", 0, manifest, {"n": 2}, attempt=1, worker="h:1", holder="h:1#2")
    assert db.commit_step(live, now=112.0)
    assert _outcomes(db) == [("h:1#1", "lost"), ("h:1#2", "committed")]
    [fenced] = [a for a in db.get_attempts("r1") if a["holder"] == "h:1#1"]
    assert (fenced["error_msg"], fenced["ended_at"]) == ("fenced out by h:1#2", 112.0)
    frozen = make_commit("r1", 0, manifest, {"n": 1}, attempt=1, worker="h:1", holder="h:1#1")
    assert not db.commit_step(frozen, now=113.0)
    # What its executor then records (``_StepRun._end``) finds its row closed already.
    assert not db.end_attempt("r1", 0, 1, "h:1", "lost", now=113.0, holder="h:1#1")
    assert _outcomes(db) == [("h:1#1", "lost"), ("h:1#2", "committed")]
    # The readers: the monitor's Attempts tab and Gantt show one commit and one loss.
    from datetime import UTC, datetime

    from pocoflow.ui import queries
    from pocoflow.ui.charts import gantt_bars

    rows = queries.attempts_page(db, "r1").rows
    assert sorted(r["outcome"] for r in rows) == ["committed", "lost"]
    assert sorted((r["holder"], r["outcome"]) for r in rows) == _outcomes(db)  # tells them apart
    bars = gantt_bars(rows, datetime.now(UTC))
    assert sorted(b["outcome"] for b in bars) == ["committed", "lost"]


def test_a_failure_closes_the_other_open_rows_of_its_attempt_as_fenced_out(db: Any) -> None:
    """The same for a step failed by the live holder: one transaction fails the step,
    closes its row ``failed`` and the frozen holder's ``lost``."""
    _two_holders_of_one_attempt(db)
    failure = StepFailure("r1", 0, 1, holder="h:1#2", worker="h:1", error_msg="ValueError: x")
    assert db.fail_step(failure, now=112.0)
    assert _outcomes(db) == [("h:1#1", "lost"), ("h:1#2", "failed")]
    [fenced] = [a for a in db.get_attempts("r1") if a["holder"] == "h:1#1"]
    assert fenced["error_msg"] == "fenced out by h:1#2"
    # Not a crash: its worker lives on.
    assert liveness.crashes(db.get_attempts("r1"), 0) == (0, 0)


def test_a_frozen_holders_loss_leaves_the_live_holders_row_open(db: Any) -> None:
    """The other order: the frozen holder wakes, is refused and ends its row ``lost``
    while the live one still runs; the live row stays open (the monitor shows it running)
    and its commit closes it, and only it counts as this holder's own commit after a
    lost COMMIT (``_own``)."""
    from pocoflow.db import _own

    manifest = _two_holders_of_one_attempt(db)
    frozen = make_commit("r1", 0, manifest, {"n": 1}, attempt=1, worker="h:1", holder="h:1#1")
    assert not db.commit_step(frozen, now=112.0)
    assert db.end_attempt("r1", 0, 1, "h:1", "lost", now=112.0, holder="h:1#1")
    assert _outcomes(db) == [("h:1#1", "lost"), ("h:1#2", None)]
    live = make_commit("r1", 0, manifest, {"n": 2}, attempt=1, worker="h:1", holder="h:1#2")
    assert db.commit_step(live, now=113.0)
    assert _outcomes(db) == [("h:1#1", "lost"), ("h:1#2", "committed")]
    assert db._read(lambda conn: _own(conn, live) and not _own(conn, frozen))
