"""The step protocol with real workers, on SQLite and PostgreSQL ledgers: results equal a
local run's, duplicates do nothing (G1), retries are Celery countdowns, max_steps holds
(G5), unknown flows and other graph versions are refused (G6, G7), bad Store values are
named (G7), malformed messages are recorded, and nothing is lost on the way."""

from __future__ import annotations

import pytest

from pocoflow import flow
from pocoflow.distributed import client
from pocoflow.distributed.message import StepMessage
from pocoflow.flow import Flow
from pocoflow.runner import RunFailed
from tests.distributed.conftest import Cluster, local_result
from tests.distributed.faults import attempts_of, checkpoint_steps
from tests.distributed.flows import CHAIN_LENGTH, Increment
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

# The workers build the three-node variant of the "versioned" flow; this process builds
# the two-node one, so a run submitted here is refused by them (G6).
WORKER_ENV = {"POCOFLOW_TEST_VARIANT": "b"}
TIMEOUT_S = 30


@flow("client_only")
def client_only_flow() -> Flow:
    """Registered in the test process only: no worker knows it (G7)."""
    return Flow(start=Increment(name="lonely"))


def assert_one_checkpoint_per_step(cluster: Cluster, run_id: str, steps: int) -> None:
    assert checkpoint_steps(cluster.db, run_id) == list(range(steps))
    for step in range(steps):
        committed = [
            a for a in attempts_of(cluster.db, run_id, step) if a["outcome"] == "committed"
        ]
        assert len(committed) == 1, (step, attempts_of(cluster.db, run_id, step))


def test_chain_across_workers_equals_local_run(live: Cluster) -> None:
    handle = live.submit("counter", {"count": 0})
    assert handle.status in ("queued", "running", "completed")
    store = handle.wait(timeout=TIMEOUT_S)
    assert handle.status == "completed"
    assert store.as_dict() == local_result("counter", {"count": 0})
    assert_one_checkpoint_per_step(live, handle.run_id, CHAIN_LENGTH)
    run = live.db.get_run(handle.run_id)
    assert run["total_steps"] == CHAIN_LENGTH and run["current_node"] == "inc19"
    events = [e["event"] for e in handle.events()]
    assert events[0] == "flow_start" and events[-1] == "flow_end"
    assert events.count("node_end") == CHAIN_LENGTH
    # Every attempt records who ran it and which broker task carried it.
    for attempt in live.db.get_attempts(handle.run_id):
        host, pid = attempt["worker"].rsplit(":", 1)
        assert host and pid.isdigit() and attempt["task_id"]


