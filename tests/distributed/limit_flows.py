"""Flows with node limits that the workers of ``test_limits.py`` import. Each exec writes
``<start> <end> <pid>`` (wall clock) to a side file, so the test process can check every
sliding window and the overlap of calls across workers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pocoflow import Flow, Node, flow

#: The key every limited node here counts under: one shared resource across flows.
RATE = "3/s"
CONCURRENCY = 1
HANG_LIMIT_S = 60.0


class Timed(Node):
    """Records its exec interval and pid (and its name in the Store's trail); sleeps ``store["work_s"]``; with ``store["hang"]`` its
    first attempt hangs (until its worker is killed)."""

    def prep(self, store: Any) -> Any:
        return Path(store["side_dir"]), store.get("work_s", 0.0), store.get("hang", False)

    def exec(self, prep_result: Any) -> Any:
        side, work_s, hang = prep_result
        start = time.time()
        (side / f"{self.run_id}.{self.attempt}.started").write_text(str(os.getpid()))
        if hang and self.attempt == 1:
            time.sleep(HANG_LIMIT_S)
        time.sleep(work_s)
        with open(side / "calls", "a", encoding="utf-8") as handle:
            handle.write(f"{start} {time.time()} {os.getpid()} {self.name}\n")
        return self.attempt

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["attempt"] = exec_result
        store["trail"] = [*store.get("trail", []), self.name]
        return "default"


class RateLimited(Timed):
    rate_limit = RATE


class ConcurrencyLimited(Timed):
    max_concurrency = CONCURRENCY


@flow("limited-rate")
def limited_rate() -> Flow:
    return Flow(start=RateLimited(name="call"))


@flow("limited-concurrency")
def limited_concurrency() -> Flow:
    return Flow(start=ConcurrencyLimited(name="call"))


@flow("unlimited")
def unlimited() -> Flow:
    return Flow(start=Timed(name="call"))


class OnGpu(Timed):
    queue = "gpu"


@flow("routed")
def routed() -> Flow:
    """gpu -> cpu -> gpu: the first send and each successor follow Node.queue."""
    first, middle, last = OnGpu(name="gpu1"), Timed(name="cpu"), OnGpu(name="gpu2")
    first.then("default", middle)
    middle.then("default", last)
    return Flow(start=first)


class BadlyLimited(Timed):
    rate_limit = "10/d"  # no such unit: every step of it must fail, naming the node


@flow("limited-badly")
def limited_badly() -> Flow:
    return Flow(start=BadlyLimited(name="call"))


class RateLimitedTurns(Timed):
    rate_limit = RATE


@flow("limited-rate-turns")
def limited_rate_turns() -> Flow:
    """Its own limit key (flow / node name): no other test's starts in its window."""
    return Flow(start=RateLimitedTurns(name="call"))
