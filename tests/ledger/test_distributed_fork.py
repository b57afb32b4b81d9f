"""``fork_run`` / ``record_fork`` on both ledgers: the fork's run row and first queued
step, the parent left as it was, every refusal (nothing written), and the fork driven to
completion by ``execute_step`` with a recording publisher (as a worker would run it).
The distributed suite repeats it with real workers (tests/distributed/test_fork.py)."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
from sqlalchemy import select, update

from pocoflow import Flow, Node, flow
from pocoflow.distributed import client
from pocoflow.distributed.client import fork_run, record_fork, record_run
from pocoflow.distributed.executor import WorkerContext
from pocoflow.errors import RunSetupError, UnknownRunError
from pocoflow.ledger.tables import pf_checkpoints, pf_steps
from pocoflow.registry import build_flow
from pocoflow.settings import Settings
from pocoflow.store import Store
from pocoflow.usage import UsageReport
from tests.ledger.test_distributed_executor import LEASE_S, Publish, drain

pytestmark = pytest.mark.ledger

#: Never contacted: every refusal comes before anything is published.
UNUSED_BROKER = "redis://127.0.0.1:9/0"


class Add(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["n"] = store.get("n", 0) + 1
        store["trail"] = [*store.get("trail", []), self.name]
        return "default"


def chain(names: str) -> list[Add]:
    """Nodes named after the letters of ``names``, each followed by the next."""
    nodes = [Add(name=name) for name in names]
    for node, after in pairwise(nodes):
        node.then("default", after)
    return nodes


@flow("fork_three")
def three() -> Flow:
    a, _, c = chain("abc")
    c.queue = "special"  # a node's own queue goes with its first step
    return Flow(start=a, max_steps=50, max_tokens=500)


@pytest.fixture
def publish(db: Any) -> Publish:
    return Publish(db)


@pytest.fixture
def ctx(db: Any, publish: Publish) -> WorkerContext:
    return WorkerContext(db=db, publisher=publish, redis=None, lease_s=LEASE_S)  # type: ignore[arg-type]


def settings_for(db: Any) -> Settings:
    url = db._ledger.url.render_as_string(hide_password=False)
    return Settings(db_url=url, broker_url=UNUSED_BROKER, lease_seconds=LEASE_S)


def completed_on_workers(db: Any, ctx: WorkerContext, publish: Publish) -> str:
    first = record_run(db, build_flow("fork_three"), Store({"n": 0}), lease_s=LEASE_S)
    assert drain(ctx, publish, first) == ["committed"] * 3
    return first.run_id


def snapshot(db: Any, run_id: str) -> dict[str, Any]:
    """Everything of a run a fork must leave alone."""
    return {
        "run": db.get_run(run_id),
        "checkpoints": db.get_checkpoints(run_id),
        "stores": [db.load_checkpoint(run_id, s).as_dict() for s in (-1, 0, 1, 2)],
        "steps": [db.get_step(run_id, s) for s in range(3)],
        "attempts": db.get_attempts(run_id),
        "events": db.get_events(run_id),
        "usage": db.get_usage(run_id),
    }


def test_a_fork_is_a_queued_run_from_the_checkpoint_with_its_first_step_queued(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    parent = completed_on_workers(db, ctx, publish)
    db.set_budget(parent, max_tokens=9_999)  # the fork takes the flow's budget, not this
    db.add_usage(UsageReport(parent, 0, 1, "a", None, "m", 100, 20, 0.5))
    before = snapshot(db, parent)

    first, queue = record_fork(db, parent, 1, build_flow("fork_three"), lease_s=LEASE_S)

    fork = db.get_run(first.run_id)
    assert first.run_id != parent and first.run_id.startswith("fork_three-")
    assert (first.step, first.node_id, first.attempt, first.flow) == (2, "c", 1, "fork_three")
    assert queue == "special"  # node c's own queue
    assert fork["status"] == "queued" and fork["flow_name"] == "fork_three"
    assert (fork["parent_run_id"], fork["forked_from_step"]) == (parent, 1)
    assert fork["queue"] == before["run"]["queue"] == "pocoflow"
    assert fork["fingerprint"] == before["run"]["fingerprint"] and fork["max_steps"] == 50
    assert (fork["max_tokens"], db.get_usage(first.run_id)["calls"]) == (500, 0)
    assert db.load_checkpoint(first.run_id, 1).as_dict() == db.load_checkpoint(parent, 1).as_dict()
    assert db.get_checkpoint(first.run_id, 1)["next_node"] == "c"
    step = db.get_step(first.run_id, 2)
    assert (step["node_id"], step["status"], step["attempt"]) == ("c", "queued", 1)
    assert db.get_step(first.run_id, 1) is None and db.get_step(first.run_id, 0) is None
    assert snapshot(db, parent) == before


def test_a_fork_runs_to_the_store_a_full_run_gives_and_leaves_the_parent(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    parent = completed_on_workers(db, ctx, publish)
    before = snapshot(db, parent)
    first, _ = record_fork(db, parent, 0, build_flow("fork_three"), lease_s=LEASE_S)
    assert drain(ctx, publish, first) == ["committed"] * 2
    fork = db.get_run(first.run_id)
    assert fork["status"] == "completed" and fork["total_steps"] == 3
    assert [c["step"] for c in db.get_checkpoints(first.run_id)] == [0, 1, 2]
    assert db.load_checkpoint(first.run_id, 2).as_dict() == {"n": 3, "trail": ["a", "b", "c"]}
    assert db.load_checkpoint(parent, 2).as_dict() == db.load_checkpoint(first.run_id, 2).as_dict()
    assert snapshot(db, parent) == before


def test_a_run_of_a_process_forks_onto_the_workers(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    local = build_flow("fork_three")
    local.db_path = settings_for(db).db_url
    local.run({"n": 10})
    parent = local.last_run_id
    assert db.get_run(parent)["queue"] is None  # ran in this process
    first, _ = record_fork(db, parent, 0, build_flow("fork_three"), lease_s=LEASE_S)
    assert db.get_run(first.run_id)["queue"] == "pocoflow"  # now a run of the workers
    assert drain(ctx, publish, first) == ["committed"] * 2
    assert db.load_checkpoint(first.run_id, 2)["n"] == 13
    assert not db.get_attempts(parent)  # still the process's run


def test_a_fork_can_be_given_its_run_id_and_queue(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    parent = completed_on_workers(db, ctx, publish)
    first, queue = record_fork(
        db, parent, 0, build_flow("fork_three"), new_run_id="mine", queue="q2", lease_s=LEASE_S
    )
    assert first.run_id == "mine" and queue == "q2" and db.get_run("mine")["queue"] == "q2"
    with pytest.raises(RunSetupError, match="'mine' already exists"):
        record_fork(db, parent, 0, build_flow("fork_three"), new_run_id="mine", lease_s=LEASE_S)


def step_rows(db: Any) -> list[tuple[str, int]]:
    rows = db._read(lambda conn: conn.execute(select(pf_steps.c.run_id, pf_steps.c.step)).all())
    return sorted((run_id, step) for run_id, step in rows)


def test_every_refusal_names_the_run_and_writes_nothing(
    db: Any, ctx: WorkerContext, publish: Publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = completed_on_workers(db, ctx, publish)
    settings = settings_for(db)
    # fork_run publishes through _publisher(settings): the double, so a send would show.
    monkeypatch.setattr(client, "_publisher", lambda _settings: publish)
    db.create_run("stray-1", "no_such_flow", initial_store={"n": 1})
    runs_before = {r["run_id"] for r in db.list_runs(limit=100)}
    steps_before = step_rows(db)
    cases = [
        (UnknownRunError, "Unknown run id 'nope-1'", dict(run_id="nope-1", from_step=0)),
        (RunSetupError, rf"Run '{parent}' has no checkpoint of step 7", dict(from_step=7)),
        (RunSetupError, rf"Run '{parent}' step 2 was its last step", dict(from_step=2)),
        (
            RunSetupError,
            r"Run 'stray-1' step -1: it is a run of flow 'no_such_flow', which no registered "
            r"builder makes here .*--flows / POCOFLOW_FLOWS",
            dict(run_id="stray-1", from_step=-1),
        ),
        (
            RunSetupError,
            rf"Run '{parent}' step 0: the fork's run id is empty",
            dict(from_step=0, new=""),
        ),
    ]
    for i, (error, message, kwargs) in enumerate(cases):
        kwargs = {"run_id": parent, "new": f"refused-{i}", **kwargs}
        with pytest.raises(error, match=message):
            fork_run(
                kwargs["run_id"], kwargs["from_step"], new_run_id=kwargs["new"], settings=settings
            )
    assert {r["run_id"] for r in db.list_runs(limit=100)} == runs_before
    assert step_rows(db) == steps_before  # no first step queued for any fork
    assert publish.sent == []
    fork_run(parent, 0, new_run_id="accepted", settings=settings)  # the double is the one used
    assert [m.run_id for m, _ in publish.sent] == ["accepted"]
    assert step_rows(db) == sorted([*steps_before, ("accepted", 1)])


@flow("zz_other")
def other() -> Flow:
    return Flow(start=chain("abc")[0])


def test_a_fork_runs_only_the_registered_graph_of_its_parents_flow(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    """record_fork checks the flow it is given as record_run does: of the parent's flow
    name, registered, built as its registered builder builds it."""
    parent = completed_on_workers(db, ctx, publish)
    a = chain("abcd")[0]
    changed = Flow(start=a, flow_name="fork_three")  # an extra node d
    with pytest.raises(RunSetupError, match=rf"Run '{parent}' step 1: it is a run of flow "):
        record_fork(db, parent, 1, build_flow("zz_other"), lease_s=LEASE_S)
    with pytest.raises(RunSetupError, match=rf"Run '{parent}' step 1: Flow 'fork_three' differs"):
        record_fork(db, parent, 1, changed, lease_s=LEASE_S)
    db.update_run(parent, flow_name="fork_nowhere")  # the parent's name, but unregistered
    with pytest.raises(RunSetupError, match="step 1: Flow 'fork_nowhere' is not registered"):
        record_fork(db, parent, 1, Flow(start=a, flow_name="fork_nowhere"), lease_s=LEASE_S)
    assert [r["run_id"] for r in db.list_runs(limit=10)] == [parent]


def test_a_checkpoint_without_a_next_node_before_the_last_is_no_last_step(db: Any) -> None:
    """0.2 checkpoints (save_checkpoint) record no next node: only the latest checkpoint
    'was its last step'; an earlier one is said to record no next node."""
    from pocoflow.flow import Flow as LocalFlow

    db.create_run("old-1", "fork_three", initial_store={"n": 0})
    for step in range(3):
        db.save_checkpoint("old-1", step, "abc"[step], {"n": step + 1})
    with pytest.raises(RunSetupError, match="Run 'old-1' step 0: its checkpoint records no next"):
        record_fork(db, "old-1", 0, build_flow("fork_three"), lease_s=LEASE_S)
    with pytest.raises(RunSetupError, match="Run 'old-1' step 2 was its last step"):
        record_fork(db, "old-1", 2, build_flow("fork_three"), lease_s=LEASE_S)
    local: LocalFlow = build_flow("fork_three")
    local.db_path = settings_for(db).db_url
    with pytest.raises(RunSetupError, match="step 1: its checkpoint records no next node"):
        local.fork("old-1", 1)
    assert [r["run_id"] for r in db.list_runs(limit=10)] == ["old-1"]


def test_a_fork_of_a_fork_before_its_fork_point_says_where_it_starts(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    parent = completed_on_workers(db, ctx, publish)
    first, _ = record_fork(db, parent, 1, build_flow("fork_three"), lease_s=LEASE_S)
    with pytest.raises(RunSetupError, match=r"its first checkpoint is its fork point, step 1"):
        record_fork(db, first.run_id, 0, build_flow("fork_three"), lease_s=LEASE_S)


@flow("fork_short")
def short() -> Flow:
    return Flow(start=chain("abc")[0], max_steps=2)


def test_a_fork_past_max_steps_is_refused_up_front(db: Any) -> None:
    db.create_run("short-1", "fork_short", initial_store={"n": 0}, start_node="a")
    db.save_checkpoint("short-1", 0, "a", {"n": 1})
    db.save_checkpoint("short-1", 1, "b", {"n": 2})
    db.save_checkpoint("short-1", 2, "c", {"n": 3})
    with db._ledger.engine.begin() as conn:  # step 1 recorded c as next, as 0.3 does
        conn.execute(
            update(pf_checkpoints)
            .where(pf_checkpoints.c.run_id == "short-1", pf_checkpoints.c.step == 1)
            .values(next_node="c")
        )
    with pytest.raises(RunSetupError, match=r"first step would be 2, past the flow's max_steps=2"):
        record_fork(db, "short-1", 1, build_flow("fork_short"), lease_s=LEASE_S)
    local = build_flow("fork_short")
    local.db_path = settings_for(db).db_url
    with pytest.raises(RunSetupError, match=r"step 1: the fork's first step would be 2, past"):
        local.fork("short-1", 1)
    assert [r["run_id"] for r in db.list_runs(limit=10)] == ["short-1"]


def test_a_checkpoint_whose_next_node_the_registered_graph_lacks_is_refused(db: Any) -> None:
    db.create_run("old-1", "fork_three", initial_store={"n": 0}, start_node="gone")
    with pytest.raises(RunSetupError, match=r"Run 'old-1' step -1 is followed by node 'gone'"):
        record_fork(db, "old-1", -1, build_flow("fork_three"), lease_s=LEASE_S)
    assert [r["run_id"] for r in db.list_runs(limit=10)] == ["old-1"]


@flow("fork_typed")
def typed() -> Flow:
    return Flow(start=Add(name="a"), schema={"n": int})


def test_a_checkpoint_off_the_flows_schema_is_refused_naming_the_key(db: Any) -> None:
    db.create_run("typed-1", "fork_typed", initial_store={"n": "three"}, start_node="a")
    with pytest.raises(TypeError, match="'n'"):
        record_fork(db, "typed-1", -1, build_flow("fork_typed"), lease_s=LEASE_S)
    assert [r["run_id"] for r in db.list_runs(limit=10)] == ["typed-1"]
