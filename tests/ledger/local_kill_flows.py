"""A local flow for the kill -9 test: count to 4, and at step 1 block while a file exists
(recording the pid), so the test can kill the process mid-run."""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

from pocoflow import Flow, Node

BLOCK_LIMIT_S = 60.0


class Add(Node):
    def prep(self, store: Any) -> int:
        return store["n"]

    def exec(self, n: int) -> int:
        return n + 1

    def post(self, store: Any, prep_result: Any, n: int) -> str:
        store["n"] = n
        store["trail"] = [*store.get("trail", []), self.name]
        return "default"


class Block(Add):
    """Writes its pid, then waits while ``store["side"]/block`` exists."""

    def prep(self, store: Any) -> Any:
        return store["n"], Path(store["side"])

    def exec(self, prep_result: Any) -> int:
        n, side = prep_result
        (side / "pid").write_text(str(os.getpid()))
        deadline = time.monotonic() + BLOCK_LIMIT_S
        while (side / "block").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return n + 1


def build(db_url: str, run_id: str | None = None) -> Flow:
    nodes = [Add(name="a"), Block(name="b"), Add(name="c"), Add(name="d")]
    for first, second in itertools.pairwise(nodes):
        first.then("default", second)
    return Flow(start=nodes[0], db_path=db_url, run_id=run_id, flow_name="local_kill")


if __name__ == "__main__":  # python -m tests.ledger.local_kill_flows DB_URL RUN_ID SIDE
    # Imported by its module name: the graph's fingerprint names node classes by module,
    # and the resuming process knows them as tests.ledger.local_kill_flows, not __main__.
    from tests.ledger.local_kill_flows import build as build_by_name

    db_url, run_id, side = sys.argv[1:4]
    build_by_name(db_url, run_id).run({"n": 0, "side": side})
