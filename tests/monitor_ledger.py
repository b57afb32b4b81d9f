"""A small ledger for the monitor's tests: real local runs plus the rows only workers write.

``fill(url)`` writes, through the public API where there is one:

- ``alpha-1`` (flow ``alpha``): completed, nodes Ask -> Note, usage reported, a graph shape;
- ``beta-1`` (flow ``beta``): failed in Boom with an error holding Markdown and HTML;
- ``gamma-1`` (flow ``alpha``): a fork of ``alpha-1`` from step 0;
- ``live-1`` (flow ``beta``): running, nothing committed (a stuck run);
- ``many-<i>``: ``extra`` more completed runs of flow ``bulk`` for paging;
- a worker ``w-1`` with attempts of ``alpha-1``'s steps (one failed, one committed).
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import insert

from pocoflow import Flow, Node
from pocoflow.db import WorkflowDB
from pocoflow.ledger.liveness import record_beat
from pocoflow.ledger.tables import pf_attempts

NASTY = "**bold** [link](http://evil.example) <script>alert(1)</script>"


class Ask(Node):
    def exec(self, prep_result: Any) -> str:
        self.report_usage(model="m-large", input_tokens=100, output_tokens=20, cost_usd=0.5)
        self.report_usage(model="m-small", input_tokens=10, output_tokens=2, cost_usd=0.01)
        return "answer"

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["answer"] = exec_result
        store["count"] = 1
        return "default"


class Note(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["note"] = NASTY
        store["count"] = 2
        del store["topic"]
        return "default"


class Boom(Node):
    def exec(self, prep_result: Any) -> None:
        raise RuntimeError(NASTY)


def alpha(url: str | None, run_id: str | None = "alpha-1") -> Flow:
    ask = Ask()
    ask.then("default", Note())
    return Flow(ask, db_path=url, run_id=run_id, flow_name="alpha")


def fill(url: str, extra: int = 0) -> WorkflowDB:
    db = WorkflowDB(url)
    flow = alpha(url)
    flow.run({"topic": "ledgers"})
    db.update_run("alpha-1", graph_shape=json.dumps(flow.graph().shape()))
    try:
        Flow(Boom(), db_path=url, run_id="beta-1", flow_name="beta").run({"topic": "x"})
    except RuntimeError:
        pass
    db.create_run(
        "gamma-1",
        "alpha",
        status="completed",
        initial_store=db.load_checkpoint("alpha-1", 0),
        initial_step=0,
        parent_run_id="alpha-1",
        forked_from_step=0,
    )
    db.create_run("live-1", "beta", initial_store={"topic": "stuck"})
    for i in range(extra):
        db.create_run(f"many-{i:03d}", "bulk", status="completed")
    now = time.time()
    record_beat(db, "w-1", "host-a", 1234)
    db._write(
        lambda conn: conn.execute(
            insert(pf_attempts),
            [
                {
                    "run_id": "alpha-1",
                    "step": 0,
                    "attempt": 1,
                    "worker": "w-1",
                    "started_at": now,
                    "ended_at": now + 0.5,
                    "outcome": "failed",
                    "error_msg": "provider hiccup",
                },
                {
                    "run_id": "alpha-1",
                    "step": 0,
                    "attempt": 2,
                    "worker": "w-1",
                    "started_at": now + 1,
                    "ended_at": now + 1.25,
                    "outcome": "committed",
                    "error_msg": None,
                },
            ],
        ),
        "adding attempts",
        "alpha-1",
    )
    return db
