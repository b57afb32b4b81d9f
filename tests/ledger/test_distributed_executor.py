"""The step protocol driven in-process on both ledgers: ``execute_step`` with a recording
publisher instead of Celery, so each rule (G1 fencing, guards, refusals, G7 values) is
checked without worker processes. The distributed suite repeats the important ones with
real workers."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pocoflow import Flow, Node, flow
from pocoflow.distributed import executor, lifecycle
from pocoflow.distributed.client import record_run
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.distributed.message import StepMessage
from pocoflow.registry import build_flow
from pocoflow.step import RunCancelled
from pocoflow.store import Store

pytestmark = pytest.mark.ledger

LEASE_S = 10.0
#: Test hook: called by ``Grabbed.exec`` with (run_id, step, attempt).
ON_EXEC: list[Any] = []


class Publish:
    """Records what the executor would publish, and marks it sent as a Publisher does."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.sent: list[tuple[StepMessage, dict[str, Any]]] = []

    def send(self, message: StepMessage, **kwargs: Any) -> bool:
        self.sent.append((message, kwargs))
        self.db.mark_sent(
            message.run_id, message.step, message.attempt, task_id=f"t{len(self.sent)}"
        )
        return True

    __call__ = send

    def revoke(self, task_id: str, **kwargs: Any) -> None:
        pass

    def take(self) -> list[StepMessage]:
        messages = [m for m, _ in self.sent]
        self.sent.clear()
        return messages


