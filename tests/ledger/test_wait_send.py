"""Human in the loop on both ledgers: ``Node.wait_for`` parks a run, ``send`` delivers the
value, the node runs again from prep. Local runs (Flow.run, run_background, resume) and
the distributed step protocol driven in-process (``execute_step`` with a recording
publisher), including the race between a park and a send."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pocoflow import Flow, Node, flow
from pocoflow.distributed import lifecycle
from pocoflow.distributed.client import attach
from pocoflow.distributed.executor import WorkerContext, execute_step
from pocoflow.distributed.sweeper import sweep
from pocoflow.errors import SendRefused, UnknownRunError
from pocoflow.ledger import liveness
from pocoflow.ledger.signals import StepFence
from pocoflow.waiting import PARKED, SIGNALLED, WaitingFor
from tests.helpers import wait_until
from tests.ledger.test_distributed_executor import LEASE_S, Publish, drain, start

pytestmark = pytest.mark.ledger

#: Test hook: called by ``Approve.prep`` between ``wait_for`` raising and the park.
ON_WAIT: list[Any] = []
PREPS: list[str] = []


class Draft(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["draft"] = "v1"
        return "default"


class Approve(Node):
    """Waits for ``approval`` in prep; the value lands in the Store."""

    timeout: float | None = None

    def prep(self, store: Any) -> Any:
        PREPS.append(self.run_id or "")
        store["prep_ran"] = store.get("prep_ran", 0) + 1  # reset by the re-run from prep
        try:
            return self.wait_for("approval", timeout=self.wait_timeout)
        except WaitingFor:
            for hook in ON_WAIT:
                hook(self.run_id)
            raise
        except TimeoutError:
            return "timed out"

    wait_timeout: float | None = None

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["approval"] = prep_result
        return "default"


class Approve5s(Approve):
    wait_timeout = 5.0


def approval_flow(node: Node | None = None, **kw: Any) -> Flow:
    draft = Draft()
    draft.then("default", node or Approve())
    return Flow(draft, flow_name="approval", **kw)


@flow("ledger_wait_approval")
def wait_approval() -> Flow:
    return approval_flow()


@flow("ledger_wait_approval_5s")
def wait_approval_5s() -> Flow:
    return approval_flow(Approve5s())


@pytest.fixture(autouse=True)
def _reset() -> Any:
    ON_WAIT.clear()
    PREPS.clear()
    yield
    ON_WAIT.clear()


@pytest.fixture
def publish(db: Any) -> Publish:
    return Publish(db)


class Clock:
    def __init__(self, db: Any) -> None:
        self.now = db.clock()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(db: Any) -> Clock:
    return Clock(db)


@pytest.fixture
def ctx(db: Any, publish: Publish, clock: Clock) -> WorkerContext:
    return WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S, clock=clock)  # type: ignore[arg-type]


# ── local runs ───────────────────────────────────────────────────────────────


def test_a_local_run_waits_then_resumes_with_the_value(ledger_url: str, db: Any) -> None:
    flow = approval_flow(db_path=ledger_url)
    store = flow.run({})
    run_id = flow.last_run_id
    assert store.as_dict() == {"draft": "v1", "prep_ran": 1}
    handle = attach(run_id, ledger_url)
    assert handle.status == "waiting" and db.get_run(run_id)["status"] == "waiting"
    waiting = [e for e in db.get_events(run_id) if e["event"] == "run_waiting"]
    assert (
        waiting and waiting[0]["node_name"] == "Approve" and "'approval'" in waiting[0]["error_msg"]
    )

    handle.send("approval", {"ok": True, "by": "ada"})
    assert handle.status == "waiting"  # a local run goes on in flow.resume, not by itself
    resumed = flow.resume(run_id)
    assert resumed["approval"] == {"ok": True, "by": "ada"}
    assert resumed["prep_ran"] == 1  # the node ran again from prep on the step-0 Store
    assert db.get_run(run_id)["status"] == "completed"
    assert [run_id, run_id] == PREPS


def test_a_value_sent_before_the_node_asks_is_returned_at_once(ledger_url: str, db: Any) -> None:
    flow = approval_flow(db_path=ledger_url)
    # A run recorded (as an interrupted process leaves it) before its first node ran.
    db.create_run("early-1", "approval", initial_store={}, start_node=flow.graph().start_id)
    attach("early-1", ledger_url).send("approval", "yes")
    assert flow.resume("early-1")["approval"] == "yes"
    assert db.get_run("early-1")["status"] == "completed"
    assert not [e for e in db.get_events("early-1") if e["event"] == "run_waiting"]


def test_a_send_between_the_wait_and_the_park_is_not_lost_locally(ledger_url: str, db: Any) -> None:
    """The value lands after wait_for raised and before the run is parked: the park sees
    it (compare-and-set) and the node runs again at once; the run never shows waiting."""
    flow = approval_flow(db_path=ledger_url)
    ON_WAIT.append(lambda run_id: db.send_signal(run_id, "approval", "late", lease_s=LEASE_S))
    store = flow.run({})
    assert store["approval"] == "late"
    assert store["prep_ran"] == 1  # the re-run started from the Store before the node
    assert db.get_run(flow.last_run_id)["status"] == "completed"
    assert len(PREPS) == 2


def test_background_run_waits_and_the_handle_sends(ledger_url: str, db: Any) -> None:
    flow = approval_flow(db_path=ledger_url)
    handle = flow.run_background({})
    assert handle.wait(timeout=30).as_dict() == {"draft": "v1", "prep_ran": 1}
    assert handle.status == "waiting"
    # Not done: it waits, as a distributed handle says (is_done was True once the thread
    # ended, so a `while not handle.is_done` loop took a waiting run for a finished one).
    assert not handle.is_done
    handle.send("approval", 42)
    resumed = flow.resume(handle.run_id, background=True)
    assert resumed.wait(timeout=30)["approval"] == 42
    assert resumed.status == "completed"
    assert resumed.is_done and handle.is_done


def test_sends_are_refused_clearly(ledger_url: str, db: Any) -> None:
    flow = approval_flow(db_path=ledger_url)
    flow.run({})
    run_id = flow.last_run_id
    handle = attach(run_id, ledger_url)
    handle.send("approval", True)
    with pytest.raises(SendRefused, match=f"Run '{run_id}' already has a value for 'approval'"):
        handle.send("approval", False)
    assert db.read_signal(run_id, "approval").value is True  # the first value stands
    with pytest.raises(UnknownRunError, match="'no-such-run'"):
        db.send_signal("no-such-run", "approval", 1, lease_s=LEASE_S)
    with pytest.raises(UnknownRunError, match="'no-such-run'"):
        attach("no-such-run", ledger_url)
    with pytest.raises(TypeError, match=f"Run '{run_id}': the value sent for 'other'"):
        db.send_signal(run_id, "other", object(), lease_s=LEASE_S)
    with pytest.raises(ValueError, match="non-empty str"):
        handle.send("", 1)
    flow.resume(run_id)
    with pytest.raises(SendRefused, match=f"Run '{run_id}' is completed"):
        handle.send("late", 1)


def test_cancel_of_a_waiting_local_run(ledger_url: str, db: Any) -> None:
    flow = approval_flow(db_path=ledger_url)
    flow.run({})
    handle = attach(flow.last_run_id, ledger_url)
    handle.cancel()
    assert handle.status == "cancelled"
    with pytest.raises(SendRefused, match="is cancelled"):
        handle.send("approval", True)


def test_a_node_of_a_sub_flow_waits_and_the_sub_flow_runs_again(ledger_url: str, db: Any) -> None:
    inner = approval_flow()  # Draft -> Approve, as a node of the outer flow
    outer = Flow(inner, db_path=ledger_url, flow_name="outer")
    assert outer.run({}).get("approval") is None
    run_id = outer.last_run_id
    assert db.get_run(run_id)["status"] == "waiting"
    db.send_signal(run_id, "approval", "inner ok", lease_s=LEASE_S)
    assert outer.resume(run_id)["approval"] == "inner ok"
    assert db.get_run(run_id)["status"] == "completed"


def test_wait_for_without_a_ledger_fails_the_run_clearly() -> None:
    with pytest.raises(RuntimeError, match=r"wait_for\('approval'\) needs a run recorded"):
        approval_flow().run({})


# ── distributed steps, in-process ───────────────────────────────────────────


def test_a_distributed_step_parks_and_a_send_wakes_it(
    db: Any, ctx: WorkerContext, publish: Publish, clock: Clock
) -> None:
    first = start(db, "ledger_wait_approval")
    assert drain(ctx, publish, first) == ["committed", "waiting"]
    run_id = first.run_id
    assert db.get_run(run_id)["status"] == "waiting"
    row = db.get_step(run_id, 1)
    # No worker holds it: queued under a fresh attempt, no lease, nothing to re-send.
    assert row["status"] == "queued" and row["lease_expires_at"] is None
    assert row["lease_owner"] is None and row["sent_at"] is not None and row["attempt"] == 2
    attempts = [a for a in db.get_attempts(run_id) if a["step"] == 1]
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "waiting")]
    assert all(a["ended_at"] is not None for a in db.get_attempts(run_id))

    # However long it waits, no sweep touches it: not expired, not unsent, not lost.
    later = clock.now + 3600 * 24
    report = sweep(db, publish, lease_s=LEASE_S, now=later)
    assert not report and not publish.sent
    assert liveness.queued_steps(db, None, 100) == []  # a broker loss re-sends nothing

    assert lifecycle.send_value(db, run_id, "approval", "ship it", publish, lease_s=LEASE_S)
    assert db.get_run(run_id)["status"] == "running"
    [woken] = publish.take()
    assert (woken.step, woken.attempt, woken.node_id) == (1, 2, row["node_id"])
    assert execute_step(woken.to_dict(), worker_id="h:2", context=ctx) == "committed"
    assert db.get_run(run_id)["status"] == "completed"
    assert db.load_checkpoint(run_id, 1)["approval"] == "ship it"
    # A late copy of the parked delivery's message is stale: it runs nothing.
    assert execute_step(first.retry(1, 1).to_dict() | {"step": 1, "node_id": woken.node_id}, worker_id="h:3", context=ctx) in ("duplicate", "stopped")  # fmt: skip


def test_a_send_between_the_wait_and_the_park_reruns_the_node_in_the_step(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "ledger_wait_approval")
    ON_WAIT.append(lambda run_id: db.send_signal(run_id, "approval", "now", lease_s=LEASE_S))
    assert drain(ctx, publish, first) == ["committed", "committed"]
    assert db.load_checkpoint(first.run_id, 1)["approval"] == "now"
    assert db.load_checkpoint(first.run_id, 1)["prep_ran"] == 1  # re-run from the step-0 Store
    assert [e["event"] for e in db.get_events(first.run_id)].count("run_waiting") == 0


def test_a_copy_of_a_parked_step_message_does_nothing(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    first = start(db, "ledger_wait_approval")
    drain(ctx, publish, first)
    row = db.get_step(first.run_id, 1)
    copy = first.retry(1, row["attempt"]).to_dict() | {"step": 1, "node_id": row["node_id"]}
    assert execute_step(copy, worker_id="h:9", context=ctx) == "waiting"
    assert db.get_run(first.run_id)["status"] == "waiting"
    assert db.get_step(first.run_id, 1)["lease_expires_at"] is None


def test_a_timed_out_wait_is_woken_by_the_sweeper(
    db: Any, ctx: WorkerContext, publish: Publish, clock: Clock
) -> None:
    first = start(db, "ledger_wait_approval_5s")
    assert drain(ctx, publish, first) == ["committed", "waiting"]
    assert not sweep(db, publish, lease_s=LEASE_S, now=clock.now + 4).woken  # not yet
    assert not publish.sent
    clock.now += 6
    report = sweep(db, publish, lease_s=LEASE_S, now=clock.now)
    assert report.woken == [(first.run_id, "approval")]
    [woken] = publish.take()
    assert execute_step(woken.to_dict(), worker_id="h:2", context=ctx) == "committed"
    assert db.load_checkpoint(first.run_id, 1)["approval"] == "timed out"
    assert "wait_timed_out" in [e["event"] for e in db.get_events(first.run_id)]
    with pytest.raises(SendRefused, match="is completed"):
        db.send_signal(first.run_id, "approval", "too late", lease_s=LEASE_S)


def test_a_waiting_run_can_be_cancelled_and_resumed(
    db: Any, ctx: WorkerContext, publish: Publish, clock: Clock
) -> None:
    first = start(db, "ledger_wait_approval")
    drain(ctx, publish, first)
    assert lifecycle.request_cancel(db, first.run_id)
    assert db.get_run(first.run_id)["status"] == "cancelled"
    assert not sweep(db, publish, lease_s=LEASE_S, now=clock.now + 3600)
    with pytest.raises(SendRefused, match="is cancelled"):
        db.send_signal(first.run_id, "approval", 1, lease_s=LEASE_S)
    # Resumed, the node waits again (the value still has not come), then a send ends it.
    assert lifecycle.restart(db, first.run_id, publish, lease_s=LEASE_S)
    [again] = publish.take()
    assert execute_step(again.to_dict(), worker_id="h:2", context=ctx) == "waiting"
    lifecycle.send_value(db, first.run_id, "approval", 7, publish, lease_s=LEASE_S)
    assert drain(ctx, publish, publish.take()[0]) == ["committed"]
    assert db.get_run(first.run_id)["status"] == "completed"


def test_a_woken_step_whose_publish_was_lost_is_sent_by_the_sweeper(
    db: Any, ctx: WorkerContext, publish: Publish, clock: Clock
) -> None:
    """The waker writes the step back as an unsent outbox row before publishing: if it
    dies in between, the sweeper's unsent pass sends it (G3)."""
    first = start(db, "ledger_wait_approval")
    drain(ctx, publish, first)
    assert db.send_signal(first.run_id, "approval", "ok", lease_s=LEASE_S) is not None
    # ... and the sender died here, before publishing.
    report = sweep(db, publish, lease_s=LEASE_S, now=db.clock() + 5)
    assert report.resent == [(first.run_id, 1)]
    assert drain(ctx, publish, publish.take()[0]) == ["committed"]
    assert db.load_checkpoint(first.run_id, 1)["approval"] == "ok"


