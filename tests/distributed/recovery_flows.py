"""Flows for the recovery tests (``tests/distributed/test_recovery.py``): a poison node
that kills its worker process every time, and a node whose first exec hangs past its
``timeout``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pocoflow import Flow, Node, flow
from tests.distributed.flows import Increment


class Crash(Node):
    """Kills the process running it, every time (as a segfault or the OOM killer would)."""

    def prep(self, store: Any) -> Any:
        return store.get("side_dir")

    def exec(self, side_dir: Any) -> None:
        if side_dir:
            with open(Path(side_dir) / f"{self.run_id}.crashes", "a", encoding="utf-8") as out:
                out.write(f"{self.attempt} {os.getpid()}\n")
        os._exit(1)


@flow("poison")
def poison_flow() -> Flow:
    """Increment -> Crash -> Increment."""
    first, crash = Increment(name="before"), Crash()
    first.then("default", crash)
    crash.then("default", Increment(name="after"))
    return Flow(start=first)


HANG_S = 3.0


class HangsOnce(Node):
    """exec hangs past its timeout on try 1 (then writes "late" to a side file), and
    answers at once on try 2."""

    timeout = 0.5
    max_retries = 2

    def prep(self, store: Any) -> Any:
        return store["side_dir"]

    def exec(self, side_dir: str) -> str:
        if self.attempt == 1:
            time.sleep(HANG_S)
            Path(side_dir, f"{self.run_id}.late").write_text(str(os.getpid()))
            return "late"
        return "on time"

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["answer"] = exec_result
        store["answered_by_attempt"] = self.attempt
        return "default"


@flow("hangs_once")
def hangs_once_flow() -> Flow:
    return Flow(start=HangsOnce())
