"""MapNode fan-out on real workers, SQLite and PostgreSQL ledgers: one task per item, the
join on the ledger, results equal to a local run's; kill -9 re-runs only the items that
were in flight on the dead worker; retries, a spent item failing the run (resumable),
collect, cancel between items, and items that run a sub-flow."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from pathlib import Path

import pytest

from pocoflow.runner import RunFailed, RunHandle
from tests.distributed import map_flows
from tests.distributed.conftest import Cluster, local_result
from tests.distributed.faults import start_worker, worker_running
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

WORKER_ENV = {"POCOFLOW_FLOWS": "tests.distributed.flows,tests.distributed.map_flows"}
TIMEOUT_S = 90
assert map_flows.SLOW_ITEM_S  # the module the workers import, imported here too


def execs(side: Path, run_id: str) -> list[tuple[int, int, int]]:
    """``(idx, attempt, pid)`` of every item exec that started, in order."""
    path = side / f"{run_id}.items"
    if not path.exists():
        return []
    return [
        (int(i), int(a), int(p))
        for i, a, p in (line.split() for line in path.read_text().splitlines())
    ]


def finish(live: Cluster, handle: RunHandle) -> dict:
    """The run's final Store; on a timeout, the items' ledger rows tell where it stuck."""
    try:
        return handle.wait(timeout=TIMEOUT_S).as_dict()
    except TimeoutError:
        rows = [
            (r["idx"], r["status"], r["attempt"], r["lease_owner"], r["received_by"], r["sent_at"])
            for r in live.db.get_items(handle.run_id, 0)
            if r["status"] != "done"
        ]
        step = live.db.get_step(handle.run_id, 0)
        raise AssertionError(f"stuck: step {step}; items {rows}") from None


def local(flow_name: str, store: dict) -> dict:
    """The local run's Store, with the side dir left out of the items (no side files)."""
    return local_result(flow_name, {k: v for k, v in store.items() if k != "side_dir"})


def test_fan_out_of_200_items_over_2_workers_equals_a_local_run(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 200, "side_dir": str(side)}
    handle = live.submit("map_square", store)
    result = finish(live, handle)
    expected = local("map_square", store)
    assert result["squares"] == expected["squares"] == [i * i for i in range(200)]
    assert result["total"] == expected["total"] and result["finished"] is True
    ran = execs(side, handle.run_id)
    assert Counter(i for i, _, _ in ran) == {i: 1 for i in range(200)}  # each item once
    assert len({pid for _, _, pid in ran}) == 2  # spread over both workers
    items = live.db.get_items(handle.run_id, 0)
    assert [r["status"] for r in items] == ["done"] * 200
    join = live.db.get_join(handle.run_id, 0)
    assert join["done"] == join["total"] == 200
    # One checkpoint for the map step (its join), then the successor's.
    assert [c["step"] for c in live.db.get_checkpoints(handle.run_id)] == [0, 1]
    events = [e["event"] for e in handle.events()]
    assert events.count("node_start") == 2 and events.count("node_end") == 2
    outcomes = [a["outcome"] for a in live.db.get_attempts(handle.run_id) if a["step"] == 0]
    assert outcomes == ["fanned_out", "committed"]