RACE_ROUNDS = 12


def race_park_and_send(db: Any, value: int) -> tuple[str, dict[str, Any]]:
    """One round: a run whose step 0 is held by ``w#1``; its park and a send start on a
    barrier. Returns the run id and what each returned."""
    run_id = start(db, "ledger_wait_approval").run_id
    db.update_run(run_id, status="running")
    assert db.claim_step(run_id, 0, 1, "w", LEASE_S, holder="w#1")
    barrier = threading.Barrier(2)
    box: dict[str, Any] = {}

    def park() -> None:
        barrier.wait()
        box["park"] = db.park_waiting(
            run_id, "approval", step=0, node_name="Draft", fence=StepFence(1, "w#1", "w")
        )

    def send() -> None:
        barrier.wait()
        box["wake"] = db.send_signal(run_id, "approval", value, lease_s=LEASE_S)

    threads = [threading.Thread(target=park), threading.Thread(target=send)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return run_id, box


def test_park_and_send_racing_never_lose_the_value(db: Any) -> None:
    """Whatever the order, exactly one of them carries the run on: the park finds the
    value (SIGNALLED, the node re-runs at once), or the send finds the run parked and
    wakes it. Never a run left waiting beside its value."""
    for i in range(RACE_ROUNDS):
        run_id, box = race_park_and_send(db, i)
        run = db.get_run(run_id)
        assert db.read_signal(run_id, "approval").value == i
        assert run["status"] == "running"  # woken, or still its holder's to re-run
        if box["park"] == PARKED:  # the send came second and woke the run
            assert box["wake"] is not None and box["wake"].step == 0
            assert db.get_step(run_id, 0)["sent_at"] is None  # an outbox row to publish
        else:
            assert box["park"] == SIGNALLED and box["wake"] is None


@pytest.mark.parametrize("first", ["send", "park"])
def test_a_send_and_a_park_committing_in_either_order_under_the_row_lock(
    db: Any, first: str
) -> None:
    """PostgreSQL runs READ COMMITTED: the second transaction waits on the run row's lock
    taken by the first, and must then read ``pf_signals`` afresh: a park that waited on a
    send's lock finds the value; a send that waited on a park's lock finds the run
    parked and wakes it. SQLite serialises the two at BEGIN IMMEDIATE."""
    from sqlalchemy import text

    from pocoflow.ledger import signals
    from pocoflow.ledger.common import iso_now
    from tests.helpers import wait_until

    if db.dialect != "postgresql":
        pytest.skip("SQLite's writers never interleave (BEGIN IMMEDIATE)")
    run_id = start(db, "ledger_wait_approval").run_id
    db.update_run(run_id, status="running")
    assert db.claim_step(run_id, 0, 1, "w", LEASE_S, holder="w#1")
    fence = StepFence(1, "w#1", "w")
    box: dict[str, Any] = {}

    def second() -> None:
        if first == "send":
            box["park"] = db.park_waiting(run_id, "approval", step=0, node_name="D", fence=fence)
        else:
            box["wake"] = db.send_signal(run_id, "approval", "v", lease_s=LEASE_S)

    def blocked() -> bool:
        with db._ledger.engine.connect() as conn:
            return bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                    )
                ).scalar()
            )

    with db._ledger.engine.connect() as conn:
        conn.begin()
        if first == "send":
            found = signals.send(conn, run_id, "approval", '"v"', iso_now(), LEASE_S, None, [])
            assert found == ("sent", None)
        else:
            parked = signals.park(conn, run_id, "approval", 0, None, iso_now(), None, fence, [])
            assert parked == PARKED
        thread = threading.Thread(target=second)
        thread.start()
        wait_until(lambda: not thread.is_alive() or blocked(), timeout=10)
        assert thread.is_alive()  # it waits for the first one's row lock
        conn.commit()
    thread.join(30)
    if first == "send":
        assert box["park"] == SIGNALLED
        assert db.get_run(run_id)["status"] == "running"
    else:
        assert box["wake"] is not None and box["wake"].step == 0
        assert db.get_run(run_id)["status"] == "running"
        assert db.get_step(run_id, 0)["sent_at"] is None


