"""Node limits with real workers: a rate limit and a concurrency limit hold across two
workers, a limited step that must wait holds no worker (an unlimited run goes by), and
the concurrency slot of a worker killed with -9 is freed when its lease runs out. Also
``Node.queue``: a node's steps go to the workers serving its queue."""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path

import pytest

from pocoflow.runner import RunHandle
from tests.distributed import limit_flows
from tests.distributed.conftest import Cluster
from tests.distributed.faults import FLOWS_MODULE, start_worker, worker_running
from tests.helpers import wait_until

# The limits live in Redis, not in the ledger: one ledger backend is enough here (the
# take-over that re-queues a waiting step is covered on both by tests/ledger).
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.parametrize("cluster", ["sqlite"], indirect=True),
]

WORKER_ENV = {"POCOFLOW_FLOWS": f"{FLOWS_MODULE},tests.distributed.limit_flows"}
TIMEOUT_S = 60
#: Exec starts are stamped in the workers a moment after the limiter's decision (on
#: Redis's clock): on a loaded box two stamps can come closer than their decisions did.
CLOCK_SLACK_S = 0.15


def _calls(side: Path) -> list[tuple[float, float]]:
    path = side / "calls"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return sorted((float(a), float(b)) for a, b, *_ in (line.split() for line in lines))


def _rate_limited_runs(live: Cluster, flow_name: str, side: Path, n: int) -> list[RunHandle]:
    """``n`` runs of a flow whose node has limit_flows.RATE, waited for; checks that any
    window of 1 s held at most 3 of their starts (start i+3 is 1 s after start i)."""
    runs = [live.submit(flow_name, {"side_dir": str(side)}) for _ in range(n)]
    for run in runs:
        run.wait(timeout=TIMEOUT_S)
    starts = [start for start, _ in _calls(side)]
    assert len(starts) == n
    count = int(limit_flows.RATE.split("/")[0])
    gaps = [starts[i + count] - starts[i] for i in range(len(starts) - count)]
    assert min(gaps) >= 1.0 - CLOCK_SLACK_S, gaps
    return runs


def test_a_rate_limit_holds_across_workers(live: Cluster) -> None:
    # ... while both workers ran calls: the limit is shared, not per worker. On a loaded
    # box one worker can take a whole round (it holds every re-sent call on its
    # countdown), which shows nothing about sharing: up to 3 rounds, each held to the rate.
    for _ in range(3):
        side = live.side_dir()
        runs = _rate_limited_runs(live, "limited-rate", side, 9)
        pids = {line.split()[2] for line in (side / "calls").read_text().splitlines()}
        if len(pids) == 2:
            break
    assert len(pids) == 2
    attempts = [a for run in runs for a in live.db.get_attempts(run.run_id)]
    assert {a["outcome"] for a in attempts} <= {"limited", "committed"}
    assert any(a["outcome"] == "limited" for a in attempts)


def test_max_concurrency_holds_across_workers(live: Cluster) -> None:
    side = live.side_dir()
    store = {"side_dir": str(side), "work_s": 0.3}
    runs = [live.submit("limited-concurrency", store) for _ in range(4)]
    for run in runs:
        run.wait(timeout=TIMEOUT_S)
    calls = _calls(side)
    assert len(calls) == 4
    # Sorted by start, one at a time: each call starts after the previous one ended.
    overlaps = [b_start - a_end for (_, a_end), (b_start, _) in itertools.pairwise(calls)]
    assert min(overlaps) >= -CLOCK_SLACK_S / 10, calls


def test_an_unlimited_run_is_not_starved_by_waiting_limited_steps(live: Cluster) -> None:
    side = live.side_dir()
    # 12 calls at 3/s: the last may start only some 3 s from now; meanwhile their steps
    # wait as countdown messages, not in the workers' only pool slots.
    limited = [live.submit("limited-rate", {"side_dir": str(side)}) for _ in range(12)]
    wait_until(lambda: len(_calls(side)) >= 3, TIMEOUT_S)
    free = live.submit("unlimited", {"side_dir": str(live.side_dir())})
    free.wait(timeout=TIMEOUT_S)
    assert not all(run.is_done for run in limited), "the limited runs were already done"
    for run in limited:
        run.wait(timeout=TIMEOUT_S)