def test_flow_submit_and_attach_use_the_environment(
    live: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pocoflow
    from pocoflow.registry import build_flow

    for name, value in live.env.items():
        if name.startswith("POCOFLOW_") and name != "POCOFLOW_TEST_VARIANT":
            monkeypatch.setenv(name, value)
    handle = build_flow("counter").submit({"count": 100})
    other = pocoflow.attach(handle.run_id)
    assert other.wait(timeout=TIMEOUT_S)["count"] == 100 + CHAIN_LENGTH
    assert other.status == "completed" and handle.is_done
    with pytest.raises(KeyError, match="no-such-run"):
        pocoflow.attach("no-such-run")


def test_a_message_delivered_twice_commits_once(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("counter", {"count": 0, "side_dir": str(side)})
    first = StepMessage(handle.run_id, "counter", 0, "inc00", 1)
    live.send_raw(first)  # the same step-0 delivery again, racing the original
    handle.wait(timeout=TIMEOUT_S)
    for step in (0, 7, CHAIN_LENGTH - 1):  # and again after the run completed
        live.send_raw(StepMessage(handle.run_id, "counter", step, f"inc{step:02d}", 1))
    live.send_raw(first)
    # A run submitted after the late duplicates goes through the same FIFO queue: once it
    # has finished, every duplicate ahead of it was taken and has met the guard.
    sentinel = live.submit("counter", {"count": 0})
    assert sentinel.wait(timeout=TIMEOUT_S)["count"] == CHAIN_LENGTH
    # The late duplicates reached the guard and stopped there: nothing changed.
    assert_one_checkpoint_per_step(live, handle.run_id, CHAIN_LENGTH)
    execs = (side / f"{handle.run_id}.execs").read_text().splitlines()
    assert sorted(int(line.split()[0]) for line in execs) == list(range(CHAIN_LENGTH))
    steps = [live.db.get_step(handle.run_id, s) for s in range(CHAIN_LENGTH)]
    assert all(row and row["status"] == "committed" for row in steps)
    assert live.db.get_step(handle.run_id, CHAIN_LENGTH) is None  # no successor past the end
    assert handle.store()["count"] == CHAIN_LENGTH


def test_retries_are_scheduled_by_celery_and_async_nodes_run(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("flaky", {"failures": 2, "side_dir": str(side)})
    store = handle.wait(timeout=TIMEOUT_S)
    assert store["tries"] == 3 and store["async"] == 2
    events = handle.events()
    assert [e["event"] for e in events].count("node_retry") == 2
    outcomes = [(a["attempt"], a["outcome"]) for a in attempts_of(live.db, handle.run_id, 0)]
    assert outcomes == [(1, "retry"), (2, "retry"), (3, "committed")]
    assert_one_checkpoint_per_step(live, handle.run_id, 2)


def test_a_node_out_of_retries_fails_the_run_resumably(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("flaky", {"failures": 5, "side_dir": str(side)})
    with pytest.raises(RunFailed, match="ConnectionError: flaky try 3"):
        handle.wait(timeout=TIMEOUT_S)
    assert live.db.get_step(handle.run_id, 0)["status"] == "failed"
    # Resume starts the node's tries afresh: tries 4 and 5 fail, 6 works.
    resumed = client.resume_run(handle.run_id, settings=live.settings)
    assert resumed.wait(timeout=TIMEOUT_S)["tries"] == 6
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1]


def test_max_steps_holds_across_workers(live: Cluster) -> None:
    handle = live.submit("loop", {})
    with pytest.raises(RunFailed, match="max_steps=7"):
        handle.wait(timeout=TIMEOUT_S)
    assert live.db.count_committed(handle.run_id) == 7
    assert handle.store()["laps"] == 7
    assert "max_steps" in live.db.get_run(handle.run_id)["error_msg"]


def test_an_unregistered_flow_is_refused_with_a_clear_error(live: Cluster) -> None:
    handle = client.submit(client_only_flow(), {"count": 0}, settings=live.settings)
    with pytest.raises(RunFailed, match="'client_only' is not registered"):
        handle.wait(timeout=TIMEOUT_S)
    run = live.db.get_run(handle.run_id)
    assert "--flows" in run["error_msg"]
    assert live.db.get_step(handle.run_id, 0)["status"] == "failed"  # kept for a resume
    assert live.db.count_committed(handle.run_id) == 0


def test_another_graph_version_is_refused_then_accepted_with_force(
    live: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = live.submit("versioned", {"count": 0})
    with pytest.raises(RunFailed) as failure:
        handle.wait(timeout=TIMEOUT_S)
    message = str(failure.value)
    assert "'versioned'" in message and "nodes added: third" in message
    assert "--force" in message
    # Accept the workers' graph: this process now builds it too.
    monkeypatch.setenv("POCOFLOW_TEST_VARIANT", "b")
    resumed = client.resume_run(handle.run_id, force=True, settings=live.settings)
    assert resumed.wait(timeout=TIMEOUT_S)["count"] == 3
    assert resumed.status == "completed"
    with pytest.raises(ValueError, match="only a failed, cancelled or paused"):
        client.resume_run(handle.run_id, settings=live.settings)


def test_an_unstorable_value_fails_the_run_naming_the_key(live: Cluster) -> None:
    handle = live.submit("unstorable", {"count": 0})
    with pytest.raises(RunFailed, match="'handle'"):
        handle.wait(timeout=TIMEOUT_S)
    assert checkpoint_steps(live.db, handle.run_id) == [0]  # the good step is kept
    assert handle.store().as_dict() == {"count": 1, "trail": ["first"]}
    assert attempts_of(live.db, handle.run_id, 1)[0]["outcome"] == "failed"


def test_a_malformed_message_is_recorded_and_workers_carry_on(live: Cluster) -> None:
    handle = live.submit("counter", {"count": 0})
    handle.wait(timeout=TIMEOUT_S)
    live.send_raw(
        {
            "run_id": handle.run_id,
            "flow": "counter",
            "step": "zero",
            "node_id": "inc00",
            "attempt": 1,
        }
    )
    live.send_raw({"no": "run id"})
    live.send_raw("not even an object")
    events = wait_until(
        lambda: [e for e in handle.events() if e["event"] == "message_malformed"], TIMEOUT_S
    )
    assert "'step'" in events[0]["error_msg"]
    # The workers are still serving.
    assert live.submit("counter", {"count": 1}).wait(timeout=TIMEOUT_S)["count"] == 21
