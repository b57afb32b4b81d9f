"""A flow's graph frozen into ids: what checkpoints and step messages name.

Node objects cannot travel between processes, so every node gets a stable id derived from
the graph's shape (its name, suffixed ``#2``, ``#3`` when a name repeats, in discovery
order). The fingerprint hashes the shape so a worker whose code builds a different graph
refuses a run instead of running the wrong node (G6).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from typing import Any

from pocoflow.limits import declares_limits
from pocoflow.node import Node


class Graph:
    """The nodes reachable from ``start``, each with its id, in breadth-first order."""

    def __init__(self, start: Node) -> None:
        if not isinstance(start, Node):
            raise TypeError(f"A flow starts at a Node, got {type(start).__name__}")
        self.start = start
        self._by_id: dict[str, Node] = {}
        self._ids: dict[int, str] = {}
        seen_names: dict[str, int] = {}
        queue: deque[Node] = deque([start])
        while queue:
            node = queue.popleft()
            if id(node) in self._ids:
                continue
            count = seen_names.get(node.name, 0) + 1
            seen_names[node.name] = count
            node_id = node.name if count == 1 else f"{node.name}#{count}"
            while node_id in self._by_id:  # a node literally named "X#2"
                count += 1
                node_id = f"{node.name}#{count}"
            self._ids[id(node)] = node_id
            self._by_id[node_id] = node
            queue.extend(node._successors.values())
        self._fingerprint: str | None = None
        self._limited: bool | None = None

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, node: object) -> bool:
        return id(node) in self._ids

    @property
    def start_id(self) -> str:
        return self._ids[id(self.start)]

    def id_of(self, node: Node) -> str:
        try:
            return self._ids[id(node)]
        except KeyError:
            raise ValueError(
                f"Node {node.name!r} is not reachable from the flow's start node "
                f"{self.start.name!r}"
            ) from None

    def node(self, node_id: str) -> Node:
        try:
            return self._by_id[node_id]
        except KeyError:
            raise KeyError(
                f"Node id {node_id!r} is not in this graph (nodes: {', '.join(self._by_id)})"
            ) from None

    def shape(self) -> dict[str, Any]:
        """A JSON-able description: per node id, its class and its edges by action."""
        shape: dict[str, Any] = {}
        for node_id, node in self._by_id.items():
            entry: dict[str, Any] = {
                "class": f"{type(node).__module__}.{type(node).__qualname__}",
                "edges": {a: self._ids[id(n)] for a, n in node._successors.items()},
            }
            inner = getattr(node, "start", None)
            if isinstance(inner, Node) and hasattr(node, "graph"):
                # The inner graph itself, not node.graph(): a BatchFlow's run graph is
                # the batch node, which would describe itself forever.
                entry["subflow"] = Graph(inner).shape()
            shape[node_id] = entry
        return {"start": self.start_id, "nodes": shape}

    @property
    def limited(self) -> bool:
        """Whether a node (a sub-flow's inner nodes included) declares a limit: only then
        may the run's calls have queued in a limiter."""
        if self._limited is None:
            self._limited = any(_declares_limits(n) for n in self._by_id.values())
        return self._limited

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            text = json.dumps(self.shape(), sort_keys=True, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._fingerprint


def _declares_limits(node: Node) -> bool:
    return declares_limits(node) or (node._is_flow and node.graph().limited)  # type: ignore[attr-defined]


def shape_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """Say in a line or two how two graph shapes differ, for G6's refusal message."""
    diffs: list[str] = []
    if recorded.get("start") != current.get("start"):
        diffs.append(f"start node {recorded.get('start')!r} -> {current.get('start')!r}")
    old, new = recorded.get("nodes", {}), current.get("nodes", {})
    if added := sorted(set(new) - set(old)):
        diffs.append(f"nodes added: {', '.join(added)}")
    if removed := sorted(set(old) - set(new)):
        diffs.append(f"nodes removed: {', '.join(removed)}")
    for node_id in sorted(set(old) & set(new)):
        if old[node_id] != new[node_id]:
            diffs.append(f"node {node_id!r} changed: {old[node_id]} -> {new[node_id]}")
    return "; ".join(diffs) or "no difference in shape"
