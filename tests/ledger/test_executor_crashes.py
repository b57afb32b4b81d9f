"""A delivery that crashes in the executor after its claim (issue 7), driven in-process on
both ledgers: an exception that is not the node's (here a Store value the ledger holds
but no process can decode) is counted against the crash budget, the step is sent again
under a new attempt after a backoff, and at the budget the run fails naming run, step
and node; it is resumable once fixed. A ledger that cannot be reached is not a crash.
The same with real workers, and for map items: tests/distributed/test_executor_crashes."""

from __future__ import annotations

from typing import Any

import pytest
from psycopg import errors as psycopg_errors
from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeout

from pocoflow.distributed import executor, lifecycle
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.distributed.message import StepMessage
from pocoflow.ledger import liveness
from pocoflow.ledger.tables import pf_checkpoints, pf_values
from tests.ledger import test_distributed_executor as protocol
from tests.ledger.test_distributed_executor import LEASE_S, Publish, drain, start

pytestmark = pytest.mark.ledger
# The step-protocol tests' fixtures: a recording publisher and a worker context on it.
publish, ctx = protocol.publish, protocol.ctx

UNDECODABLE = '{"__pf__": "no-such-tag", "v": 1}'


def set_initial_value(db: Any, run_id: str, key: str, text: str) -> None:
    """Write ``text`` as the stored value of ``key`` in the run's initial Store."""
    stmt = (
        update(pf_values)
        .where(pf_values.c.run_id == run_id, pf_values.c.step == -1, pf_values.c.key == key)
        .values(value_json=text)
    )
    assert db._write(lambda conn: conn.execute(stmt).rowcount, "corrupting", run_id) == 1


