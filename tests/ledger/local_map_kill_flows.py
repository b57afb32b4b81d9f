"""Local flows with a MapNode for the kill -9 tests: ``start -> map -> end``. The map has
``ITEMS`` items; items from ``FINISHING`` on block while ``<side>/block`` exists, so the
process finishes exactly ``FINISHING`` items and then waits, killable, with items in
flight. Each exec appends ``<pid> <index>`` to ``<side>/ran``: who ran which item."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pocoflow import AsyncNode, Flow, MapNode, Node

ITEMS = 12
FINISHING = 5
BLOCK_LIMIT_S = 60.0


def _ran(side: Path, index: int) -> None:
    with (side / "ran").open("a") as out:  # one short O_APPEND write: whole lines
        out.write(f"{os.getpid()} {index}\n")


def _blocked(side: Path, index: int) -> bool:
    return index >= FINISHING and (side / "block").exists()


class Start(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["words"] = [f"w{i}" for i in range(ITEMS)]
        return "default"


class Upper(MapNode):
    """Threads: ``{"index", "word"}`` items -> the word upper-cased, with its index."""

    max_parallel = 3

    def prep(self, store: Any) -> list[dict[str, Any]]:
        self.side = Path(store["side"])
        return [{"index": i, "word": w} for i, w in enumerate(store["words"])]

    def exec(self, item: dict[str, Any]) -> str:
        _ran(self.side, item["index"])
        deadline = time.monotonic() + BLOCK_LIMIT_S
        while _blocked(self.side, item["index"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return f"{item['index']}:{item['word'].upper()}"

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["upper"] = results
        return "default"


class AsyncUpper(Upper, AsyncNode):
    """The same map with an async ``exec`` (the items on one event loop)."""

    async def exec_async(self, item: dict[str, Any]) -> str:
        _ran(self.side, item["index"])
        deadline = time.monotonic() + BLOCK_LIMIT_S
        while _blocked(self.side, item["index"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return f"{item['index']}:{item['word'].upper()}"


class End(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["joined"] = " ".join(store["upper"])
        return "default"


ROOT = Path(__file__).resolve().parents[2]


def start_blocked(
    db_url: str, kind: str, run_id: str, side: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """Run ``build(...)`` in a process of its own, its items from ``FINISHING`` on blocked
    (``<side>/block``) until the test lets them go or kills the process; ``extra``: the
    ledger poll interval of a map (``pausing.ITEM_POLL_S``)."""
    side.mkdir()
    (side / "block").touch()
    return subprocess.Popen(
        [sys.executable, "-m", __name__, db_url, kind, run_id, str(side), *extra],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def ran_by(side: Path) -> dict[int, list[int]]:
    """pid -> the item indexes it started, in order."""
    out: dict[int, list[int]] = {}
    if (side / "ran").exists():
        for line in (side / "ran").read_text().splitlines():
            pid, index = map(int, line.split())
            out.setdefault(pid, []).append(index)
    return out


def build(db_url: str | None, kind: str, run_id: str | None = None) -> Flow:
    """``kind``: ``threads`` or ``async``."""
    start, end = Start(name="start"), End(name="end")
    mapper = (AsyncUpper if kind == "async" else Upper)(name="upper")
    start.then("default", mapper)
    mapper.then("default", end)
    return Flow(start=start, db_path=db_url, run_id=run_id, flow_name=f"local_map_{kind}")


if __name__ == "__main__":  # ... DB_URL KIND RUN_ID SIDE [ITEM_POLL_S]
    # Imported by its module name: the graph's fingerprint names node classes by module,
    # and the resuming process knows them as tests.ledger.local_map_kill_flows.
    from pocoflow import pausing
    from tests.ledger.local_map_kill_flows import build as build_by_name

    db_url, kind, run_id, side = sys.argv[1:5]
    if len(sys.argv) > 5:  # how often the map reads the ledger for a pause (0: each item)
        pausing.ITEM_POLL_S = float(sys.argv[5])
    build_by_name(db_url, kind, run_id).run({"side": side})
