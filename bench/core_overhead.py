"""Per-node overhead with no ledger: PocoFlow vs PocketFlow 0.0.3 on a 100-node chain.

Target (issue 2): at most 1.5x PocketFlow's per-node time.
"""

from __future__ import annotations

import itertools
import warnings

import pocketflow

from bench.common import alternate, report
from pocoflow import Flow, Node, Store

CHAIN = 100


class PocoStep(Node):
    def prep(self, store):
        return store["n"]

    def exec(self, n):
        return n + 1

    def post(self, store, prep_result, exec_result):
        store["n"] = exec_result
        return "default"


class PocketStep(pocketflow.Node):
    def prep(self, shared):
        return shared["n"]

    def exec(self, n):
        return n + 1

    def post(self, shared, prep_result, exec_result):
        shared["n"] = exec_result
        return "default"


def poco_chain(db_path=None) -> Flow:
    nodes = [PocoStep() for _ in range(CHAIN)]
    for a, b in itertools.pairwise(nodes):
        a.then("default", b)
    return Flow(start=nodes[0], max_steps=CHAIN + 1, db_path=db_path)


def pocket_chain() -> pocketflow.Flow:
    nodes = [PocketStep() for _ in range(CHAIN)]
    for a, b in itertools.pairwise(nodes):
        a >> b
    return pocketflow.Flow(start=nodes[0])


def main(repeat: int = 200) -> bool:
    poco, pocket = poco_chain(), pocket_chain()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        poco_s, pocket_s = alternate(
            lambda: poco.run(Store({"n": 0})), lambda: pocket.run({"n": 0}), repeat
        )
    poco_us, pocket_us = poco_s / CHAIN * 1e6, pocket_s / CHAIN * 1e6
    print(f"core: {CHAIN}-node chain, no ledger, median of {repeat} alternating runs")
    return report(
        "per-node overhead, no ledger",
        poco_us,
        "us",
        f"PocketFlow 0.0.3: {pocket_us:.1f} us -> {poco_us / pocket_us:.2f}x (target <= 1.5x)",
        poco_us <= 1.5 * pocket_us,
    )


if __name__ == "__main__":
    main()