def test_a_step_crashing_in_the_executor_is_sent_again_then_fails_its_run(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "exec_three", {"n": 0})
    set_initial_value(db, first.run_id, "n", UNDECODABLE)
    sent: list[tuple[StepMessage, dict[str, Any]]] = []
    real_send = publish.send

    def recording(message: StepMessage, **kwargs: Any) -> bool:
        sent.append((message, kwargs))
        return real_send(message, **kwargs)

    publish.send = recording  # type: ignore[method-assign]
    assert drain(ctx, publish, first) == ["crashed", "crashed", "failed"]
    # Each crash sent the step again under the next attempt, after a growing backoff.
    assert [(m.attempt, kw.get("countdown")) for m, kw in sent] == [(2, 1.0), (3, 2.0)]
    rows = [(a["attempt"], a["outcome"]) for a in db.get_attempts(first.run_id)]
    assert rows == [(1, "crashed"), (2, "crashed"), (3, "failed")]
    assert "CodecError" in db.get_attempts(first.run_id)[0]["error_msg"]
    run = db.get_run(first.run_id)
    assert run["status"] == "failed" and db.get_checkpoints(first.run_id) == []
    for named in (first.run_id, "Step 0", "node 'a'", "3 times", "CodecError", "no-such-tag"):
        assert named in run["error_msg"], (named, run["error_msg"])

    # Fixed, and resumed: the crash count starts afresh and the run completes.
    set_initial_value(db, first.run_id, "n", "0")
    assert lifecycle.restart(db, first.run_id, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
    [again] = publish.take()
    assert drain(ctx, publish, again) == ["committed"] * 3
    assert db.load_checkpoint(first.run_id, 2).as_dict() == {"n": 3}


def test_a_store_the_database_refuses_to_read_is_a_crash_too(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """A checkpoint whose rows the server cannot even read (a manifest naming a step
    that is not a number: PostgreSQL's cast fails inside the claim's batch, rolling the
    claim back with it) is claimed again without the read and counted as the decoding
    error is, not re-sent for ever unclaimed."""
    first = start(db, "exec_three", {"n": 0})
    stmt = (
        update(pf_checkpoints)
        .where(pf_checkpoints.c.run_id == first.run_id, pf_checkpoints.c.step == -1)
        .values(manifest='{"n": "x"}')
    )
    assert db._write(lambda conn: conn.execute(stmt).rowcount, "corrupting", first.run_id) == 1
    assert drain(ctx, publish, first) == ["crashed", "crashed", "failed"]
    rows = [(a["attempt"], a["outcome"]) for a in db.get_attempts(first.run_id)]
    assert rows == [(1, "crashed"), (2, "crashed"), (3, "failed")]
    assert db.get_run(first.run_id)["status"] == "failed"


def test_the_crash_budget_is_the_poison_step_setting(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    ctx.max_crashes = 1
    first = start(db, "exec_three", {"n": 0})
    set_initial_value(db, first.run_id, "n", UNDECODABLE)
    assert drain(ctx, publish, first) == ["failed"]
    assert "1 times in a row" in db.get_run(first.run_id)["error_msg"]


def pg_error(error: type[Exception]) -> Exception:
    """A PostgreSQL error as SQLAlchemy raises it (psycopg files 25006, 25P03 under
    ``InternalError``, 55P03 under ``OperationalError``)."""
    import psycopg

    return DBAPIError.instance("UPDATE pf_steps", {}, error("from the server"), psycopg.Error)


@pytest.mark.parametrize(
    "outage",
    [
        OperationalError("SELECT 1", {}, Exception("connection refused")),
        PoolTimeout("QueuePool limit of size 5 overflow 10 reached"),
        pg_error(psycopg_errors.ReadOnlySqlTransaction),
        pg_error(psycopg_errors.IdleInTransactionSessionTimeout),
        pg_error(psycopg_errors.LockNotAvailable),
        pg_error(psycopg_errors.AdminShutdown),
    ],
    ids=["connection", "pool", "read-only", "idle-timeout", "lock", "shutdown"],
)
def test_a_ledger_that_cannot_be_reached_after_the_claim_is_not_a_crash(
    db: Any,
    ctx: WorkerContext,
    publish: Publish,
    monkeypatch: pytest.MonkeyPatch,
    outage: Exception,
) -> None:
    """A lost connection or a starved pool says nothing about the step: it is not
    counted, and the step is left to its lease (the sweeper re-sends it), as before."""
    first = start(db, "exec_three", {"n": 0})
    real = db.claim_to_run  # the claim wins without the Store, read again after it
    monkeypatch.setattr(db, "claim_to_run", lambda *a, **kw: (*real(*a, **kw)[:2], None))

    def unreachable(*args: Any) -> Any:
        raise outage

    monkeypatch.setattr(db, "load_store", unreachable)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == executor.CRASHED
    step = db.get_step(first.run_id, 0)
    assert (step["status"], step["attempt"]) == ("running", 1)
    [row] = db.get_attempts(first.run_id)
    assert row["outcome"] is None and publish.take() == []


def test_a_resume_of_a_paused_run_starts_the_crash_count_afresh(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """Crash, pause (met at the guard, before any claim: no attempt row of its own),
    resume, crash: one crash since the resume, not two (which, at a budget of 2, failed
    the run as if the crashes had come in a row)."""
    ctx.max_crashes = 2
    first = start(db, "exec_three", {"n": 0})
    set_initial_value(db, first.run_id, "n", UNDECODABLE)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == executor.CRASHED
    [again] = publish.take()
    assert lifecycle.request_pause(db, first.run_id)
    assert execute_step(again.to_dict(), worker_id="h:1", context=ctx) == "paused"
    assert lifecycle.resume_paused(db, first.run_id, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
    [resumed] = publish.take()
    assert execute_step(resumed.to_dict(), worker_id="h:1", context=ctx) == executor.CRASHED
    assert db.get_run(first.run_id)["status"] == "running"
    [last] = publish.take()
    assert execute_step(last.to_dict(), worker_id="h:1", context=ctx) == "failed"
    assert "2 times in a row" in db.get_run(first.run_id)["error_msg"]


def test_postgresql_errors_are_judged_by_their_sqlstate() -> None:
    """Not by psycopg's class: a value too big for its index (54000) is an
    ``OperationalError`` but fails the same way every time (a crash, bounded by the
    budget); a read-only server (25006) is an ``InternalError`` but passes."""
    unreachable = executor._unreachable
    assert unreachable(pg_error(psycopg_errors.ReadOnlySqlTransaction))
    assert unreachable(pg_error(psycopg_errors.SerializationFailure))
    assert unreachable(pg_error(psycopg_errors.TooManyConnections))
    assert not unreachable(pg_error(psycopg_errors.ProgramLimitExceeded))
    assert not unreachable(pg_error(psycopg_errors.InFailedSqlTransaction))
    assert not unreachable(pg_error(psycopg_errors.UntranslatableCharacter))


def test_crashes_on_one_of_two_live_workers_do_not_fail_the_run(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """A cause only one worker has (a type it never registered, an import missing on its
    host): its crashes alone, even past the budget, do not fail the run while another
    worker is alive; a crash on a second worker does, naming both."""
    ctx.max_crashes, ctx.dead_after_s = 3, 600.0
    for worker in ("h:1", "h:2"):
        liveness.record_beat(db, worker, "h", 1)
    first = start(db, "exec_three", {"n": 0})
    set_initial_value(db, first.run_id, "n", UNDECODABLE)
    message = first
    for _ in range(4):  # past the budget of 3, all on h:1
        assert execute_step(message.to_dict(), worker_id="h:1", context=ctx) == executor.CRASHED
        [message] = publish.take()
    assert db.get_run(first.run_id)["status"] == "running"
    assert execute_step(message.to_dict(), worker_id="h:2", context=ctx) == "failed"
    error = db.get_run(first.run_id)["error_msg"]
    assert "5 times in a row, on 2 worker process(es): h:1, h:2" in error, error


def test_crashes_on_one_worker_fail_the_run_at_twice_the_budget(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """Bounded all the same: a re-sent step that keeps landing on the one worker (the
    only consumer of its queue) fails its run at twice the budget."""
    ctx.max_crashes, ctx.dead_after_s = 2, 600.0
    for worker in ("h:1", "h:2"):
        liveness.record_beat(db, worker, "h", 1)
    first = start(db, "exec_three", {"n": 0})
    set_initial_value(db, first.run_id, "n", UNDECODABLE)
    outcomes, queue = [], [first]
    while queue:
        outcomes.append(execute_step(queue.pop().to_dict(), worker_id="h:1", context=ctx))
        queue.extend(publish.take())
    assert outcomes == [executor.CRASHED] * 3 + ["failed"]
    error = db.get_run(first.run_id)["error_msg"]
    assert "4 times in a row, on 1 worker process(es): h:1" in error, error