class StrictApprove(Node):
    """Waits briefly and does not catch the TimeoutError: the run fails when it passes."""

    def prep(self, store: Any) -> Any:
        return self.wait_for("approval", timeout=0.05)

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["approval"] = prep_result
        return "default"


def test_a_run_failed_by_its_wait_timeout_takes_a_late_value_and_resumes(
    ledger_url: str, db: Any
) -> None:
    """A failed run stays resumable, so it must be able to get the value it failed
    without: before, the send was refused (a failed run is finished) and every resume
    failed again on the same expired wait, so the run could never complete."""
    flow = approval_flow(StrictApprove(), db_path=ledger_url)
    flow.run({})
    run_id = flow.last_run_id
    wait_until(lambda: db.read_signal(run_id, "approval").expired, timeout=10)
    with pytest.raises(TimeoutError, match="approval"):
        flow.resume(run_id)
    assert db.get_run(run_id)["status"] == "failed"
    attach(run_id, ledger_url).send("approval", {"ok": True})
    assert flow.resume(run_id)["approval"] == {"ok": True}
    assert db.get_run(run_id)["status"] == "completed"


def test_two_processes_resuming_a_waiting_local_run_run_its_node_once(
    ledger_url: str, db: Any, monkeypatch: Any
) -> None:
    """After the send, two resumers (a web handler and its retry, two operators) must not
    both run the node that was approved: the resume moves the run out of the status it
    read (``waiting``), so the second finds it changed. Before, any resumable status
    (``running`` included) let both go on, each running the node."""
    import importlib

    flow_module = importlib.import_module("pocoflow.flow")  # the module, not @flow
    from pocoflow.errors import RunSetupError

    approve = approval_flow(db_path=ledger_url)
    approve.run({})
    run_id = approve.last_run_id
    attach(run_id, ledger_url).send("approval", True)
    real_load = flow_module._ResumePlan.load

    def load_then_lose_the_race(*args: Any, **kw: Any) -> Any:
        plan = real_load(*args, **kw)  # read while waiting; the other resumer wins now:
        assert db.update_run_if(run_id, status_in=("waiting",), status="running")
        return plan

    monkeypatch.setattr(flow_module._ResumePlan, "load", load_then_lose_the_race)
    PREPS.clear()
    with pytest.raises(RunSetupError, match="changed status"):
        approve.resume(run_id)
    assert PREPS == []  # the loser ran nothing