def test_kill_9_mid_fan_out_reruns_only_the_items_in_flight(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 16, "sleep": map_flows.SLOW_ITEM_S, "side_dir": str(side)}
    handle = live.submit("map_square", store)

    def running_exec() -> tuple[int, int] | None:
        """(item, pid) of an item whose exec has started and whose row is still running
        under that process, once 6 execs have started: killed now, it dies mid-exec."""
        started = {(i, pid) for i, _, pid in execs(side, handle.run_id)}
        if len(started) < 6:
            return None
        for row in live.db.get_items(handle.run_id, 0):
            if row["status"] == "running" and (row["idx"], _pid_of(row["lease_owner"])) in started:
                return row["idx"], _pid_of(row["lease_owner"])
        return None

    chosen, dead = wait_until(running_exec, TIMEOUT_S)
    victim = worker_running(live.workers, dead)  # (known before the kill: then nobody's)
    victim.kill()
    # What the dead process held running when it died: exact once it is dead (its items
    # cannot end), and not yet recovered (that takes seconds).
    in_flight = {
        r["idx"]
        for r in live.db.get_items(handle.run_id, 0)
        if r["status"] == "running" and _pid_of(r["lease_owner"]) == dead
    }
    # Its concurrency is 1: the chosen item, unless it ended in the instant before the kill.
    ended = live.db.get_item(handle.run_id, 0, chosen)["status"] == "done"
    assert in_flight == {chosen} or (ended and len(in_flight) <= 1), (in_flight, chosen)
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(16)]
    ran = execs(side, handle.run_id)
    counts = Counter(i for i, _, _ in ran)
    assert set(counts) == set(range(16))
    # Only what was in flight on the dead worker ran again, once, elsewhere: the item it
    # held running (under load it may have claimed its next item and not started it yet:
    # that one runs once, elsewhere).
    assert {i for i, n in counts.items() if n > 1} <= in_flight, (counts, in_flight)
    for again in in_flight:
        pids = [pid for idx, _, pid in ran if idx == again]
        assert pids[-1] != dead and (pids == [dead, pids[-1]] or len(pids) == 1), pids
    live.ensure_workers(2)


def _pid_of(lease_owner: str | None) -> int:
    """The pid in a holder token, ``<host>/<nonce>:<pid>#<n>``."""
    return int((lease_owner or ":0").partition("#")[0].rsplit(":", 1)[1])


def test_a_retried_item(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 10, "side_dir": str(side)}
    handle = live.submit("map_retry", store)
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(10)]
    counts = Counter(i for i, _, _ in execs(side, handle.run_id))
    assert counts[3] == counts[7] == 2 and all(counts[i] == 1 for i in range(10) if i not in (3, 7))
    retries = [e for e in handle.events() if e["event"] == "node_retry"]
    assert sorted(e["error_msg"].split(":")[0] for e in retries) == ["item 3", "item 7"]
    row = live.db.get_item(handle.run_id, 0, 3)
    assert (row["attempt"], row["try_number"]) == (2, 2)


def test_an_item_out_of_tries_fails_the_run_naming_it_and_resume_reruns_it(
    live: Cluster,
) -> None:
    side = live.side_dir()
    handle = live.submit("map_fail", {"n": 8, "side_dir": str(side)})
    with pytest.raises(RunFailed, match="item 5"):
        handle.wait(timeout=TIMEOUT_S)
    run = live.db.get_run(handle.run_id)
    assert (
        run["status"] == "failed" and "MapNode 'FailingSquare': item 5 failed" in run["error_msg"]
    )
    assert "ValueError: bad item 5" in run["error_msg"]
    assert Counter(i for i, _, _ in execs(side, handle.run_id))[5] == 2  # max_retries = 2
    assert live.db.get_item(handle.run_id, 0, 5)["status"] == "failed"
    # Resumable: a resume re-opens the failed item (which fails again: same verdict), and
    # the items that were done are not run again.
    done_before = {r["idx"] for r in live.db.get_items(handle.run_id, 0) if r["status"] == "done"}
    count_before = Counter(i for i, _, _ in execs(side, handle.run_id))
    handle.resume()
    wait_until(
        lambda: (
            live.db.get_run(handle.run_id)["status"] == "failed"
            and Counter(i for i, _, _ in execs(side, handle.run_id))[5] == 4
        ),
        TIMEOUT_S,
    )
    count_after = Counter(i for i, _, _ in execs(side, handle.run_id))
    for i in done_before:
        assert count_after[i] == count_before[i]


def test_collect_puts_the_exception_in_the_items_place(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 6, "side_dir": str(side)}
    handle = live.submit("map_collect", store)
    result = finish(live, handle)
    expected = local("map_collect", store)
    assert result["squares"] == expected["squares"]
    assert result["squares"] == [0, "ValueError: bad item 1", 4, 9, "ValueError: bad item 4", 25]
    assert result["total"] == expected["total"]


