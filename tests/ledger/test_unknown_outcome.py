"""PostgreSQL transactions whose outcome the client cannot know, or that the server
aborted to resolve a conflict (issue 6 defects 7 and 8).

* The connection dies *after* COMMIT landed, before the client hears back (a real
  ``pg_terminate_backend`` of the session, hooked in right after the server committed):
  the retry of the whole transaction then meets its own write. Every call must see it as
  its own (``submit``, ``commit_step``, ``request_cancel``, a resume's take-over) instead of
  reporting "already exists", "lost" or "already finished".
* Serialization failures and deadlocks (SQLSTATE 40001 / 40P01), forced by a trigger, are
  retried a bounded number of times.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from pocoflow import Flow, Node, flow
from pocoflow.db import WorkflowDB
from pocoflow.distributed import lifecycle
from pocoflow.distributed.client import record_run
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.hooks import RUN_CANCELLED, RUN_PAUSED
from pocoflow.ledger import txn
from pocoflow.ledger.errors import LedgerConflictError
from pocoflow.registry import build_flow
from pocoflow.store import Store
from tests.conftest import fresh_postgres_database
from tests.helpers import wait_until
from tests.ledger.test_distributed_executor import LEASE_S, Add, Publish, drain, start

pytestmark = pytest.mark.ledger


@pytest.fixture
def pg_url(database_url: str) -> Iterator[str]:
    with fresh_postgres_database(database_url) as url:
        yield url


@pytest.fixture
def db(pg_url: str) -> Iterator[WorkflowDB]:
    ledger = WorkflowDB(pg_url)
    yield ledger
    ledger.close()


@pytest.fixture
def publish(db: WorkflowDB) -> Publish:
    return Publish(db)


@pytest.fixture
def ctx(db: WorkflowDB, publish: Publish) -> WorkerContext:
    return WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]


def dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class CommitKiller:
    """Arms a hook on the ledger's engine: the next write's COMMIT lands on the server, then
    the session is terminated (``pg_terminate_backend``) before the client reads anything
    more, so the client sees its connection lost with the outcome unknown."""

    def __init__(self, db: WorkflowDB, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dsn = dsn(url)
        self.armed = 0
        self.fired = 0
        #: Run after the kill, before the client retries: what other processes write then.
        self.meanwhile: list[Any] = []
        #: Kill the session before the COMMIT reaches the server: it never lands, and the
        #: client cannot tell this from a COMMIT that landed.
        self.before = False
        dialect = db._ledger.engine.dialect
        real = dialect.do_commit

        def do_commit(dbapi_conn: Any) -> None:
            # Writes only: a transaction is open (reads run in autocommit, and so do the
            # batched writes, whose BEGIN went out in their batch).
            armed = self.armed and dbapi_conn.driver_connection.pgconn.transaction_status != 0
            if not (armed and self.before):
                real(dbapi_conn)
            if armed:
                self.armed -= 1
                self.fired += 1
                self._kill(dbapi_conn)

        monkeypatch.setattr(dialect, "do_commit", do_commit)

    def arm(self, times: int = 1) -> None:
        self.armed = times

    def _kill(self, pooled: Any) -> None:
        dbapi_conn: psycopg.Connection[Any] = pooled.driver_connection
        pid = dbapi_conn.info.backend_pid
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        for write in self.meanwhile:
            write()
        dbapi_conn.execute("SELECT 1")  # raises: the socket is dead, psycopg marks it broken


@pytest.fixture
def killer(db: WorkflowDB, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> CommitKiller:
    return CommitKiller(db, pg_url, monkeypatch)


def test_the_kill_hook_loses_the_connection_after_the_commit_landed(
    db: WorkflowDB, killer: CommitKiller
) -> None:
    db.create_run("r-hook", "f")
    killer.arm()
    db.update_run("r-hook", current_node="landed")  # retried, same write: no error
    assert killer.fired == 1
    assert db.get_run("r-hook")["current_node"] == "landed"


def test_submit_whose_commit_outcome_was_lost_finds_its_own_run(
    db: WorkflowDB, batch_killer: BatchCommitKiller
) -> None:
    killer = batch_killer  # the run's rows go out in one batch, with their COMMIT
    killer.arm()
    first = record_run(db, build_flow("exec_three"), Store({}), run_id="r-1", lease_s=LEASE_S)
    assert killer.fired == 1
    assert first.run_id == "r-1"
    assert db.get_run("r-1")["status"] == "queued"
    # Another submit of the same id is still refused: the write is recognised as ours
    # only by the call that made it.
    with pytest.raises(ValueError, match="already exists"):
        record_run(db, build_flow("exec_three"), Store({}), run_id="r-1", lease_s=LEASE_S)


def test_a_step_commit_whose_outcome_was_lost_is_committed_and_its_successor_sent(
    db: WorkflowDB, ctx: WorkerContext, publish: Publish, batch_killer: BatchCommitKiller
) -> None:
    killer = batch_killer
    from tests.ledger import test_distributed_executor as base

    first = start(db, "exec_grabbed")
    base.ON_EXEC.append(lambda run_id, step, attempt: killer.arm())  # the commit's COMMIT
    try:
        assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "committed"
    finally:
        base.ON_EXEC.clear()
    assert killer.fired == 1
    (successor,) = publish.take()
    assert (successor.step, successor.attempt) == (1, 1)
    assert [a["outcome"] for a in db.get_attempts(first.run_id)] == ["committed"]
    assert drain(ctx, publish, successor) == ["committed"]
    assert db.get_run(first.run_id)["status"] == "completed"


def test_a_cancel_whose_outcome_was_lost_reports_the_cancel(
    db: WorkflowDB, killer: CommitKiller
) -> None:
    first = start(db, "exec_three")
    killer.arm()
    assert lifecycle.request_cancel(db, first.run_id)
    assert killer.fired == 1
    assert db.get_run(first.run_id)["status"] == "cancelled"
    assert [e["event"] for e in db.get_events(first.run_id)].count(RUN_CANCELLED) == 1
    assert not lifecycle.request_cancel(db, first.run_id)  # a second cancel: finished


def test_a_resume_take_over_whose_outcome_was_lost_sends_the_step(
    db: WorkflowDB,
    ctx: WorkerContext,
    publish: Publish,
    killer: CommitKiller,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = start(db, "exec_three")
    assert lifecycle.request_cancel(db, first.run_id)
    assert db.update_run_if(first.run_id, status_in=("cancelled",), status="running", control=None)
    real_get_step = db.get_step

    def get_step(run_id: str, step: int) -> Any:  # the take-over's COMMIT comes next
        monkeypatch.setattr(db, "get_step", real_get_step)
        killer.arm()
        return real_get_step(run_id, step)

    monkeypatch.setattr(db, "get_step", get_step)
    found = lifecycle.requeue_outstanding(db, first.run_id, publish, lease_s=LEASE_S)  # type: ignore[arg-type]
    assert killer.fired == 1
    assert found.message is not None and found.message.attempt == 2
    assert drain(ctx, publish, publish.take()[0]) == ["committed"] * 3


def commit_running_step(
    url: str, run_id: str, step: int, worker: str, attempt: int = 1, **changed: str
) -> None:
    """Another process (a worker holding ``step``) commits it: a separate engine, so the
    kill hook leaves it alone. Like every step commit it writes the run row too."""
    from pocoflow.commit import NextStep, StepCommit

    other = WorkflowDB(url)
    try:
        assert other.commit_step(
            StepCommit(
                run_id=run_id,
                step=step,
                node_name="a",
                action="default",
                next_node="b",
                manifest=dict.fromkeys(changed, step),
                changed=changed,
                run_fields={"total_steps": step + 1, "current_node": "b"},
                attempt=attempt,
                next_step=NextStep(step + 1, "b", 1, None),
                worker=worker,
            )
        )
    finally:
        other.close()


def test_a_lost_cancel_is_recognised_though_a_running_step_committed_before_the_retry(
    db: WorkflowDB, pg_url: str, killer: CommitKiller
) -> None:
    """A cancel lands while step 0 runs; before the client's retry, the worker commits the
    step (allowed: the cancel stops the next node), which writes the run row too. The
    cancel must still be recognised as this call's own write."""
    first = start(db, "exec_three")
    assert db.claim_step(first.run_id, 0, 1, "h:w", LEASE_S)
    killer.meanwhile.append(lambda: commit_running_step(pg_url, first.run_id, 0, "h:w"))
    killer.arm()
    assert lifecycle.request_cancel(db, first.run_id)
    assert killer.fired == 1
    assert db.get_run(first.run_id)["status"] == "cancelled"
    assert db.get_step(first.run_id, 0)["status"] == "committed"
    assert [e["event"] for e in db.get_events(first.run_id)].count(RUN_CANCELLED) == 1


