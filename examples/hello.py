"""Hello, PocoFlow: two nodes, one Store, a hook and a ledger.

python examples/hello.py            # prints the greeting and the recorded run
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from pocoflow import Flow, Node, Store
from pocoflow.db import WorkflowDB


class Greet(Node):
    def prep(self, store):
        return store["name"]

    def exec(self, name):
        return f"Hello, {name}!"

    def post(self, store, prep_result, greeting):
        store["greeting"] = greeting
        return "shout"


class Shout(Node):
    def prep(self, store):
        return store["greeting"]

    def exec(self, greeting):
        return greeting.upper()

    def post(self, store, prep_result, loud):
        store["loud"] = loud
        return "done"


def build_flow(db_path: str | Path | None = None) -> Flow:
    greet = Greet()
    greet.then("shout", Shout())
    return Flow(start=greet, db_path=db_path, flow_name="hello")


def main(db_path: str | Path | None = None) -> Store:
    db_path = db_path or Path(tempfile.mkdtemp()) / "hello.db"
    flow = build_flow(db_path)
    flow.on("node_end", lambda name, action, elapsed, store: print(f"  {name} -> {action}"))
    store = flow.run(Store({"name": "PocoFlow"}, schema={"name": str}))
    print(store["loud"])
    run = WorkflowDB(db_path).get_run(flow.last_run_id)
    print(f"run {run['run_id']}: {run['status']} in {run['total_steps']} steps")
    return store


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