def test_a_killed_workers_concurrency_slot_is_freed_by_its_lease(live: Cluster) -> None:
    import redis

    from pocoflow.distributed.limiter import slots_key

    slots = redis.Redis.from_url(live.settings.broker_url)
    key = slots_key("limited-concurrency/call")  # the default key: flow / node name
    side = live.side_dir()
    hung = live.submit("limited-concurrency", {"side_dir": str(side), "hang": True})
    started = side / f"{hung.run_id}.1.started"
    pid = int(wait_until(lambda: started.exists() and started.read_text(), TIMEOUT_S))
    (holder,) = slots.zrange(key, 0, -1)
    worker_running(live.workers, pid).kill()
    # Nothing releases the dead worker's slot but its lease (2 s here, no longer renewed):
    # a run submitted now waits for it, then runs, and so does the hung run's re-run.
    assert slots.zrange(key, 0, -1) == [holder]
    lease_ends = slots.zscore(key, holder) / 1e6  # Redis's clock, this machine's too
    other = live.submit("limited-concurrency", {"side_dir": str(side)})
    other.wait(timeout=TIMEOUT_S)
    assert hung.wait(timeout=TIMEOUT_S)["attempt"] >= 2  # a re-run, not the hung call
    calls = _calls(side)
    assert len(calls) == 2
    assert calls[0][0] >= lease_ends - CLOCK_SLACK_S / 10, (calls, lease_ends)
    assert holder not in slots.zrange(key, 0, -1)
    slots.close()


def test_a_node_queue_routes_its_steps_to_the_workers_serving_it(live: Cluster) -> None:
    gpu = start_worker("gpu", live.env, live.workdir, queues="gpu")
    try:
        gpu.wait_ready()
        side = live.side_dir()
        run = live.submit("routed", {"side_dir": str(side)})
        assert run.wait(timeout=TIMEOUT_S)["trail"] == ["gpu1", "cpu", "gpu2"]
        ran_on = {
            name: int(pid)
            for *_, pid, name in (
                line.split() for line in (side / "calls").read_text().splitlines()
            )
        }
        assert ran_on["gpu1"] in gpu.pids() and ran_on["gpu2"] in gpu.pids()
        assert ran_on["cpu"] not in gpu.pids()
    finally:
        gpu.stop()


def test_a_limited_fan_out_holds_its_limits_across_workers_and_counts_usage(
    live: Cluster,
) -> None:
    side = live.side_dir()
    limited = live.submit("limited-map", {"side_dir": str(side), "n": 12, "work_s": 0.2})
    wait_until(lambda: len(_calls(side)) >= 2, TIMEOUT_S)
    free = live.submit("unlimited", {"side_dir": str(live.side_dir())})
    assert free.wait(timeout=TIMEOUT_S)["attempt"] == 1  # not starved by waiting items
    assert not limited.is_done  # ... which were still waiting for their limits
    assert limited.wait(timeout=TIMEOUT_S)["results"] == list(range(12))
    calls = _calls(side)
    assert len(calls) == 12
    starts = [start for start, _ in calls]
    # rate 4/s: any 1 s window holds at most 4 starts (item 0's failed try included,
    # it started too, but wrote no line: the check is on the successful ones only)
    gaps = [starts[i + 4] - starts[i] for i in range(len(starts) - 4)]
    assert min(gaps) >= 1.0 - CLOCK_SLACK_S, gaps
    # max_concurrency 2: never three calls in flight at once, across both workers
    events = sorted([(a, 1) for a, _ in calls] + [(b, -1) for _, b in calls])
    assert max(itertools.accumulate(delta for _, delta in events)) <= 2
    assert len({line.split()[2] for line in (side / "calls").read_text().splitlines()}) == 2
    # usage per item attempt: 13 reports (item 0 twice: its failed try was billed too)
    usage = limited.usage()
    assert usage["calls"] == 13 and usage["input_tokens"] == 130
    assert usage["output_tokens"] == sum(range(12)) and usage["cost_usd"] == pytest.approx(0.13)


def test_a_bad_limit_fails_the_run_naming_the_node_instead_of_looping(live: Cluster) -> None:
    """A limit that does not parse is the node's error, not an executor crash: a crash
    leaves the step to its lease and the sweeper, which would send it again forever."""
    run = live.submit("limited-badly", {"side_dir": str(live.side_dir())})
    wait_until(lambda: run.is_done, TIMEOUT_S)
    row = live.db.get_run(run.run_id)
    assert row["status"] == "failed"
    assert "'call'" in row["error_msg"] and "rate_limit" in row["error_msg"]
    assert "10/d" in row["error_msg"]


def test_steps_waiting_for_a_rate_take_turns_instead_of_all_asking_every_window(
    live: Cluster,
) -> None:
    """W steps waiting for a rate of N per window are each told when their own turn comes:
    about one ask (a ledger write and a message) per step, not all of them at every
    window edge (W^2 / 2N asks: 24 steps at 3/s asked some 85 times)."""
    runs = _rate_limited_runs(live, "limited-rate-turns", live.side_dir(), 24)
    attempts = [a for run in runs for a in live.db.get_attempts(run.run_id)]
    limited = sum(a["outcome"] == "limited" for a in attempts)
    # Turns are computed as if each earlier start came on time; a late one sends a few
    # waiters back once more (about 1.5 asks a step here), far below the herd's 3.5.
    assert limited < 60, f"{limited} limit waits for 24 steps"


