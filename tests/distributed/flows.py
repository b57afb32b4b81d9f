"""Flows the test workers import (``POCOFLOW_FLOWS=tests.distributed.flows``).

Each flow exercises one part of the step protocol. Nodes that must be observed from the
test process (which process runs them, how often ``exec`` ran) write to side files under
``store["side_dir"]``, never to the Store, so the final Store stays comparable with a
local run's.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path
from typing import Any

from pocoflow import AsyncNode, Flow, Node, flow

CHAIN_LENGTH = 20
#: How long a held node waits for its release file before giving up (a test failed).
HOLD_LIMIT_S = 60.0


def _side(store: Any, name: str) -> Path | None:
    side_dir = store.get("side_dir")
    return Path(side_dir) / name if side_dir else None


def _append(path: Path | None, line: str) -> None:
    if path is not None:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


class Increment(Node):
    """count += 1 and the node's id appended to the trail; one side-file line per exec."""

    def prep(self, store: Any) -> Any:
        return store["count"], _side(store, f"{self.run_id}.execs")

    def exec(self, prep_result: Any) -> int:
        count, side = prep_result
        _append(side, f"{self.step} {self.attempt} {os.getpid()}")
        return count + 1

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["count"] = exec_result
        store["trail"] = [*store.get("trail", []), self.name]
        return "default"


@flow("counter")
def counter_flow() -> Flow:
    """CHAIN_LENGTH Increment nodes in a row."""
    nodes = [Increment(name=f"inc{i:02d}") for i in range(CHAIN_LENGTH)]
    for a, b in itertools.pairwise(nodes):
        a.then("default", b)
    return Flow(start=nodes[0], max_steps=100)


class Hold(Node):
    """On attempt 1, records its pid and waits for a release file (or a cancel, unless
    ``ignore_cancel``): the node tests kill, freeze and terminate. Later attempts pass
    straight through."""

    def prep(self, store: Any) -> Any:
        return store.get("side_dir"), store.get("ignore_cancel", False)

    def exec(self, prep_result: Any) -> str:
        side_dir, ignore_cancel = prep_result
        side = Path(side_dir)
        (side / f"{self.run_id}.{self.step}.{self.attempt}.pid").write_text(str(os.getpid()))
        if self.attempt > 1:
            return "passed"
        release = side / f"{self.run_id}.release"
        deadline = time.monotonic() + HOLD_LIMIT_S
        while time.monotonic() < deadline:
            if release.exists():
                return "released"
            if not ignore_cancel and self.cancelled():
                return "cancelled"
            time.sleep(0.02)
        return "timeout"

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["hold"] = exec_result
        store["hold_attempt"] = self.attempt
        return "default"


@flow("hold")
def hold_flow() -> Flow:
    """Increment -> Hold -> Increment."""
    first, hold, last = Increment(name="before"), Hold(), Increment(name="after")
    first.then("default", hold)
    hold.then("default", last)
    return Flow(start=first)


class Slow(Node):
    """Sleeps in small slices for ``store["slow_s"]``, stopping early when cancelled."""

    def prep(self, store: Any) -> float:
        return float(store.get("slow_s", 0.3))

    def exec(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.cancelled():
                return False
            time.sleep(0.01)
        return True

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["slow_runs"] = store.get("slow_runs", 0) + 1
        store["count"] = store.get("count", 0) + 1
        return "default"


@flow("slow_chain")
def slow_chain_flow() -> Flow:
    """Eight Slow nodes in a row: time enough to cancel or pause in the middle."""
    nodes = [Slow(name=f"slow{i}") for i in range(8)]
    for a, b in itertools.pairwise(nodes):
        a.then("default", b)
    return Flow(start=nodes[0])


class Flaky(Node):
    """Fails its first ``store["failures"]`` tries (counted in a side file), then works."""

    max_retries = 3
    retry_delay = 0.2

    def prep(self, store: Any) -> Any:
        return int(store.get("failures", 2)), _side(store, f"{self.run_id}.tries")

    def exec(self, prep_result: Any) -> int:
        failures, side = prep_result
        _append(side, str(self.attempt))
        tries = len(side.read_text().splitlines()) if side is not None else 1
        if tries <= failures:
            raise ConnectionError(f"flaky try {tries}")
        return tries

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["tries"] = exec_result
        return "default"


class AsyncDouble(AsyncNode):
    async def exec_async(self, prep_result: Any) -> int:
        await asyncio.sleep(0.01)
        return 2

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["async"] = exec_result
        return "default"


@flow("flaky")
def flaky_flow() -> Flow:
    """Flaky (retried by Celery countdown) -> AsyncDouble."""
    flaky = Flaky()
    flaky.then("default", AsyncDouble())
    return Flow(start=flaky)


class Unstorable(Node):
    """Puts a value the codec cannot round-trip into the Store (G7)."""

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["handle"] = object()
        return "default"


@flow("unstorable")
def unstorable_flow() -> Flow:
    node = Increment(name="first")
    node.then("default", Unstorable())
    return Flow(start=node)


class Loop(Node):
    """Goes round forever; only max_steps stops it (G5)."""

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["laps"] = store.get("laps", 0) + 1
        return "again"


@flow("loop")
def loop_flow() -> Flow:
    node = Loop()
    node.then("again", node)
    return Flow(start=node, max_steps=7)


@flow("versioned")
def versioned_flow() -> Flow:
    """Two nodes, or three when ``POCOFLOW_TEST_VARIANT=b``: a graph that changes between
    deployments (G6)."""
    first, second = Increment(name="first"), Increment(name="second")
    first.then("default", second)
    if os.environ.get("POCOFLOW_TEST_VARIANT") == "b":
        second.then("default", Increment(name="third"))
    return Flow(start=first)


@flow("hooked")
def hooked_flow() -> Flow:
    """Two Increments; the builder's hooks append to the side file named in the Store, so
    a test sees them fire in the worker process."""
    first, second = Increment(name="h1"), Increment(name="h2")
    first.then("default", second)
    built = Flow(start=first)

    def node_end(name: str, action: Any, elapsed: float, store: Any) -> None:
        _append(_side(store, "hooks"), f"node_end {name} {os.getpid()}")

    def flow_end(steps: int, store: Any) -> None:
        _append(_side(store, "hooks"), f"flow_end {steps} {os.getpid()}")

    return built.on("node_end", node_end).on("flow_end", flow_end)
