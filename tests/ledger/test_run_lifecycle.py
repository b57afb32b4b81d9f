"""Run-level transitions racing with steps (issue 6 defects 1 and 2), in-process on both
ledgers: a resume that loses its take-over to another process must not complete the run,
and a pause met by a duplicate delivery must not strand a run whose step another worker
is running."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pocoflow import Flow, Node, flow
from pocoflow.distributed import client, lifecycle
from pocoflow.distributed.client import record_run
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.distributed.message import StepMessage
from pocoflow.distributed.sweeper import UNSENT_GRACE_S, sweep
from tests.ledger.test_distributed_executor import LEASE_S, Add, Publish, drain, start

pytestmark = pytest.mark.ledger

#: Test hook: called by ``Meddled.exec`` with (run_id, step, attempt).
ON_EXEC: list[Any] = []


class Meddled(Node):
    """The last node; its exec lets the test interfere while it holds the step."""

    def exec(self, prep_result: Any) -> None:
        for hook in ON_EXEC:
            hook(self.run_id, self.step, self.attempt)

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["meddled"] = True
        return "default"


@flow("lifecycle_meddled")
def meddled() -> Flow:
    first = Add(name="first")
    first.then("default", Meddled())
    return Flow(start=first)


class FailsFirst(Node):
    max_retries = 2
    retry_delay = 30.0

    def exec(self, prep_result: Any) -> None:
        if self.attempt == 1:
            raise RuntimeError("flaky")


@flow("lifecycle_flaky")
def flaky() -> Flow:
    return Flow(start=FailsFirst())


class LostPublish(Publish):
    """A broker that never got the message (and the publisher gave up)."""

    def send(self, message: StepMessage, **kwargs: Any) -> bool:
        self.sent.append((message, kwargs))
        return False

    __call__ = send


@pytest.fixture
def publish(db: Any) -> Publish:
    return Publish(db)


@pytest.fixture
def ctx(db: Any, publish: Publish) -> WorkerContext:
    return WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]


@pytest.fixture
def resume(db: Any, publish: Publish, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``client.resume_run`` on the test's ledger, publishing through ``publish``."""
    monkeypatch.setattr(client, "open_ledger", lambda url: db)
    monkeypatch.setattr(client, "_publisher", lambda settings: publish)

    def call(run_id: str) -> Any:
        return client.resume_run(run_id, db_url="sqlite:///unused.db")

    return call


def cancelled_before_step_0(db: Any, ctx: WorkerContext, name: str = "exec_three") -> StepMessage:
    first = start(db, name)
    assert lifecycle.request_cancel(db, first.run_id)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "cancelled"
    return first


def after_get_step(db: Any, monkeypatch: pytest.MonkeyPatch, meddle: Any) -> None:
    """Run ``meddle(row)`` once, right after the next ``get_step`` read its row: what
    another process does between a resumer's read and its take-over."""
    real = db.get_step

    def get_step(run_id: str, step: int) -> Any:
        row = real(run_id, step)
        monkeypatch.setattr(db, "get_step", real)
        meddle(row)
        return row

    monkeypatch.setattr(db, "get_step", get_step)


