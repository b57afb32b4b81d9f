"""Flows the distributed benchmark's workers import (``POCOFLOW_FLOWS=bench.dist_flows``)."""

from __future__ import annotations

import itertools
import time
from typing import Any

from pocoflow import Flow, MapNode, Node, flow

CHAIN = 100
THROUGHPUT_CHAIN = 20


class Tick(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["n"] = store.get("n", 0) + 1
        return "default"


class Nap(Node):
    """Simulated work: ``exec`` sleeps ``store["nap_s"]`` seconds, on every attempt, so a
    worker can be killed in the middle of it; the Store records which attempt ran."""

    def prep(self, store: Any) -> float:
        return float(store.get("nap_s", 1.0))

    def exec(self, prep_result: float) -> int:
        time.sleep(prep_result)  # the node's own work, not a synchronisation
        return self.attempt

    def post(self, store: Any, prep_result: Any, exec_result: int) -> str:
        store["nap_attempt"] = exec_result
        return "default"


def _chain(length: int) -> Flow:
    nodes = [Tick(name=f"t{i:03d}") for i in range(length)]
    for a, b in itertools.pairwise(nodes):
        a.then("default", b)
    return Flow(start=nodes[0], max_steps=length)


@flow("bench_chain")
def bench_chain() -> Flow:
    return _chain(CHAIN)


@flow("bench_chain20")
def bench_chain20() -> Flow:
    return _chain(THROUGHPUT_CHAIN)


@flow("bench_nap")
def bench_nap() -> Flow:
    """before (step 0) -> nap (step 1, the step a worker is killed in) -> after (step 2)."""
    before, nap, after = Tick(name="before"), Nap(name="nap"), Tick(name="after")
    before.then("default", nap)
    nap.then("default", after)
    return Flow(start=before, max_steps=3)


class Sleepy(MapNode):
    """Fan-out: one item per simulated LLM call; ``exec`` sleeps the item's seconds (the
    call's latency) and returns a small result, as a summary would be."""

    max_parallel = 32

    def prep(self, store: Any) -> list[float]:
        return [float(store["item_s"])] * int(store["items"])

    def exec(self, item_s: float) -> int:
        if item_s:
            time.sleep(item_s)  # the call's latency, not a synchronisation
        return 1

    def post(self, store: Any, items: Any, results: list[int]) -> str:
        store["done"] = sum(results)
        return "default"


@flow("bench_fanout")
def bench_fanout() -> Flow:
    return Flow(start=Sleepy(name="calls"), max_steps=1)
