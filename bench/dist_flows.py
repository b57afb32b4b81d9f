"""Flows the distributed benchmark's worker imports."""

from __future__ import annotations

import itertools
from typing import Any

from pocoflow import Flow, Node, flow

CHAIN = 100


class Tick(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["n"] = store.get("n", 0) + 1
        return "default"


@flow("bench_chain")
def bench_chain() -> Flow:
    nodes = [Tick(name=f"t{i:03d}") for i in range(CHAIN)]
    for a, b in itertools.pairwise(nodes):
        a.then("default", b)
    return Flow(start=nodes[0], max_steps=CHAIN)
