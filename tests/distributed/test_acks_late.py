"""``POCOFLOW_ACKS_LATE=1``: the core run and a kill -9 mid-step on workers that ack a
message only after the step, on both ledgers. The ledger, not the broker, finds the lost
step (G3): late ack must change nothing a run can see (G1)."""

from __future__ import annotations

import time

import pytest
import redis

from pocoflow.distributed import orphans
from tests.distributed.conftest import Cluster, local_result
from tests.distributed.faults import (
    TEST_LEASE_S,
    TEST_SWEEP_S,
    attempts_of,
    checkpoint_steps,
    worker_running,
)
from tests.distributed.flows import CHAIN_LENGTH
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

WORKER_ENV = {"POCOFLOW_ACKS_LATE": "1"}
TIMEOUT_S = 60.0


def test_a_chain_with_late_ack_equals_a_local_run(live: Cluster) -> None:
    handle = live.submit("counter", {"count": 0})
    store = handle.wait(timeout=TIMEOUT_S)
    assert store.as_dict() == local_result("counter", {"count": 0})
    assert checkpoint_steps(live.db, handle.run_id) == list(range(CHAIN_LENGTH))
    for step in range(CHAIN_LENGTH):
        assert [a["outcome"] for a in attempts_of(live.db, handle.run_id, step)] == ["committed"]


def test_kill_9_with_late_ack_reruns_the_step_once(live: Cluster) -> None:
    side = live.side_dir()
    handle = live.submit("hold", {"count": 0, "side_dir": str(side)})
    pid_file = side / f"{handle.run_id}.1.1.pid"
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text(), TIMEOUT_S))
    victim = worker_running(live.workers, pid)
    # Late ack for real: the running step's message is still unacknowledged in Redis
    # (with early ack it left the unacked set when the step started). A sweeper's first
    # look may have sent a copy beside it (an empty queue reads as a lost broker; the
    # claim refuses the copy), so the running one is looked for among the entries.
    broker = redis.Redis.from_url(live.settings.broker_url)
    entries = orphans.decode(broker, [tag for tag, _ in orphans.unacked(broker)])
    held = [
        m for m in entries.values() if m is not None and (m.run_id, m.step) == (handle.run_id, 1)
    ]
    assert [m.attempt for m in held] in ([1], [1, 1])
    killed_at = time.monotonic()
    victim.kill()
    store = handle.wait(timeout=TIMEOUT_S)
    assert time.monotonic() - killed_at < TEST_LEASE_S + TEST_SWEEP_S + 5
    assert store.as_dict() == {
        "count": 2,
        "hold": "passed",
        "hold_attempt": 2,
        "side_dir": str(side),
        "trail": ["before", "after"],
    }
    outcomes = [(a["attempt"], a["outcome"]) for a in attempts_of(live.db, handle.run_id, 1)]
    assert outcomes == [(1, "lost"), (2, "committed")]
    assert checkpoint_steps(live.db, handle.run_id) == [0, 1, 2]
