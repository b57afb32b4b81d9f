"""Flows for the threads-pool tests (``POCOFLOW_FLOWS=tests.distributed.threads_flows``):
nodes that check, around a wait that lets other steps of the same process run, that the
``run_id``/``step``/``attempt`` a step sees on its node object stay its own, and a
BatchFlow nested in an outer flow (one step on a worker).

What a node saw goes into the Store (it is part of the result the test compares); which
thread ran it goes to a side file, so the final Store stays comparable with a local run.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

from pocoflow import BatchFlow, Flow, Node, flow

STEPS = 4
#: Long enough that eight threads' steps overlap (I/O-bound work, as an LLM call).
EXEC_S = 0.05


def _record_thread(store: Any, what: str) -> None:
    side_dir = store.get("side_dir")
    if side_dir:
        with open(Path(side_dir) / "threads", "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()} {threading.current_thread().name} {what}\n")


class Witness(Node):
    """Reads its step identity in prep, after a sleep in exec, and in post; all three must
    be the same (a node object shared by two threads' steps would mix them)."""

    def prep(self, store: Any) -> Any:
        _record_thread(store, f"{self.run_id} {self.name}")
        return [self.run_id, self.step, self.attempt], store.get("exec_s", EXEC_S)

    def exec(self, prep_result: Any) -> Any:
        time.sleep(prep_result[1])
        return [self.run_id, self.step, self.attempt]

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        seen = [prep_result[0], exec_result, [self.run_id, self.step, self.attempt]]
        store["seen"] = {**store.get("seen", {}), self.name: seen}
        store["total"] = store.get("total", 0) + store["n"]
        return "default"


@flow("witness_chain")
def witness_chain() -> Flow:
    nodes = [Witness(name=f"w{i}") for i in range(STEPS)]
    for a, b in itertools.pairwise(nodes):
        a.then("default", b)
    return Flow(start=nodes[0])


class Split(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["docs"] = [f"{store['n']}-{i}" for i in range(4)]
        return "default"


class Summarise(Node):
    """Reads what every pass wrote under its own key."""

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["summary"] = [store[f"out/{doc}"] for doc in store["docs"]]
        return "default"


class PerDoc(BatchFlow):
    parallel = True
    max_parallel = 4

    def prep(self, store: Any) -> list[dict[str, Any]]:
        return [{"doc": doc} for doc in store["docs"]]


class Upper(Node):
    def prep(self, store: Any) -> Any:
        return self.params["doc"], self.run_id

    def exec(self, prep_result: Any) -> Any:
        time.sleep(EXEC_S / 5)
        doc, run_id = prep_result
        return [doc.upper(), run_id == self.run_id, self.params["doc"] == doc]

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store[f"out/{self.params['doc']}"] = exec_result
        return "default"


@flow("batch_in_flow")
def batch_in_flow() -> Flow:
    """Split -> PerDoc (a parallel BatchFlow of Upper) -> Summarise."""
    split, batch, summarise = Split(), PerDoc(start=Upper(), flow_name="per_doc"), Summarise()
    split.then("default", batch)
    batch.then("default", summarise)
    return Flow(start=split)


@flow("batch_alone")
def batch_alone() -> Flow:
    """A parallel BatchFlow as the whole flow: its run is one step, the batch."""
    return PerDoc(start=Upper())
