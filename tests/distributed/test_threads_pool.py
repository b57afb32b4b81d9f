"""``pocoflow worker --pool threads --concurrency 8``: one worker process runs many steps
at once on threads. Every run still ends with the Store a local run gives, and every node
sees its own step's ``run_id``/``step``/``attempt`` although the steps share a process
(each thread has its own copy of every flow graph). A flow holding a parallel BatchFlow
runs it inside one step on the worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pocoflow.devcluster import WorkerProcess
from pocoflow.runner import RunHandle
from tests.distributed import threads_flows  # noqa: F401  (registers its flows here too)
from tests.distributed.conftest import Cluster, local_result
from tests.distributed.faults import attempts_of, start_worker
from tests.distributed.threads_flows import STEPS
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

WORKERS = 0  # the module's one worker is the threads worker below
WORKER_ENV = {"POCOFLOW_FLOWS": "tests.distributed.threads_flows"}
THREADS = 8
RUNS = 24
TIMEOUT_S = 120.0


def start_threads_worker(cluster: Cluster) -> WorkerProcess:
    worker = start_worker(
        f"threads{len(cluster.workers)}",
        cluster.env,
        cluster.workdir,
        concurrency=THREADS,
        pool="threads",
    )
    cluster.workers.append(worker)  # the cluster's teardown kills it
    worker.wait_ready()
    return worker


@pytest.fixture(scope="module")
def threaded(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster with one worker started as ``--pool threads --concurrency 8``."""
    start_threads_worker(cluster)
    yield cluster


def assert_witnessed(cluster: Cluster, handle: RunHandle, store: dict[str, Any]) -> None:
    """prep, exec (after a sleep other steps ran in) and post of every step saw the same
    step: this run's, under the attempt the ledger committed."""
    seen = store.pop("seen")
    for step in range(STEPS):
        own = [handle.run_id, step, committed_attempt(cluster, handle.run_id, step)]
        assert seen[f"w{step}"] == [own, own, own], (handle.run_id, step)


def committed_attempt(cluster: Cluster, run_id: str, step: int) -> int:
    (row,) = [a for a in attempts_of(cluster.db, run_id, step) if a["outcome"] == "committed"]
    return int(row["attempt"])


def test_many_runs_at_once_each_node_sees_its_own_step(threaded: Cluster) -> None:
    side = threaded.side_dir()
    handles = [
        threaded.submit("witness_chain", {"n": n, "side_dir": str(side)}) for n in range(RUNS)
    ]
    for n, handle in enumerate(handles):
        store = handle.wait(timeout=TIMEOUT_S).as_dict()
        assert_witnessed(threaded, handle, store)
        assert store == {"n": n, "side_dir": str(side), "total": n * STEPS}
    lines = [line.split() for line in (side / "threads").read_text().splitlines()]
    assert len(lines) == RUNS * STEPS
    assert len({pid for pid, *_ in lines}) == 1  # one worker process...
    assert len({thread for _, thread, *_ in lines}) > 1  # ...running steps on threads


def test_a_flow_with_a_parallel_batchflow_runs_on_the_threads_worker(
    threaded: Cluster,
) -> None:
    handles = [threaded.submit("batch_in_flow", {"n": n}) for n in range(6)]
    for n, handle in enumerate(handles):
        store = handle.wait(timeout=TIMEOUT_S).as_dict()
        assert store == local_result("batch_in_flow", {"n": n})
        assert store["summary"] == [[f"{n}-{i}".upper(), True, True] for i in range(4)]
        steps = [(c["step"], c["node_name"]) for c in threaded.db.get_checkpoints(handle.run_id)]
        assert steps == [(0, "Split"), (1, "per_doc"), (2, "Summarise")]


def test_a_batchflow_submitted_on_its_own_is_a_one_step_run(threaded: Cluster) -> None:
    docs = ["a", "b", "c"]
    handle = threaded.submit("batch_alone", {"docs": docs})
    store = handle.wait(timeout=TIMEOUT_S).as_dict()
    assert store == local_result("batch_alone", {"docs": docs})
    assert [store[f"out/{doc}"] for doc in docs] == [[d.upper(), True, True] for d in docs]
    steps = [(c["step"], c["node_name"]) for c in threaded.db.get_checkpoints(handle.run_id)]
    assert steps == [(0, "batch_alone")]


def test_kill_9_of_a_threads_worker_reruns_all_its_steps_elsewhere(threaded: Cluster) -> None:
    """Every step in flight on the killed process (up to eight) starts again on the new
    worker (G3), and each run still ends as a local run does."""
    side = threaded.side_dir()
    base = {"side_dir": str(side), "exec_s": 0.4}
    handles = [threaded.submit("witness_chain", {**base, "n": n}) for n in range(THREADS)]
    wait_until(lambda: open_attempts(threaded, handles) >= THREADS // 2, TIMEOUT_S)
    (victim,) = [w for w in threaded.workers if w.alive]
    victim.kill()
    start_threads_worker(threaded)
    rerun = 0
    for n, handle in enumerate(handles):
        store = handle.wait(timeout=TIMEOUT_S).as_dict()
        assert_witnessed(threaded, handle, store)
        assert store == {**base, "n": n, "total": n * STEPS}
        rerun += sum(committed_attempt(threaded, handle.run_id, s) > 1 for s in range(STEPS))
    assert rerun >= THREADS // 2  # the steps that were running on the dead process


def open_attempts(cluster: Cluster, handles: list[RunHandle]) -> int:
    """Attempts started and not ended, over the runs: steps running right now."""
    return sum(
        1
        for handle in handles
        for attempt in cluster.db.get_attempts(handle.run_id)
        if attempt["ended_at"] is None
    )