class Add(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["n"] = store.get("n", 0) + 1
        return "default"


class Grabbed(Node):
    """Its exec lets the test interfere (e.g. take the lease over) mid-step."""

    def exec(self, prep_result: Any) -> None:
        for hook in ON_EXEC:
            hook(self.run_id, self.step, self.attempt)

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["grabbed"] = True
        return "default"


class Unstorable(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["sock"] = object()
        return "default"


@flow("exec_three")
def three() -> Flow:
    a, b, c = Add(name="a"), Add(name="b"), Add(name="c")
    a.then("default", b)
    b.then("default", c)
    return Flow(start=a)


@flow("exec_grabbed")
def grabbed() -> Flow:
    node = Grabbed()
    node.then("default", Add(name="after"))
    return Flow(start=node)


class StopsItself(Node):
    """As a sub-flow does when it meets a cancel between its inner nodes."""

    def exec(self, prep_result: Any) -> None:
        raise RunCancelled("cancelled inside the step")


@flow("exec_stops")
def stops() -> Flow:
    return Flow(start=StopsItself())


@flow("exec_unstorable")
def unstorable() -> Flow:
    node = Add(name="ok")
    node.then("default", Unstorable())
    return Flow(start=node)


@pytest.fixture
def publish(db: Any) -> Publish:
    return Publish(db)


@pytest.fixture
def ctx(db: Any, publish: Publish) -> WorkerContext:
    return WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]


def start(db: Any, name: str, store: dict[str, Any] | None = None) -> StepMessage:
    return record_run(db, build_flow(name), Store(store or {}), lease_s=LEASE_S)


def drain(ctx: WorkerContext, publish: Publish, first: StepMessage) -> list[str]:
    outcomes, queue = [], [first]
    while queue:
        outcomes.append(execute_step(queue.pop(0).to_dict(), worker_id="h:1", context=ctx))
        queue.extend(publish.take())
    return outcomes


def test_a_run_drains_to_completion(db: Any, ctx: WorkerContext, publish: Publish) -> None:
    first = start(db, "exec_three")
    assert db.get_run(first.run_id)["status"] == "queued"
    assert drain(ctx, publish, first) == ["committed"] * 3
    run = db.get_run(first.run_id)
    assert run["status"] == "completed" and run["total_steps"] == 3
    assert db.load_checkpoint(first.run_id, 2).as_dict() == {"n": 3}
    assert [a["outcome"] for a in db.get_attempts(first.run_id)] == ["committed"] * 3


def test_the_same_message_twice_commits_once(db: Any, ctx: WorkerContext, publish: Publish) -> None:
    first = start(db, "exec_three")
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "committed"
    assert execute_step(first.to_dict(), worker_id="h:2", context=ctx) == "duplicate"
    assert len(publish.take()) == 1  # one successor


def test_racing_deliveries_have_exactly_one_winner(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_three")
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def deliver(i: int) -> None:
        barrier.wait()
        outcomes.append(execute_step(first.to_dict(), worker_id=f"h:{i}", context=ctx))

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["committed"] + ["duplicate"] * 3
    assert [c["step"] for c in db.get_checkpoints(first.run_id)] == [0]
    assert len(publish.take()) == 1


def test_an_attempt_that_lost_its_lease_commits_and_enqueues_nothing(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_grabbed")
    new_attempts: list[int | None] = []
    ON_EXEC.append(
        lambda run_id, step, attempt: new_attempts.append(
            db.take_over(run_id, step, attempt, LEASE_S, force=True)
        )
    )
    try:
        assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "lost"
    finally:
        ON_EXEC.clear()
    assert new_attempts == [2]
    assert db.get_checkpoints(first.run_id) == [] and publish.take() == []
    assert db.get_step(first.run_id, 1) is None  # no successor row either
    # The new attempt runs and wins.
    again = StepMessage(first.run_id, first.flow, 0, first.node_id, 2)
    assert drain(ctx, publish, again) == ["committed", "committed"]


def test_a_stale_attempt_does_nothing(db: Any, ctx: WorkerContext, publish: Publish) -> None:
    first = start(db, "exec_three")
    assert db.take_over(first.run_id, 0, 1, LEASE_S, force=True) == 2
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "duplicate"
    assert db.get_attempts(first.run_id) == []  # the stale delivery never started


def test_an_unstorable_value_fails_the_run_naming_the_key(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_unstorable")
    assert drain(ctx, publish, first) == ["committed", "failed"]
    run = db.get_run(first.run_id)
    assert run["status"] == "failed" and "'sock'" in run["error_msg"]
    assert [c["step"] for c in db.get_checkpoints(first.run_id)] == [0]
    assert db.get_step(first.run_id, 1)["status"] == "failed"


def test_cancelled_and_finished_runs_stop_at_the_guard(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_three")
    assert lifecycle.request_cancel(db, first.run_id)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "cancelled"
    assert db.get_step(first.run_id, 0)["status"] == "queued"  # left for a resume
    assert not lifecycle.request_cancel(db, first.run_id)  # already finished
    done = start(db, "exec_three")
    drain(ctx, publish, done)
    assert execute_step(done.to_dict(), worker_id="h:1", context=ctx) == "stopped"


def test_a_pause_parks_the_run_and_resume_sends_the_step_again(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_three")
    assert lifecycle.request_pause(db, first.run_id)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "paused"
    assert db.get_run(first.run_id)["status"] == "paused"
    assert lifecycle.resume_paused(db, first.run_id, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
    (again,) = publish.take()
    assert (again.step, again.attempt) == (0, 2)  # the parked attempt is fenced out
    assert drain(ctx, publish, again) == ["committed"] * 3


def test_a_pause_withdrawn_before_the_guard_parks_lets_the_step_run(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_three")
    lifecycle.request_pause(db, first.run_id)
    assert not lifecycle.resume_paused(db, first.run_id, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
    assert publish.take() == []
    assert drain(ctx, publish, first) == ["committed"] * 3


def test_unknown_runs_and_malformed_messages(db: Any, ctx: WorkerContext, publish: Publish) -> None:
    first = start(db, "exec_three")
    bad = {**first.to_dict(), "attempt": "one"}
    assert execute_step(bad, worker_id="h:1", context=ctx) == "malformed"
    (event,) = [e for e in db.get_events(first.run_id) if e["event"] == "message_malformed"]
    assert "'attempt'" in event["error_msg"]
    other_flow = {**first.to_dict(), "flow": "exec_grabbed"}
    assert execute_step(other_flow, worker_id="h:1", context=ctx) == "malformed"
    assert db.get_run(first.run_id)["status"] == "queued"  # the run is not harmed
    ghost = StepMessage("no-such-run", "exec_three", 0, "a", 1).to_dict()
    assert execute_step(ghost, worker_id="h:1", context=ctx) == "unknown_run"
    assert execute_step({"junk": True}, worker_id="h:1", context=ctx) == "malformed"


def test_a_message_naming_another_flow_parks_no_paused_run(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """The flow is checked before the guard: a forged message for a paused run is
    refused as malformed and does not park the step (which the guard would do for a
    real one), so the run's real message still finds it queued."""
    first = start(db, "exec_three")
    lifecycle.request_pause(db, first.run_id)
    other_flow = {**first.to_dict(), "flow": "exec_grabbed"}
    assert execute_step(other_flow, worker_id="h:1", context=ctx) == "malformed"
    assert db.get_run(first.run_id)["status"] == "queued"
    assert db.get_step(first.run_id, 0)["status"] == "queued"
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "paused"


def test_a_step_gets_its_store_from_the_claim_not_from_a_read_of_its_own(
    db: Any, ctx: WorkerContext, publish: Publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step of a run whose Store this process does not hold takes it from the
    claim (``claim_to_run``): no read of its own after the claim."""

    def no_second_read(*args: Any) -> Any:
        raise AssertionError("the Store was read again after the claim")

    monkeypatch.setattr(db, "load_store", no_second_read)
    first = start(db, "exec_three")
    outcomes, queue = [], [first]
    while queue:
        ctx.handoff.clear()  # as under load: the next step lands on another process
        outcomes.append(execute_step(queue.pop(0).to_dict(), worker_id="h:1", context=ctx))
        queue.extend(publish.take())
    assert outcomes == ["committed"] * 3
    monkeypatch.undo()
    assert db.load_checkpoint(first.run_id, 2).as_dict() == {"n": 3}


def test_a_ledger_failure_inside_the_step_is_contained(
    db: Any, ctx: WorkerContext, publish: Publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = start(db, "exec_three")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("ledger went away")

    real = db.claim_to_run
    # The claim wins without the Store, then reading it again under the claim fails.
    monkeypatch.setattr(db, "claim_to_run", lambda *a, **kw: (*real(*a, **kw)[:2], None))
    monkeypatch.setattr(db, "load_store", broken)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == executor.CRASHED


def test_a_step_that_stops_for_a_cancel_commits_nothing(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_stops")
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "cancelled"
    assert db.get_run(first.run_id)["status"] == "cancelled"
    assert db.get_checkpoints(first.run_id) == [] and publish.take() == []
    (attempt,) = db.get_attempts(first.run_id)
    assert attempt["outcome"] == "cancelled"


def test_the_next_step_in_the_same_process_reuses_the_committed_store(
    db: Any, ctx: WorkerContext, publish: Publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = start(db, "exec_three")
    loads: list[int] = []
    real = db.claim_to_run

    def counting(*args: Any, load_step: int | None, **kwargs: Any) -> Any:
        if load_step is not None:
            loads.append(load_step)
        return real(*args, load_step=load_step, **kwargs)

    monkeypatch.setattr(db, "claim_to_run", counting)
    assert drain(ctx, publish, first) == ["committed"] * 3
    assert loads == [-1]  # steps 1 and 2 took the Store this process had just committed
    assert db.load_checkpoint(first.run_id, 2).as_dict() == {"n": 3}
    # A second delivery of a step finds no handoff (taken once) and reads the ledger.
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "stopped"
    assert loads == [-1, -1]


def test_a_cancel_between_the_delivery_and_the_claim_runs_no_node(
    db: Any, ctx: WorkerContext, publish: Publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel committed before the claim's batch starts. (One landing between the
    batch's run read and its claim, on PostgreSQL: tests/ledger/test_fencing.py.)"""
    first = start(db, "exec_three")
    real = db.claim_to_run

    def cancel_first(run_id: str, *args: Any, **kwargs: Any) -> Any:
        if not db.get_run(run_id)["control"]:
            lifecycle.request_cancel(db, run_id)  # lands after the delivery, before the claim
        return real(run_id, *args, **kwargs)

    monkeypatch.setattr(db, "claim_to_run", cancel_first)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "cancelled"
    assert db.get_checkpoints(first.run_id) == [] and db.get_attempts(first.run_id) == []
    assert db.get_run(first.run_id)["status"] == "cancelled"


def test_a_cancel_while_the_last_step_runs_is_not_overwritten_by_its_commit(
    db: Any, ctx: WorkerContext, publish: Publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = start(db, "exec_three")
    outcomes = [execute_step(first.to_dict(), worker_id="h:1", context=ctx)]
    second = publish.take()[0]
    outcomes.append(execute_step(second.to_dict(), worker_id="h:1", context=ctx))
    last = publish.take()[0]
    real = db.commit_step

    def cancel_then_commit(commit: Any, **kw: Any) -> bool:
        lifecycle.request_cancel(db, first.run_id)
        return real(commit, **kw)

    monkeypatch.setattr(db, "commit_step", cancel_then_commit)
    outcomes.append(execute_step(last.to_dict(), worker_id="h:1", context=ctx))
    assert outcomes == ["committed"] * 3
    run = db.get_run(first.run_id)
    assert (run["status"], run["total_steps"]) == ("cancelled", 3)  # the cancel stands


def test_a_run_stranded_between_failing_its_step_and_itself_can_be_resumed(db: Any) -> None:
    from pocoflow.distributed.client import _stranded

    first = start(db, "exec_three")
    assert db.claim_step(first.run_id, 0, 1, "h:1", LEASE_S)
    db.update_run(first.run_id, status="running")
    assert not _stranded(db, first.run_id, db.get_run(first.run_id))
    # A step failed under a run still running: what separate transactions once left when
    # the process died between failing the step and failing the run.
    assert lifecycle.fail_run(db, first.run_id, "boom", step=0, attempt=1, holder="h:1")
    db.update_run(first.run_id, status="running")
    assert _stranded(db, first.run_id, db.get_run(first.run_id))


class FailsOnceLimited(Node):
    """``rate_limit`` 1 a minute, 3 tries; its first exec fails."""

    rate_limit = "1/m"
    max_retries = 3
    calls: list[int] = []

    def exec(self, prep_result: Any) -> str:
        FailsOnceLimited.calls.append(self.attempt)
        if len(FailsOnceLimited.calls) == 1:
            raise ValueError("first try fails")
        return "ok"


@flow("exec_limited")
def limited() -> Flow:
    return Flow(start=FailsOnceLimited())


def test_a_limit_wait_gives_the_step_back_without_spending_a_try(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """Try 2 is refused by the rate limit: it ends as ``limited`` and comes back as try 2
    (a new attempt, a countdown of the wait, a lease covering it); nothing ran."""
    from pocoflow.limits import LocalLimiter

    clock = [1000.0]
    ctx.limiter = LocalLimiter(lambda: clock[0])
    FailsOnceLimited.calls.clear()
    first = start(db, "exec_limited")
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "retry"
    ((second, _),) = publish.sent
    publish.take()
    assert (second.try_number, second.attempt) == (2, 2)
    before = db.clock()
    assert execute_step(second.to_dict(), worker_id="h:1", context=ctx) == "limited"
    ((third, sent),) = publish.sent
    publish.take()
    assert (third.try_number, third.attempt) == (2, 3)
    assert 60 <= sent["countdown"] <= 66  # the wait, plus up to 10% jitter
    assert db.get_step(first.run_id, 0)["lease_expires_at"] >= before + 60 + LEASE_S
    assert FailsOnceLimited.calls == [1]  # the refused try never reached exec
    clock[0] += 60
    assert execute_step(third.to_dict(), worker_id="h:1", context=ctx) == "committed"
    outcomes = [a["outcome"] for a in db.get_attempts(first.run_id)]
    assert outcomes == ["retry", "limited", "committed"]