def test_cancel_takes_effect_between_items(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 40, "sleep": map_flows.SLOW_ITEM_S, "side_dir": str(side)}
    handle = live.submit("map_square", store)
    wait_until(lambda: len(execs(side, handle.run_id)) >= 3, TIMEOUT_S)
    handle.cancel()
    assert handle.status == "cancelled"
    cancelled_at = len(execs(side, handle.run_id))
    # What was running when the cancel landed may finish; nothing new starts after it.
    time.sleep(map_flows.SLOW_ITEM_S * 6)  # the absence of starts is what is measured
    stopped = len(execs(side, handle.run_id))
    assert stopped <= cancelled_at + 2, (cancelled_at, stopped)
    assert stopped < 40
    assert handle.status == "cancelled"
    assert live.db.get_checkpoints(handle.run_id) == []  # the join never ran


def test_items_that_run_a_sub_flow(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 12, "side_dir": str(side)}
    handle = live.submit("map_subflow", store)
    result = finish(live, handle)
    assert result["squares"] == local("map_subflow", store)["squares"]
    assert result["squares"] == [sum(2 * j for j in range(i)) for i in range(12)]


def test_pause_between_items_and_resume_runs_only_the_unfinished(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 24, "sleep": map_flows.SLOW_ITEM_S / 2, "side_dir": str(side)}
    handle = live.submit("map_square", store)
    wait_until(lambda: len(execs(side, handle.run_id)) >= 3, TIMEOUT_S)
    handle.pause()
    wait_until(lambda: handle.status == "paused", TIMEOUT_S)
    paused_at = len(execs(side, handle.run_id))
    assert paused_at < 24
    handle.resume()
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(24)] and result["finished"] is True
    counts = Counter(i for i, _, _ in execs(side, handle.run_id))
    assert counts == {i: 1 for i in range(24)}  # nothing ran twice across the pause
    assert "run_paused" in [e["event"] for e in handle.events()]


def test_resume_after_cancel_finishes_the_map(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 16, "sleep": map_flows.SLOW_ITEM_S / 2, "side_dir": str(side)}
    handle = live.submit("map_square", store)
    wait_until(lambda: len(execs(side, handle.run_id)) >= 2, TIMEOUT_S)
    handle.cancel()
    assert handle.status == "cancelled"
    handle.resume()
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(16)]
    assert set(Counter(i for i, _, _ in execs(side, handle.run_id))) == set(range(16))


def test_an_empty_map_posts_at_once(live: Cluster) -> None:
    handle = live.submit("map_square", {"n": 0})
    result = finish(live, handle)
    assert result["squares"] == [] and result["total"] == 0 and result["finished"] is True
    assert live.db.get_join(handle.run_id, 0) is None