def test_map_items_waiting_for_a_slot_take_turns_each_as_its_own_waiter(live: Cluster) -> None:
    """Each map item is a waiter of its own (``run:step:index``): W refused items for one
    slot are told to ask again some W polls apart, about one ask each per W / slots polls.
    As one waiter (``run:step``) every item had turn 0 and came back at every poll, each
    return a ledger write, a message and a claim (12 items here: 53-69 limit waits, not
    15-18)."""
    side = live.side_dir()
    n = 12
    started = time.monotonic()
    run = live.submit("limited-slot-map", {"side_dir": str(side), "n": n, "work_s": 0.3})
    assert run.wait(timeout=TIMEOUT_S)["results"] == list(range(n))
    elapsed = time.monotonic() - started
    calls = _calls(side)
    assert len(calls) == n
    overlaps = [b_start - a_end for (_, a_end), (b_start, _) in itertools.pairwise(calls)]
    assert min(overlaps) >= -CLOCK_SLACK_S / 10, calls  # one slot: one call at a time
    # Every new attempt of an item that never failed is a limit wait (retry_item).
    waits = [row["attempt"] - 1 for row in live.db.get_items(run.run_id, 0)]
    assert sum(waits) <= 3 * n, f"{sum(waits)} limit waits for {n} items ({elapsed:.1f}s): {waits}"


def test_a_token_limit_under_one_limit_key_holds_across_runs_and_workers(
    live: Cluster,
) -> None:
    """Runs of two flows (two nodes: their default keys differ) of one tenant
    (``limit_key``), 5 calls of 100 tokens each, on both workers, under 250 tokens per
    2 s: a call starts only while the window holds fewer than 250, so any 2 s window
    holds at most 3 starts (4 if two calls start at the same instant on two workers,
    which the limit allows: tokens count once reported)."""
    side = live.side_dir()
    store = {"side_dir": str(side), "n": 5, "tenant": "acme"}
    runs = [live.submit(name, store) for name in ("tenant-tokens", "tenant-tokens-b")]
    for run in runs:
        assert run.wait(timeout=TIMEOUT_S)["tokens"] == 500
    lines = [line.split() for line in (side / "calls").read_text().splitlines()]
    starts = sorted(float(start) for start, *_ in lines)
    assert len(starts) == 10 and len({run_id for *_, run_id in lines}) == 2
    assert len({pid for _, _, pid, _ in lines}) == 2  # both workers took calls
    in_window = [sum(1 for t in starts if s <= t < s + 2.0 - CLOCK_SLACK_S) for s in starts]
    assert max(in_window) <= 4, starts
    # 10 starts at most 4 per 2 s: the last cannot start before the third window.
    assert starts[-1] - starts[0] >= 4.0 - CLOCK_SLACK_S, starts


def _limit_waits(live: Cluster, run_id: str) -> list[float]:
    """The waits the limiter told the run's refused calls (``... wait 0.200s``)."""
    return [
        float(a["error_msg"].rsplit("wait ", 1)[1].rstrip("s"))
        for a in live.db.get_attempts(run_id)
        if a["outcome"] == "limited"
    ]


def test_a_cancelled_fan_out_leaves_the_queue_of_its_limit_key(live: Cluster) -> None:
    """The items of a cancelled run queued for one slot under a shared ``limit_key`` no
    longer hold back another run's call under that key: refused while the slot is still
    taken, it is told to come back in about a poll (0.2 s), not after the 40 or more
    stopped items (8 s or more), and starts well within that once the slot frees."""
    import redis

    from pocoflow.distributed.limiter import waiters_key

    side, key, n = live.side_dir(), f"shared-{uuid.uuid4().hex[:8]}", 80
    client = redis.Redis.from_url(live.settings.redis_url)
    try:
        stopped = live.submit("held-slot-map", {"side_dir": str(side), "key": key, "n": n})
        # One item holds the slot (until `release`), the others wait for it: at least
        # half of them queued (a waiter back late is forgotten and queued again).
        wait_until(lambda: client.zcard(waiters_key(key)) >= n // 2, TIMEOUT_S)
        stopped.cancel()
        newcomer = live.submit("keyed-call", {"side_dir": str(side), "key": key})
        (told,) = wait_until(lambda: _limit_waits(live, newcomer.run_id), TIMEOUT_S)
        assert told < 1.0, f"the newcomer was told to wait {told}s"
        (side / "release").write_text("")
        wait_until(lambda: (side / f"{newcomer.run_id}.started").exists(), 5.0)
        assert newcomer.wait(timeout=TIMEOUT_S) is not None
        assert stopped.status == "cancelled"
    finally:
        (side / "release").write_text("")
        client.close()
