"""Local MapNode flows whose items the test holds, for the pause-between-items tests
(``tests/unit/test_mapnode.py``, ``tests/ledger/test_local_map_pause.py``).

``start -> tenfold -> end``: ``tenfold`` maps ``ITEMS`` items with ``PARALLEL`` at once;
items from ``BLOCKED`` on wait for the test's ``release`` event before they return, so
the test knows exactly which items are in flight when it pauses: ``BLOCKED`` ..
``BLOCKED + PARALLEL - 1``, and no other. Every started item is appended to ``started``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from pocoflow import AsyncNode, Flow, MapNode, Node

ITEMS = 12
PARALLEL = 3
BLOCKED = 4  # items 0-3 end at once; 4, 5, 6 run until released
IN_FLIGHT = list(range(BLOCKED + PARALLEL))  # every item started when the pause lands
KINDS = ["threads", "async", "sub-flow"]
WAIT_S = 10.0


@dataclass
class Items:
    """What the test sees of the map's items and how it lets them go."""

    release: threading.Event = field(default_factory=threading.Event)
    started: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, item: int) -> None:
        with self.lock:
            self.started.append(item)


class Start(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["numbers"] = list(range(ITEMS))
        return "default"


class Tenfold(MapNode):
    max_parallel = PARALLEL

    def __init__(self, items: Items) -> None:
        super().__init__(name="tenfold")
        self.items = items

    def prep(self, store: Any) -> list[int]:
        return list(store["numbers"])

    def exec(self, item: int) -> int:
        self.items.start(item)
        if item >= BLOCKED:
            assert self.items.release.wait(WAIT_S)
        return item * 10

    def post(self, store: Any, items: list[int], results: list[int]) -> str:
        store["tenfold"] = results
        return "default"


class AsyncTenfold(Tenfold, AsyncNode):
    async def exec_async(self, item: int) -> int:
        self.items.start(item)
        if item >= BLOCKED:
            assert await asyncio.to_thread(self.items.release.wait, WAIT_S)
        return item * 10


class End(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["total"] = sum(store["tenfold"])
        return "default"


def build(kind: str, items: Items, db_url: str | None = None) -> Flow:
    """``kind``: ``threads``, ``async``, or ``sub-flow`` (the threads map as the only node
    of a Flow that is the outer flow's middle node)."""
    start, end = Start(name="start"), End(name="end")
    mapper: Node = (AsyncTenfold if kind == "async" else Tenfold)(items)
    if kind == "sub-flow":
        mapper = Flow(start=mapper, flow_name="inner")
    start.then("default", mapper)
    mapper.then("default", end)
    return Flow(start=start, db_path=db_url, flow_name=f"pause_map_{kind.replace('-', '_')}")


def uninterrupted(kind: str) -> dict[str, Any]:
    """The Store of the same flow run without a pause."""
    items = Items()
    items.release.set()
    return build(kind, items).run({}).as_dict()