def test_a_resume_that_loses_its_take_over_to_another_resumer_does_not_complete_the_run(
    db: Any, ctx: WorkerContext, publish: Publish, resume: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = cancelled_before_step_0(db, ctx)
    after_get_step(
        db,
        monkeypatch,
        lambda row: db.take_over(first.run_id, 0, row["attempt"], LEASE_S, force=True),
    )
    resume(first.run_id)
    run = db.get_run(first.run_id)
    assert run["status"] == "running", "step 0 never ran: the run cannot be completed"
    assert run["completed_at"] is None
    assert publish.take() == []  # the winner sends attempt 2; this resumer sends nothing
    assert db.get_step(first.run_id, 0)["attempt"] == 2
    again = StepMessage(first.run_id, first.flow, 0, first.node_id, 2)
    assert drain(ctx, publish, again) == ["committed"] * 3
    assert db.get_run(first.run_id)["status"] == "completed"


def test_a_resume_that_meets_a_stale_commit_sends_the_next_step(
    db: Any, ctx: WorkerContext, publish: Publish, resume: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery of step 0 of the cancelled run commits between the resumer's read of the
    step and its take-over: the resumer goes on with step 1."""
    first = start(db, "exec_three")
    worker = Publish(db)
    slow = WorkerContext(db=db, publisher=worker, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]
    assert lifecycle.request_cancel(db, first.run_id)

    def stale_commit(row: Any) -> None:
        # The run is running again (resume set it); the slow worker's delivery commits.
        assert execute_step(first.to_dict(), worker_id="h:slow", context=slow) == "committed"

    after_get_step(db, monkeypatch, stale_commit)
    resume(first.run_id)
    assert db.get_run(first.run_id)["status"] == "running"
    (sent,) = publish.take()
    assert (sent.step, sent.attempt) == (1, 2)  # step 1, fencing out the worker's own send
    assert drain(ctx, publish, sent) == ["committed"] * 2
    assert db.get_run(first.run_id)["status"] == "completed"
    assert db.load_checkpoint(first.run_id, 2).as_dict() == {"n": 3}


def test_a_resume_of_a_run_whose_last_step_committed_completes_it(
    db: Any, ctx: WorkerContext, publish: Publish, resume: Any
) -> None:
    first = start(db, "exec_three")
    assert drain(ctx, publish, first) == ["committed"] * 3
    db.update_run(first.run_id, status="failed", completed_at=None)  # e.g. a late failure
    resume(first.run_id)
    assert db.get_run(first.run_id)["status"] == "completed"
    assert publish.take() == []


def test_a_duplicate_meeting_a_pause_while_another_worker_runs_the_last_step_lets_it_end(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "lifecycle_meddled")
    assert drain_one(ctx, publish, first) == "committed"
    (last,) = publish.take()
    outcomes: list[str] = []

    def pause_and_duplicate(run_id: str, step: int, attempt: int) -> None:
        assert lifecycle.request_pause(db, run_id)
        outcomes.append(execute_step(last.to_dict(), worker_id="h:dup", context=ctx))

    ON_EXEC.append(pause_and_duplicate)
    try:
        assert execute_step(last.to_dict(), worker_id="h:1", context=ctx) == "committed"
    finally:
        ON_EXEC.clear()
    assert outcomes == ["duplicate"]  # it does not park a run whose step is held
    run = db.get_run(first.run_id)
    assert run["status"] == "completed"
    lifecycle.resume_paused(db, first.run_id, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
    assert db.get_run(first.run_id)["status"] == "completed"


def test_resuming_a_paused_run_whose_last_step_committed_completes_it(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """However the run came to be paused after its last commit, resume ends it."""
    first = start(db, "exec_three")
    assert drain(ctx, publish, first) == ["committed"] * 3
    db.update_run(first.run_id, status="paused", completed_at=None)
    assert lifecycle.resume_paused(db, first.run_id, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
    assert db.get_run(first.run_id)["status"] == "completed"


def test_the_last_commit_of_a_paused_run_completes_it(db: Any) -> None:
    """A step already running when the run was parked (its holder looked dead) commits
    when it wakes: a pause stops the next node, not the end of the run."""
    first = start(db, "exec_three")
    for step in range(3):
        assert db.claim_step(first.run_id, step, 1, "h:1", LEASE_S)
        if step == 2:
            db.update_run(first.run_id, status="paused")
        assert commit(db, first.run_id, step, last=step == 2)
    run = db.get_run(first.run_id)
    assert run["status"] == "completed" and run["completed_at"] is not None


def drain_one(ctx: WorkerContext, publish: Publish, message: StepMessage) -> str:
    return execute_step(message.to_dict(), worker_id="h:1", context=ctx)


def commit(db: Any, run_id: str, step: int, *, last: bool) -> bool:
    from pocoflow.commit import NextStep, StepCommit

    fields: dict[str, Any] = {"total_steps": step + 1}
    if last:
        fields.update(status="completed", completed_at="2026-01-01T00:00:00")
    return db.commit_step(
        StepCommit(
            run_id=run_id,
            step=step,
            node_name="n",
            action="default",
            next_node=None if last else "n",
            manifest={},
            changed={},
            events=[],
            run_fields=fields,
            attempt=1,
            next_step=None if last else NextStep(step + 1, "n", 1, None),
            worker="h:1",
        )
    )


def test_the_sweeper_resends_an_unsent_retry_once_its_backoff_is_over(db: Any) -> None:
    first = start(db, "lifecycle_flaky")
    lost = LostPublish(db)
    worker = WorkerContext(db=db, publisher=lost, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]
    t0 = time.time()
    assert execute_step(first.to_dict(), worker_id="h:1", context=worker) == "retry"
    ((_, scheduled),) = lost.sent
    assert scheduled["countdown"] == FailsFirst.retry_delay
    resent = Publish(db)
    # Queued as of the end of its backoff: not sent again before it is due...
    assert not sweep(db, resent, lease_s=LEASE_S, now=t0 + UNSENT_GRACE_S + 4.0)
    # ...and then at once, without a countdown (the backoff is over).
    due = time.time() + FailsFirst.retry_delay + UNSENT_GRACE_S + 0.1
    assert sweep(db, resent, lease_s=LEASE_S, now=due).resent == [(first.run_id, 0)]
    ((message, kwargs),) = resent.sent
    assert (message.attempt, message.try_number) == (2, 2)
    assert "countdown" not in kwargs


@pytest.mark.parametrize("status", ["queued", "running", "paused", "cancelled", "failed"])
def test_flow_resume_refuses_a_run_that_belongs_to_the_workers(
    db: Any, ledger_url: str, status: str
) -> None:
    """Flow.resume would run it in this process beside the workers, unfenced (a paused or
    cancelled run's queued step would be swept to a worker as soon as it runs again)."""
    from pocoflow.errors import RunSetupError
    from pocoflow.registry import build_flow

    first = start(db, "exec_three")
    db.update_run(first.run_id, status=status)
    local = build_flow("exec_three")
    local.db_path = ledger_url
    with pytest.raises(RunSetupError, match=rf"{first.run_id}.*pocoflow resume {first.run_id}"):
        local.resume(first.run_id)
    assert db.get_checkpoints(first.run_id) == []
    assert db.get_run(first.run_id)["status"] == status


def test_a_handle_resumes_a_cancelled_distributed_run_as_the_cli_does(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """What Flow.resume's refusal recommends: ``attach(run_id).resume()``."""
    from pocoflow.distributed.control import RemoteControl

    first = cancelled_before_step_0(db, ctx)
    control = RemoteControl(
        first.run_id, db, redis_url=None, publisher_factory=lambda: publish, lease_s=LEASE_S
    )  # type: ignore[arg-type]
    control.resume()
    (again,) = publish.take()
    assert (again.step, again.attempt) == (0, 2)
    assert drain(ctx, publish, again) == ["committed"] * 3
    assert db.get_run(first.run_id)["status"] == "completed"


class Typed(Node):
    """Records the Store it was given on the worker."""

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["seen"] = [*store.get("seen", []), [store.name, sorted(store.schema)]]
        return "default"


@flow("lifecycle_typed")
def typed() -> Flow:
    first = Typed(name="first")
    first.then("default", Typed(name="second"))
    return Flow(start=first, schema={"n": int, "seen": list})


def test_a_store_rebuilt_on_a_worker_has_the_runs_name_and_the_flows_schema(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    from pocoflow.registry import build_flow
    from pocoflow.store import Store

    store = Store({"n": 1}, schema={"n": int, "seen": list}, name="orders")
    first = record_run(db, build_flow("lifecycle_typed"), store, lease_s=LEASE_S)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "committed"
    (second,) = publish.take()
    ctx.handoff.clear()  # another worker process takes step 1: it rebuilds the Store
    assert execute_step(second.to_dict(), worker_id="h:2", context=ctx) == "committed"
    final = db.load_checkpoint(first.run_id, 1)
    assert final["seen"] == [["orders", ["n", "seen"]]] * 2


def test_a_store_that_does_not_fit_the_flows_schema_refuses_the_step_instead_of_crashing(
    db: Any, ctx: WorkerContext
) -> None:
    """The flow's schema changed after submit (a deploy): the worker cannot rebuild the
    Store. The run fails naming the key, resumable; a crash would leave the step leased
    for the sweeper to re-run, crashing the same way every lease."""
    from pocoflow.registry import build_flow
    from pocoflow.store import Store

    loose = build_flow("lifecycle_typed")
    loose.schema = None  # the flow as it was when the run was submitted
    first = record_run(db, loose, Store({"n": "one"}), lease_s=LEASE_S)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "refused"
    run = db.get_run(first.run_id)
    assert run["status"] == "failed"
    assert "'n'" in run["error_msg"] and "schema" in run["error_msg"]
    assert db.get_step(first.run_id, 0)["status"] == "failed"


def test_submit_checks_the_store_against_the_flows_schema(db: Any) -> None:
    from pocoflow.registry import build_flow
    from pocoflow.store import Store

    with pytest.raises(TypeError, match="'n'"):
        record_run(
            db,
            build_flow("lifecycle_typed"),
            Store({"n": "one"}),
            run_id="r-typed",
            lease_s=LEASE_S,
        )
    assert db.get_run("r-typed") is None


def test_a_flows_schema_is_what_resume_and_fork_rebuild_the_store_with(ledger_url: str) -> None:
    from pocoflow.store import Store
    from tests.ledger.test_flow_runs import Count

    def typed() -> Flow:
        node = Count()
        node.then("next", node)
        return Flow(start=node, db_path=ledger_url, flow_name="count", schema={"n": int})

    Count.fail_at = 1
    failed = typed()
    with pytest.raises(RuntimeError, match="boom at 1"):
        failed.run(Store({"n": 0, "until": 3}))
    resumed = typed().resume(failed.last_run_id)
    assert resumed["n"] == 3 and dict(resumed.schema) == {"n": int}
    forked = typed().fork(failed.last_run_id, from_step=0)
    assert forked["n"] == 3 and dict(forked.schema) == {"n": int}


def test_resuming_a_run_cancelled_while_its_last_step_ran_completes_it_with_one_flow_end(
    db: Any, ctx: WorkerContext, publish: Publish, resume: Any
) -> None:
    """The last step's commit recorded ``flow_end`` (the cancel kept the status); the
    resume that completes the run must not record the end a second time."""
    from pocoflow.hooks import FLOW_END

    first = start(db, "lifecycle_meddled")
    assert drain_one(ctx, publish, first) == "committed"
    (last,) = publish.take()
    ON_EXEC.append(lambda run_id, step, attempt: lifecycle.request_cancel(db, run_id))
    try:
        assert drain_one(ctx, publish, last) == "committed"
    finally:
        ON_EXEC.clear()
    assert db.get_run(first.run_id)["status"] == "cancelled"
    resume(first.run_id)
    assert db.get_run(first.run_id)["status"] == "completed"
    assert [e["event"] for e in db.get_events(first.run_id)].count(FLOW_END) == 1


def test_of_two_resumers_that_both_saw_the_run_stopped_one_restarts_it(
    db: Any, ctx: WorkerContext, publish: Publish, resume: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reads the run cancelled; A resumes it before B's compare-and-set. B must not
    restart it a second time (a take-over of A's fresh attempt, whose worker then loses
    its step): B is told the status changed."""
    first = cancelled_before_step_0(db, ctx)
    real = db.get_run

    def get_run(run_id: str) -> Any:
        row = real(run_id)
        monkeypatch.setattr(db, "get_run", real)
        resume(run_id)  # A, between B's read and B's compare-and-set
        return row

    monkeypatch.setattr(db, "get_run", get_run)
    with pytest.raises(ValueError, match="changed status"):
        resume(first.run_id)
    (sent,) = publish.take()
    assert sent.attempt == 2 and db.get_step(first.run_id, 0)["attempt"] == 2


def test_a_pause_and_its_event_land_in_one_transaction_or_not_at_all(db: Any) -> None:
    """A reader that sees ``paused`` also sees why: the status and its events are one
    write (a budget's pause between items, a pause between items, the guard's park)."""
    first = start(db, "exec_three")
    said = [{"event": "budget_exceeded", "step": 0, "error_msg": "over"}, {"event": "run_paused"}]
    # A miss (no pause requested) writes neither the status nor the events.
    assert not db.update_run_if(
        first.run_id, control_in=("pause",), with_events=said, status="paused"
    )
    assert [e["event"] for e in db.get_events(first.run_id)].count("run_paused") == 0
    lifecycle.request_pause(db, first.run_id)
    assert db.update_run_if(first.run_id, control_in=("pause",), with_events=said, status="paused")
    events = [e["event"] for e in db.get_events(first.run_id)]
    assert events[-2:] == ["budget_exceeded", "run_paused"]
    # The guard's park writes its run_paused with the status too.
    second = start(db, "exec_three")
    lifecycle.request_pause(db, second.run_id)
    assert lifecycle.park(db, second.run_id, 0, 1, "h:1#1")
    assert db.get_run(second.run_id)["status"] == "paused"
    assert [e["event"] for e in db.get_events(second.run_id)][-1] == "run_paused"