def test_hooks_fire_at_the_fan_out_and_at_the_join(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("map_hooked", {"n": 5, "side_dir": str(side)})
    finish(live, handle)
    lines = [line.split()[:2] for line in (side / "hooks").read_text().splitlines()]
    assert lines == [
        ["node_start", "Square"],
        ["node_end", "Square"],
        ["node_start", "Finish"],
        ["node_end", "Finish"],
    ]


def test_an_async_map_on_workers(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 10, "side_dir": str(side)}
    handle = live.submit("map_async", store)
    assert finish(live, handle)["squares"] == local("map_async", store)["squares"]
    assert Counter(i for i, _, _ in execs(side, handle.run_id)) == {i: 1 for i in range(10)}


def test_items_on_a_threads_pool_worker(live: Cluster) -> None:
    """``pocoflow worker --pool threads --concurrency 8`` runs I/O-bound items side by
    side in one process; claims, leases and commits stay per item."""
    from tests.distributed.faults import start_worker

    threaded = start_worker("threads", live.env, live.workdir, concurrency=8, pool="threads")
    try:
        threaded.wait_ready()
        side = live.side_dir()
        store = {"n": 64, "sleep": 0.05, "side_dir": str(side)}
        handle = live.submit("map_square", store)
        assert finish(live, handle)["squares"] == [i * i for i in range(64)]
        ran = execs(side, handle.run_id)
        assert Counter(i for i, _, _ in ran) == {i: 1 for i in range(64)}
        assert any(threaded.owns(pid) for _, _, pid in ran)
    finally:
        threaded.kill()


def test_terminate_mid_fan_out_revokes_running_items_and_resume_finishes(live: Cluster) -> None:
    side = live.side_dir()
    store = {"n": 8, "sleep": 1.0, "side_dir": str(side)}
    handle = live.submit("map_square", store)
    wait_until(lambda: len(execs(side, handle.run_id)) >= 2, TIMEOUT_S)
    running = wait_until(lambda: live.db.running_items(handle.run_id, 0), TIMEOUT_S)
    assert all(item["task_id"] for item in running)
    handle.cancel(terminate=True)
    assert handle.status == "cancelled"
    # The killed items were fenced out and re-queued for a resume.
    for item in running:
        row = live.db.get_item(handle.run_id, 0, item["idx"])
        assert row["status"] in ("queued", "done") and row["attempt"] >= item["attempt"]
    handle.resume()
    assert finish(live, handle)["squares"] == [i * i for i in range(8)]


def test_what_prep_writes_to_the_store_reaches_post_and_the_checkpoint(live: Cluster) -> None:
    """A map step's prep runs at the fan-out and post at the join, in another delivery
    (often another worker) that loads the Store from the ledger: what prep wrote must
    reach post and the step's checkpoint, as in a local run and on a plain node."""
    store = {"n": 3}
    handle = live.submit("map_prep_writes", store)
    result = finish(live, handle)
    expected = local("map_prep_writes", store)
    assert expected["summary"] == "3 planned, n=30"
    assert result == expected


def test_wait_for_in_an_items_exec_fails_the_run_saying_why(live: Cluster) -> None:
    """An item is not a step: it cannot park the run. The run fails naming the node, the
    item and the fix, not with 'needs a run recorded in a ledger ... or submit it' (the
    run was submitted)."""
    handle = live.submit("map_waits_in_item", {})
    with pytest.raises(RunFailed) as failed:
        handle.wait(timeout=TIMEOUT_S)
    message = str(failed.value)
    assert "WaitsInItem" in message and "wait_for('ok-" in message
    assert "map item" in message and "prep" in message
    assert "submit it" not in message


def test_a_worker_killed_between_the_fan_out_commit_and_its_publish(live: Cluster) -> None:
    """The fan-out committed its items (unsent) and its worker died before publishing
    any: the sweeper sends them once the worker is found dead, each item runs once."""
    side = live.side_dir()
    store = {"n": 12, "side_dir": str(side)}
    handle = live.submit("map_crash_after_fanout", store)
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(12)]
    ran = execs(side, handle.run_id)
    assert Counter(i for i, _, _ in ran) == {i: 1 for i in range(12)}
    fanned = [a for a in live.db.get_attempts(handle.run_id) if a["outcome"] == "fanned_out"]
    pid = int(fanned[0]["worker"].rpartition(":")[2])
    assert not _alive(pid)  # the fan-out's process died, as it should
    assert pid not in {p for _, _, p in ran}
    live.ensure_workers(2)


def test_a_worker_killed_mid_batch_publish_loses_no_item(live: Cluster) -> None:
    """The fan-out's worker died after two batches of item messages reached the broker
    and before the rest were sent: the sweeper sends what is unsent (and again what was
    out but not yet marked: those copies are refused by the claim), each item runs once."""
    from pocoflow.distributed.publish import FIRST_BATCH

    side = live.side_dir()
    n = 6 * FIRST_BATCH  # batches of 1, 2 and 3 x FIRST_BATCH: killed after the second
    store = {"n": n, "side_dir": str(side)}
    handle = live.submit("map_crash_mid_publish", store)
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(n)]
    ran = execs(side, handle.run_id)
    assert Counter(i for i, _, _ in ran) == {i: 1 for i in range(n)}
    fanned = [a for a in live.db.get_attempts(handle.run_id) if a["outcome"] == "fanned_out"]
    pid = int(fanned[0]["worker"].rpartition(":")[2])
    assert not _alive(pid)  # the fan-out's process died mid-publish, as it should
    assert int((side / f"{handle.run_id}.publish-crash").read_text()) == pid
    live.ensure_workers(2)


