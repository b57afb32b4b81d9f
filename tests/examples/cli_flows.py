"""A flow for the CLI tests: counts to 3 and fails once while the marker file exists."""

from __future__ import annotations

import os
from pathlib import Path

from pocoflow import Flow, Node, flow


class Count(Node):
    def prep(self, store):
        return store["n"]

    def exec(self, n):
        marker = Path(os.environ.get("POCOFLOW_TEST_FAIL_ONCE", "/nonexistent"))
        if n == 1 and marker.exists():
            marker.unlink()
            raise RuntimeError("transient failure at n=1")
        return n + 1

    def post(self, store, prep_result, n):
        store["n"] = n
        return "again" if n < 3 else "done"


@flow("cli-count")
def build() -> Flow:
    node = Count()
    node.then("again", node)
    return Flow(start=node)
