"""The scriptable CLI on both ledgers: ``runs`` filters and ``--json``, ``show --json``."""

from __future__ import annotations

import json
from typing import Any

from click.testing import CliRunner
from sqlalchemy import update

from pocoflow import Flow, Node
from pocoflow.cli import main as cli
from pocoflow.db import WorkflowDB
from pocoflow.ledger.tables import pf_runs


class Hello(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["greeting"] = "hi"
        return "default"


class Broken(Node):
    def exec(self, prep_result: Any) -> Any:
        raise ValueError("no luck")


def run_json(*args: str) -> Any:
    done = CliRunner().invoke(cli, [*args])
    assert done.exit_code == 0, done.output
    return json.loads(done.output)


def test_runs_filters_by_status_flow_and_age_and_prints_json(ledger_url: str) -> None:
    ok = Flow(Hello(), db_path=ledger_url, flow_name="hello")
    ok.run({})
    ok.run({})
    broken = Flow(Broken(), db_path=ledger_url, flow_name="broken")
    try:
        broken.run({})
    except ValueError:
        pass
    old = ok.last_run_id
    with WorkflowDB(ledger_url)._ledger.engine.begin() as conn:  # a run from long ago
        conn.execute(
            update(pf_runs)
            .where(pf_runs.c.run_id == old)
            .values(started_at="2020-01-01T00:00:00+00:00")
        )

    every = run_json("runs", "--json", "--db", ledger_url)
    assert len(every) == 3 and {"run_id", "status", "tokens", "cost_usd"} <= set(every[0])
    failed = run_json("runs", "--status", "failed", "--json", "--db", ledger_url)
    assert [r["run_id"] for r in failed] == [broken.last_run_id]
    assert "no luck" in failed[0]["error_msg"]
    hellos = run_json("runs", "--flow", "hello", "--json", "--db", ledger_url)
    assert {r["flow_name"] for r in hellos} == {"hello"} and len(hellos) == 2
    recent = run_json("runs", "--since", "1h", "--flow", "hello", "--json", "--db", ledger_url)
    assert [r["run_id"] for r in recent] != [] and old not in [r["run_id"] for r in recent]
    both = run_json(
        "runs", "--status", "completed,failed", "--limit", "2", "--json", "--db", ledger_url
    )
    assert len(both) == 2


def test_runs_refuses_an_unknown_status_and_a_bad_age(ledger_url: str) -> None:
    bad = CliRunner().invoke(cli, ["runs", "--status", "done", "--db", ledger_url])
    assert bad.exit_code == 2 and "unknown run status 'done'" in bad.output
    bad = CliRunner().invoke(cli, ["runs", "--since", "soon", "--db", ledger_url])
    assert bad.exit_code == 2 and "--since" in bad.output


def test_show_json_carries_the_run_its_events_usage_and_store(ledger_url: str) -> None:
    flow = Flow(Hello(), db_path=ledger_url, flow_name="hello")
    flow.run({"name": "Ada"})
    shown = run_json("show", flow.last_run_id, "--json", "--db", ledger_url)
    assert shown["run"]["status"] == "completed" and shown["run"]["run_id"] == flow.last_run_id
    assert [e["event"] for e in shown["events"]][-1] == "flow_end"
    assert shown["store"] == {"name": "Ada", "greeting": "hi"} and shown["store_step"] == 0
    assert shown["usage"]["calls"] == 0 and shown["signals"] == []


def test_the_wait_progress_shows_a_fan_outs_items(ledger_url: str) -> None:
    from sqlalchemy import insert

    from pocoflow.cli import items_progress
    from pocoflow.ledger.tables import pf_joins, pf_steps

    db = WorkflowDB(ledger_url)
    db.create_run("map-1", "map")
    assert items_progress(db, "map-1", 0) == ""  # not a fan-out
    with db._ledger.engine.begin() as conn:
        conn.execute(
            insert(pf_steps),
            {"run_id": "map-1", "step": 0, "node_id": "Each", "queued_at": 0, "created_at": 0},
        )
        conn.execute(insert(pf_joins), {"run_id": "map-1", "step": 0, "total": 40, "done": 10,
                                        "created_at": 0})  # fmt: skip
    assert items_progress(db, "map-1", 0) == f", items [{'#' * 5:<20}] 10/40"
