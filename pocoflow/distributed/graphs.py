"""Graphs a worker runs, built from the registry once per process (G6, G7).

A step message names a flow; the name is looked up among the builders this process
registered at start-up (``--flows``), never imported: an unknown name is refused. Each
thread gets its own Flow, because ``run_step`` sets ``run_id``/``step``/``attempt`` on the
node objects and a threads pool would otherwise share them between running steps.
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING, Any

from pocoflow.graph import Graph, shape_difference
from pocoflow.logging import get_logger
from pocoflow.registry import build_flow

if TYPE_CHECKING:
    from pocoflow.flow import Flow

_log = get_logger("distributed.graphs")


class GraphCache:
    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        #: id of every Flow built here -> the thread it was built for; see ``_check``.
        self._owners: dict[int, int] = {}

    def get(self, flow_name: str) -> tuple[Flow, Graph]:
        """``(flow, graph)`` for a registered flow; ``UnknownFlowError`` otherwise."""
        cache: dict[str, tuple[Flow, Graph]] = self._local.__dict__.setdefault("flows", {})
        found = cache.get(flow_name)
        if found is None:
            flow = build_flow(flow_name)
            self._check(flow_name, flow)
            found = cache[flow_name] = (flow, flow.graph())
        return found

    def _check(self, flow_name: str, flow: Flow) -> None:
        """Warn when a builder hands two threads the same Flow object (it keeps one in a
        global): their concurrent steps would then share node objects, and what a step
        sets on its node (``run_id``, ``step``, ``attempt``) would be another's."""
        me = threading.get_ident()
        with self._lock:
            owner = self._owners.setdefault(id(flow), me)
        if owner != me:
            _log.warning(
                "The builder of flow %r returned the same Flow object to two threads: "
                "steps running at once on a threads pool share its nodes. Build the "
                "nodes and the Flow inside the builder, so each call makes new ones.",
                flow_name,
            )

    def clear(self) -> None:
        self._local.__dict__.pop("flows", None)


def shape_text(graph: Graph) -> str:
    """The graph's shape as the JSON text a run records next to its fingerprint."""
    return json.dumps(graph.shape(), sort_keys=True, separators=(",", ":"))


def mismatch_message(run: dict[str, Any], graph: Graph, *, run_id: str, worker: str) -> str:
    """G6's refusal: which flow, what changed, and the two ways out."""
    recorded_shape = run.get("graph_shape")
    if recorded_shape:
        difference = shape_difference(json.loads(recorded_shape), graph.shape())
    else:
        difference = "the run did not record its graph shape"
    return (
        f"Worker {worker} refused run {run_id!r}: its graph of flow {run['flow_name']!r} "
        f"differs from the one the run started with (fingerprint {run['fingerprint']} -> "
        f"{graph.fingerprint}; {difference}). Deploy the flow code the run started with "
        f"and `pocoflow resume {run_id}`, or accept the new graph with "
        f"`pocoflow resume {run_id} --force`."
    )