class Quiet(Node):
    """Changes nothing in the Store; its exec arms the kill hook for the step's COMMIT."""

    killer: BatchCommitKiller | None = None

    def exec(self, prep_result: Any) -> None:
        assert Quiet.killer is not None
        Quiet.killer.arm()


@flow("unknown_quiet")
def quiet() -> Flow:
    first = Quiet(name="quiet")
    first.then("default", Add(name="add"))
    return Flow(start=first)


def test_a_lost_commit_of_a_step_that_changed_no_value_is_committed(
    db: WorkflowDB, ctx: WorkerContext, publish: Publish, batch_killer: BatchCommitKiller
) -> None:
    killer = batch_killer
    first = start(db, "unknown_quiet")
    Quiet.killer = killer
    try:
        assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "committed"
    finally:
        Quiet.killer = None
    assert killer.fired == 1
    (successor,) = publish.take()
    assert drain(ctx, publish, successor) == ["committed"]
    assert db.get_run(first.run_id)["status"] == "completed"


def test_a_local_step_commit_whose_outcome_was_lost_goes_on(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Flow.run(db_path=...)``: the retry of a step commit that landed finds the step's
    checkpoint; a local run has one writer, so it is its own and the run goes on (not
    ``StepConflict``)."""
    from pocoflow import recorder

    ledger = recorder.open_ledger(pg_url)
    killer = BatchCommitKiller(pg_url, monkeypatch)
    first = Quiet(name="quiet")
    first.then("default", Add(name="add"))
    local = Flow(start=first, db_path=pg_url, run_id="r-local")
    Quiet.killer = killer
    try:
        assert local.run({}).as_dict() == {"n": 1}
        assert killer.fired == 1
        assert ledger.get_run("r-local")["status"] == "completed"
        assert [c["node_name"] for c in ledger.get_checkpoints("r-local")] == ["quiet", "add"]
    finally:
        Quiet.killer = None
        ledger.close()
        recorder._open_ledger.cache_clear()


class KillsIdleLedgerSessions(Node):
    """Terminates every other session of the ledger's database: the pooled connection
    the step commit will take is dead, and nobody has told the client yet."""

    dsn = ""

    def exec(self, prep_result: Any) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        return int(killed[0])

    def post(self, store: Any, prep_result: Any, exec_result: int) -> str:
        store["killed"] = exec_result
        return "default"


def test_a_batched_step_commit_on_a_dropped_idle_connection_is_retried(pg_url: str) -> None:
    """A step commit goes out pipelined (BEGIN and its statements in one batch): a
    connection the server dropped while it idled in the pool fails that batch before
    any COMMIT was sent, so the commit is retried on a fresh connection and the run
    goes on (it used to fail at the step commit)."""
    from pocoflow import recorder

    killer = KillsIdleLedgerSessions(name="killer")
    killer.dsn = dsn(pg_url)
    killer.then("default", Add(name="add"))
    local = Flow(start=killer, db_path=pg_url, run_id="r-dropped")
    ledger = recorder.open_ledger(pg_url)
    try:
        store = local.run({})
        assert store["n"] == 1 and store["killed"] >= 1
        assert ledger.get_run("r-dropped")["status"] == "completed"
        assert [c["node_name"] for c in ledger.get_checkpoints("r-dropped")] == [
            "killer",
            "add",
        ]
    finally:
        ledger.close()
        recorder._open_ledger.cache_clear()


def test_a_step_commit_lost_before_it_landed_while_another_attempt_committed_is_lost(
    db: WorkflowDB,
    pg_url: str,
    ctx: WorkerContext,
    publish: Publish,
    batch_killer: BatchCommitKiller,
) -> None:
    """The retry of a step commit finds the step committed, by a take-over's attempt and
    not by this one: the commit is not recognised as its own (nothing is sent on, the
    worker keeps no Store for the next step)."""
    from tests.ledger import test_distributed_executor as base

    first = start(db, "exec_grabbed")

    def other_attempt_commits() -> None:
        assert db.take_over(first.run_id, 0, 1, LEASE_S, force=True) == 2
        assert db.claim_step(first.run_id, 0, 2, "h:2", LEASE_S)
        commit_running_step(pg_url, first.run_id, 0, "h:2", attempt=2, grabbed="true")

    killer = batch_killer
    killer.before = True
    killer.meanwhile.append(other_attempt_commits)
    base.ON_EXEC.append(lambda run_id, step, attempt: killer.arm())  # the commit's COMMIT
    try:
        assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "lost"
    finally:
        base.ON_EXEC.clear()
    assert killer.fired == 1
    assert publish.take() == []
    assert ctx.handoff == {}
    assert [(a["attempt"], a["outcome"]) for a in db.get_attempts(first.run_id)] == [
        (1, "lost"),
        (2, "committed"),
    ]


def test_an_event_whose_outcome_was_lost_is_written_once(
    db: WorkflowDB, killer: CommitKiller
) -> None:
    """An append has no compare-and-set to miss: the retry would write the event again
    (a second RUN_CANCELLED, NODE_RETRY...) unless it looks for the first."""
    db.create_run("r-event", "f")
    killer.arm()
    db.save_event("r-event", RUN_CANCELLED, step=2, error_msg="cancelled")
    assert killer.fired == 1
    assert [(e["event"], e["step"]) for e in db.get_events("r-event")] == [(RUN_CANCELLED, 2)]
    db.save_event("r-event", RUN_CANCELLED, step=2, error_msg="cancelled")  # a new event
    assert len(db.get_events("r-event")) == 2


# ── serialization failures and deadlocks ─────────────────────────────────────


@contextlib.contextmanager
def failing_inserts(url: str, sqlstate: str, times: int) -> Iterator[None]:
    """The next ``times`` inserts into pf_events fail with ``sqlstate`` (a sequence counts
    them, outside any transaction, so the failures survive the rollbacks)."""
    with psycopg.connect(dsn(url), autocommit=True) as admin:
        admin.execute("CREATE SEQUENCE pf_test_fail")
        admin.execute(
            f"""CREATE FUNCTION pf_test_fail() RETURNS trigger AS $$
            BEGIN
              IF nextval('pf_test_fail') <= {times} THEN
                RAISE EXCEPTION 'forced by the test' USING ERRCODE = '{sqlstate}';
              END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql"""
        )
        admin.execute(
            "CREATE TRIGGER pf_test_fail BEFORE INSERT ON pf_events "
            "FOR EACH ROW EXECUTE FUNCTION pf_test_fail()"
        )
        try:
            yield
        finally:
            admin.execute("DROP TRIGGER pf_test_fail ON pf_events")


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])
def test_serialization_failures_and_deadlocks_are_retried(
    db: WorkflowDB, pg_url: str, sqlstate: str
) -> None:
    db.create_run("r-conflict", "f")
    with failing_inserts(pg_url, sqlstate, times=2):
        db.save_event("r-conflict", "custom", error_msg="once")
    assert [e["error_msg"] for e in db.get_events("r-conflict")] == ["once"]


def test_a_conflict_that_never_clears_is_reported_after_bounded_tries(
    db: WorkflowDB, pg_url: str
) -> None:
    db.create_run("r-stuck", "f")
    with (
        failing_inserts(pg_url, "40001", times=1000),
        pytest.raises(LedgerConflictError, match="'r-stuck'"),
    ):
        db.save_event("r-stuck", "custom")
    assert db.get_events("r-stuck") == []
    assert txn.CONFLICT_RETRIES >= 3


def test_a_commit_lost_on_the_retry_of_a_conflict_is_still_recognised(
    db: WorkflowDB, pg_url: str, batch_killer: BatchCommitKiller
) -> None:
    """A serialization failure first, then the retry's COMMIT lands with its connection
    lost: the one retry on a fresh connection is not used up by the conflict's retry."""
    killer = batch_killer
    killer.arm()
    with failing_inserts(pg_url, "40001", times=1):  # the run's start event, first try
        first = record_run(db, build_flow("exec_three"), Store({}), run_id="r-2", lease_s=LEASE_S)
    assert killer.fired == 1
    assert first.run_id == "r-2"
    assert db.get_run("r-2")["status"] == "queued"


def test_a_park_whose_outcome_was_lost_records_the_pause(
    db: WorkflowDB, ctx: WorkerContext, killer: CommitKiller
) -> None:
    """The guard parks the run (a pause was requested) and the COMMIT's outcome is lost:
    the park is recognised, so its ``run_paused`` event is written."""
    first = start(db, "exec_three")
    assert lifecycle.request_pause(db, first.run_id)
    killer.arm()  # the claim is refused and rolled back: the park is the first COMMIT
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "paused"
    assert killer.fired == 1
    assert db.get_run(first.run_id)["status"] == "paused"
    assert [e["event"] for e in db.get_events(first.run_id)].count(RUN_PAUSED) == 1


def test_a_claim_whose_commit_outcome_was_lost_opens_one_attempt_row(
    db: WorkflowDB, batch_killer: BatchCommitKiller
) -> None:
    """The claim's retry wins again (the row is held by its own holder token); it must not
    open a second ``pf_attempts`` row for the one delivery: the sweeper and the poison
    limit count those rows (a take-over closes each open one as lost, a retry each as
    retry), so one crash would count twice. (The claim's COMMIT goes out in its batch.)"""
    first = start(db, "exec_three")
    killer = batch_killer
    killer.arm()
    assert db.claim_if_runnable(first.run_id, 0, 1, "w:1", LEASE_S, holder="w:1#1")[0]
    assert killer.fired == 1
    assert [(a["attempt"], a["outcome"]) for a in db.get_attempts(first.run_id)] == [(1, None)]
    # The worker dies; the take-over closes the attempt once.
    assert db.take_over(first.run_id, 0, 1, LEASE_S, force=True) == 2
    assert [(a["attempt"], a["outcome"]) for a in db.get_attempts(first.run_id)] == [(1, "lost")]


def test_a_step_failure_whose_outcome_was_lost_reports_the_failure(
    db: WorkflowDB, ctx: WorkerContext, killer: CommitKiller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing a step is one transaction (defect 6); when its COMMIT's outcome is lost,
    the retry's fence misses its own write (the step is failed already): the executor
    must report the failure, not a lost lease."""
    import tests.ledger.test_fencing  # noqa: F401  (registers the flow "fence_broken")

    first = start(db, "fence_broken")
    real_fail_step = db.fail_step

    def fail_step(failure: Any, **kw: Any) -> bool:
        killer.arm()
        return real_fail_step(failure, **kw)

    monkeypatch.setattr(db, "fail_step", fail_step)
    assert execute_step(first.to_dict(), worker_id="h:1", context=ctx) == "failed"
    assert killer.fired == 1
    assert db.get_run(first.run_id)["status"] == "failed"
    assert [(a["attempt"], a["outcome"]) for a in db.get_attempts(first.run_id)] == [(1, "failed")]


class BatchCommitKiller:
    """Arms a hook on the ledger's batches (``pgbatch.run``): the next batch that carries
    its own COMMIT (a step's claim or commit, a map item's claim or commit) lands on the
    server whole, then the session is terminated and the client fails on it: the outcome
    is unknown to it. ``before``: the next batch's session is terminated before anything
    of it reaches the server (it never lands; the client cannot tell), after the writes
    of ``meanwhile`` (what other processes write then)."""

    def __init__(self, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        from pocoflow.ledger import pgbatch, pipeline

        self.dsn = dsn(url)
        self.armed = 0
        self.fired = 0
        self.before = False
        self.meanwhile: list[Any] = []
        real = pgbatch.run
        killer = self

        def hooked(conn: psycopg.Connection[Any], commands: Any) -> Any:
            if killer.armed and killer.before:
                killer._kill(conn)
            outcomes = real(conn, commands)
            if killer.armed and pipeline.COMMIT_SENT.get():  # its results are read
                killer._kill(conn)
                conn.execute("SELECT 1")  # raises: the socket is dead, psycopg marks it broken
            return outcomes

        monkeypatch.setattr(pgbatch, "run", hooked)

    def arm(self, times: int = 1) -> None:
        self.armed = times

    def _kill(self, conn: psycopg.Connection[Any]) -> None:
        self.armed -= 1
        self.fired += 1
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", [conn.info.backend_pid])
        for write in self.meanwhile:
            write()


@pytest.fixture
def batch_killer(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> BatchCommitKiller:
    return BatchCommitKiller(pg_url, monkeypatch)


def test_map_item_claims_and_commits_whose_batched_commit_was_lost(
    db: WorkflowDB, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item's claim and its commit send their COMMIT in their batch: when the session
    dies after it landed, the claim's retry finds its own claim and the commit's retry
    its own result, counted once, reporting the join complete to the one that completed it."""
    from pocoflow.ledger.items import ItemClaim

    db.create_run("r-map", "f", initial_store={}, status="running")
    db.insert_step("r-map", 0, "M", lease_s=LEASE_S)
    assert db.claim_step("r-map", 0, 1, "w0", LEASE_S, holder="w0#1")
    assert db.fan_out("r-map", 0, 1, "w0#1", "w0", ['"a"', '"b"'], [])
    killer = BatchCommitKiller(pg_url, monkeypatch)
    claims = [ItemClaim("r-map", 0, idx, 1, f"w{idx}#1") for idx in (0, 1)]
    killer.armed = 1
    claimed, run, item = db.claim_item(claims[0], "M", LEASE_S)
    assert killer.fired == 1 and claimed and item == ('"a"', 1) and run is not None
    assert db.claim_item(claims[1], "M", LEASE_S)[0]
    killer.armed = 1
    assert db.commit_item(claims[0], result_json='"A"', lease_s=LEASE_S)[0] is True
    assert killer.fired == 2
    assert (db.get_join("r-map", 0)["done"], db.get_item("r-map", 0, 0)["status"]) == (1, "done")
    killer.armed = 1
    committed, state = db.commit_item(claims[1], result_json='"B"', lease_s=LEASE_S)
    assert killer.fired == 3
    assert committed and state is not None and (state["done"], state["total"]) == (2, 2)
    assert (state["step_status"], state["step_attempt"]) == ("queued", 2)  # the join, once
    # A stale holder's commit still writes nothing, though its batch carries a COMMIT.
    stale = ItemClaim("r-map", 0, 0, 1, "stale#1")
    assert db.commit_item(stale, result_json='"X"', lease_s=LEASE_S) == (False, None)
    assert db.get_join("r-map", 0)["done"] == 2
    assert [r["result_json"] for r in db.get_items("r-map", 0)] == ['"A"', '"B"']


def test_a_group_of_item_commits_whose_commit_was_lost_confirms_each_item(
    db: WorkflowDB, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads' item commits share one transaction (``items.commit_many``) whose
    session dies after its COMMIT landed: the retry's compare-and-sets miss, and each
    item is confirmed as its own (committed, counted once, the join queued once); a
    third, stale holder's commit in the same group stays refused."""
    import threading

    from pocoflow.ledger.items import ItemClaim

    db.create_run("r-g", "f", initial_store={}, status="running")
    db.insert_step("r-g", 0, "M", lease_s=LEASE_S)
    assert db.claim_step("r-g", 0, 1, "w0", LEASE_S, holder="w0#1")
    assert db.fan_out("r-g", 0, 1, "w0#1", "w0", ['"a"', '"b"'], [])
    claims = [ItemClaim("r-g", 0, idx, 1, f"w{idx}#1") for idx in (0, 1)]
    for claim in claims:
        assert db.claim_item(claim, "M", LEASE_S)[0]
    stale = ItemClaim("r-g", 0, 0, 1, "stale#1")
    got: dict[str, Any] = {}
    killer = BatchCommitKiller(pg_url, monkeypatch)

    def commit(name: str, claim: ItemClaim) -> None:
        got[name] = db.commit_item(claim, result_json=f'"{name}"', lease_s=LEASE_S)

    ledger = db._ledger
    threads = [
        threading.Thread(target=commit, args=(name, claim))
        for name, claim in (("A", claims[0]), ("B", claims[1]), ("X", stale))
    ]
    killer.armed = 1
    with ledger.writers:  # held until all three wait: the next holder runs them as one
        for thread in threads:
            thread.start()
        wait_until(lambda: len(ledger.grouped) == 3, 10.0)
    for thread in threads:
        thread.join(10.0)
    assert killer.fired == 1
    assert got["A"][0] is True and got["B"][0] is True and got["X"] == (False, None)
    # One of them, only, is told it completed the count (it publishes the join).
    told = [name for name in "AB" if got[name][1]["done"] == got[name][1]["total"]]
    assert len(told) == 1, got
    assert db.get_join("r-g", 0)["done"] == 2
    assert [r["result_json"] for r in db.get_items("r-g", 0)] == ['"A"', '"B"']
    assert (db.get_step("r-g", 0)["status"], db.get_step("r-g", 0)["attempt"]) == ("queued", 2)


def test_an_interrupt_after_a_group_committed_leaves_the_others_committed(
    db: WorkflowDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader's thread is interrupted once its group's COMMIT landed: the other
    calls, told to run again, miss their compare-and-set on their own landed write and
    must still hear 'committed' (one of them that it completed the join), not 'lost'."""
    import threading

    from pocoflow.ledger import itemqueue
    from pocoflow.ledger.items import ItemClaim

    class Interrupt(BaseException):
        pass

    db.create_run("r-i", "f", initial_store={}, status="running")
    db.insert_step("r-i", 0, "M", lease_s=LEASE_S)
    assert db.claim_step("r-i", 0, 1, "w0", LEASE_S, holder="w0#1")
    assert db.fan_out("r-i", 0, 1, "w0#1", "w0", ['"a"', '"b"', '"c"'], [])
    claims = [ItemClaim("r-i", 0, idx, 1, f"w{idx}#1") for idx in range(3)]
    for claim in claims:
        assert db.claim_item(claim, "M", LEASE_S)[0]
    real = itemqueue.ItemQueue._commit_items

    def interrupted(self: Any, units: list[Any]) -> None:
        real(self, units)
        if len(units) == 3:
            raise Interrupt

    monkeypatch.setattr(itemqueue.ItemQueue, "_commit_items", interrupted)
    got: dict[int, Any] = {}

    def commit(i: int) -> None:
        try:
            got[i] = db.commit_item(claims[i], result_json=f'"R{i}"', lease_s=LEASE_S)
        except BaseException as exc:
            got[i] = exc

    ledger = db._ledger
    threads = [threading.Thread(target=commit, args=(i,)) for i in range(3)]
    with ledger.writers:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(ledger.grouped) == 3, 10.0)
    for thread in threads:
        thread.join(10.0)
    interrupted_calls = [i for i, g in got.items() if isinstance(g, Interrupt)]
    assert len(interrupted_calls) == 1
    others = [g for g in got.values() if not isinstance(g, BaseException)]
    assert len(others) == 2 and all(g[0] is True for g in others), got
    assert db.get_join("r-i", 0)["done"] == 3


def test_a_claim_retried_while_its_first_try_still_runs_opens_one_attempt_row(
    db: WorkflowDB, pg_url: str
) -> None:
    """The first try's batch reached the server (its claim holds the row lock, its COMMIT
    not yet done) when the client lost the connection; the retry (``retried``) waits for
    that lock, then wins the step again as the same holder once the first try commits. It
    must see the first try's attempt row and open none of its own."""
    import threading

    from sqlalchemy import create_engine

    from pocoflow.ledger import steps

    db.create_run("r1", "f", initial_store={"n": 0})
    db.update_run("r1", status="running")
    assert db.insert_step("r1", 0, "Node", lease_s=10, now=100.0)
    engine = create_engine(pg_url)
    first = engine.connect()
    first.begin()
    claim = ("r1", 0, 1, "w1", "w1#1", 10, 100.0, "t1")
    assert steps.claim_reading_run(first, *claim, read_run=False)[0]
    got: list[Any] = []

    def retry() -> None:
        body = lambda conn: steps.claim_reading_run(conn, *claim, read_run=False, retried=True)  # noqa: E731
        got.append(db._write(body, "claiming", "r1", batched=True)[0])

    retrying = threading.Thread(target=retry)
    retrying.start()
    try:
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        with psycopg.connect(dsn(pg_url), autocommit=True) as probe:
            wait_until(lambda: probe.execute(waiting).fetchone()[0] == 1, 10.0)
        first.commit()
    finally:
        retrying.join(10.0)
        first.close()
        engine.dispose()
    assert got == [True]
    assert [(a["holder"], a["ended_at"]) for a in db.get_attempts("r1")] == [("w1#1", None)]