def test_a_worker_killed_between_the_last_item_commit_and_the_join_publish(
    live: Cluster,
) -> None:
    """The item commit that completed the count re-queued the step (its outbox row) and
    its worker died before publishing it: the sweeper sends it, the join runs once."""
    side = live.side_dir()
    store = {"n": 6, "side_dir": str(side)}
    handle = live.submit("map_crash_before_join", store)
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(6)] and result["finished"] is True
    ran = execs(side, handle.run_id)
    assert Counter(i for i, _, _ in ran) == {i: 1 for i in range(6)}
    assert not all(_alive(pid) for _, _, pid in ran)  # the last item's process died
    assert [c["step"] for c in live.db.get_checkpoints(handle.run_id)] == [0, 1]
    outcomes = [a["outcome"] for a in live.db.get_attempts(handle.run_id) if a["step"] == 0]
    assert outcomes == ["fanned_out", "committed"]
    live.ensure_workers(2)


def _alive(pid: int) -> bool:
    """The process runs (a killed one not yet reaped by its parent is a zombie: dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_wait_for_in_a_map_steps_prep_and_post(live: Cluster) -> None:
    """A MapNode's prep and post run in its step (fan-out and join): wait_for there
    parks the run as in a plain node; the items run once, between the two waits."""
    side = live.side_dir()
    handle = live.submit("map_approved", {"n": 4, "side_dir": str(side)})

    def waiting() -> bool:
        status = live.db.get_run(handle.run_id)["status"]
        assert status not in ("failed", "completed"), live.db.get_run(handle.run_id)
        return status == "waiting"

    wait_until(waiting, TIMEOUT_S)
    assert execs(side, handle.run_id) == []
    handle.send("go", 2)
    wait_until(lambda: waiting() and len(execs(side, handle.run_id)) == 4, TIMEOUT_S)
    handle.send("verdict", "fine")
    result = finish(live, handle)
    assert result["squares"] == [i * i for i in range(4)] and result["finished"] is True
    assert (result["scale"], result["verdict"]) == (2, "fine")
    assert Counter(i for i, _, _ in execs(side, handle.run_id)) == {i: 1 for i in range(4)}


def test_an_item_whose_exec_raises_a_base_exception_fails_instead_of_looping(
    live: Cluster,
) -> None:
    """``asyncio.CancelledError`` is a BaseException: it escaped the item's failure
    handling, the item stayed running until its lease ran out, and the sweeper sent it
    again, for ever. It must fail the run naming the item, as any exception does."""
    side = live.side_dir()
    handle = live.submit("map_cancelled_error", {"n": 3, "side_dir": str(side)})
    with pytest.raises(RunFailed, match="item 1"):
        handle.wait(timeout=30)
    assert Counter(i for i, _, _ in execs(side, handle.run_id))[1] == 1


def test_a_step_whose_exec_raises_a_base_exception_fails_instead_of_looping(
    live: Cluster,
) -> None:
    handle = live.submit("step_cancelled_error", {})
    with pytest.raises(RunFailed, match="CancelledError"):
        handle.wait(timeout=30)


def test_the_node_error_hook_fires_when_an_item_fails_the_run(live: Cluster) -> None:
    """Locally an item out of tries raises ItemFailed out of the node and node_error
    fires; on workers the item's task fails the run, and must fire it too (alerts)."""
    side = live.side_dir()
    store = {"n": 8, "side_dir": str(side)}
    handle = live.submit("map_fail_hooked", store)
    with pytest.raises(RunFailed, match="item 5"):
        handle.wait(timeout=TIMEOUT_S)
    hooks = side / "hooks"
    # A whole line: the hook's open() creates the file before its write lands.
    wait_until(lambda: hooks.exists() and hooks.read_text().endswith("\n"), 10)
    lines = hooks.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("node_error FailingSquare ItemFailed")
    assert "item 5" in lines[0]


def test_a_parallel_batchflows_passes_are_map_items_over_both_workers(live: Cluster) -> None:
    """ARCHITECTURE §1: parallel passes run as map items on workers: one item row and
    one exec per pass, spread over the workers, the same Store as a local run."""
    side = live.side_dir()
    store = {"n": 12, "side_dir": str(side)}
    handle = live.submit("batch_square", store)
    result = finish(live, handle)
    assert {k: v for k, v in result.items() if k != "side_dir"} == local("batch_square", store)
    assert result["total"] == sum(1000 + i * i for i in range(12)) and result["finished"]
    ran = execs(side, handle.run_id)
    assert Counter(i for i, _, _ in ran) == {i: 1 for i in range(12)}  # each pass once
    assert len({pid for _, _, pid in ran}) == 2  # spread over both workers
    items = live.db.get_items(handle.run_id, 0)
    assert [r["status"] for r in items] == ["done"] * 12
    outcomes = [a["outcome"] for a in live.db.get_attempts(handle.run_id) if a["step"] == 0]
    assert outcomes == ["fanned_out", "committed"]
    names = {e["node_name"] for e in handle.events() if e["event"] == "node_end"}
    assert names == {"square_pass", "Finish"}  # the batch, not its passes


def test_a_map_nodes_queue_routes_its_items_to_the_workers_serving_it(live: Cluster) -> None:
    gpu = start_worker("gpu", live.env, live.workdir, queues="gpu")
    try:
        gpu.wait_ready()
        side = live.side_dir()
        store = {"n": 12, "side_dir": str(side)}
        result = finish(live, live.submit("map_on_gpu", store))
        assert result["squares"] == [i * i for i in range(12)] and result["finished"]
        ran = execs(side, next(iter(side.glob("*.items"))).stem)
        assert len(ran) == 12 and all(pid in gpu.pids() for _, _, pid in ran), ran
    finally:
        gpu.stop()


def test_a_parallel_pass_on_workers_meets_the_flows_schema_and_fails_naming_itself(
    live: Cluster,
) -> None:
    handle = live.submit("batch_schema", {})
    with pytest.raises(RunFailed):
        handle.wait(timeout=TIMEOUT_S)
    error = live.db.get_run(handle.run_id)["error_msg"]
    assert "BatchFlow 'schema_batch': pass 1" in error and "'WrongType'" in error, error
    assert "TypeError" in error and "'count'" in error, error
    item = live.db.get_item(handle.run_id, 0, 1)
    assert item["status"] == "failed"  # not kept as done: a resume runs the pass again


def test_a_batchs_max_concurrency_bounds_its_passes_across_workers(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("batch_one_at_a_time", {"side_dir": str(side)})
    finish(live, handle)
    passes = [line.split() for line in (side / f"{handle.run_id}.passes").read_text().splitlines()]
    spans = sorted((float(start), float(end)) for _, start, end, _ in passes)
    assert len(spans) == 4
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans)), spans


def test_wait_for_in_a_parallel_pass_on_workers_fails_saying_what_to_do(live: Cluster) -> None:
    handle = live.submit("batch_wait", {})
    with pytest.raises(RunFailed):
        handle.wait(timeout=TIMEOUT_S)
    error = live.db.get_run(handle.run_id)["error_msg"]
    assert "cannot be called in a parallel pass on workers" in error, error
    assert "set parallel = False" in error


def test_pass_params_the_store_cannot_keep_fail_the_batch_naming_it(live: Cluster) -> None:
    handle = live.submit("batch_path_params", {})
    with pytest.raises(RunFailed):
        handle.wait(timeout=TIMEOUT_S)
    error = live.db.get_run(handle.run_id)["error_msg"]
    assert "BatchFlow 'path_batch'" in error and "params must be Store values" in error, error
