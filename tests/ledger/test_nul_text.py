"""Text with a NUL byte (``\\x00``) reaching the ledger: PostgreSQL's text columns refuse
it, SQLite keeps it. A node's own error message is user text, so a NUL in it must fail
the run by the node's retry policy, not count as a crash of the executor (the review's
defect 1): the ledger's text encoding escapes NUL on PostgreSQL, for every column."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import DataError

from pocoflow import Flow, Node, flow
from pocoflow.distributed import lifecycle
from pocoflow.distributed.executor import WorkerContext
from tests.ledger import test_distributed_executor as protocol
from tests.ledger.test_distributed_executor import Publish, drain, start

pytestmark = pytest.mark.ledger
publish, ctx = protocol.publish, protocol.ctx

#: What a NUL byte is stored as on each ledger.
STORED_NUL = {"sqlite": "\x00", "postgresql": "\\x00"}
CALLS: list[int] = []


class RaisesNul(Node):
    max_retries = 2

    def exec(self, prep_result: Any) -> None:
        CALLS.append(self.attempt)
        raise ValueError("bad\x00byte")


@flow("exec_raises_nul")
def raises_nul() -> Flow:
    return Flow(start=RaisesNul(name="nul"))


def test_a_node_error_with_a_nul_byte_fails_the_run_by_its_retry_policy(
    db: Any, ctx: WorkerContext, publish: Publish
) -> None:
    CALLS.clear()
    first = start(db, "exec_raises_nul")
    assert drain(ctx, publish, first) == ["retry", "failed"]
    assert len(CALLS) == 2  # max_retries=2: two tries, no crash re-sends
    nul = STORED_NUL[db.dialect]
    run = db.get_run(first.run_id)
    assert run["status"] == "failed"
    assert run["error_msg"] == f"ValueError: bad{nul}byte"
    rows = [(a["outcome"], a["error_msg"]) for a in db.get_attempts(first.run_id)]
    assert rows == [("retry", f"ValueError: bad{nul}byte"), ("failed", f"ValueError: bad{nul}byte")]
    errors = [e for e in db.get_events(first.run_id) if e["event"] == "node_error"]
    assert errors and all(nul in e["error_msg"] for e in errors)


class RaisesOnce(Node):
    def exec(self, prep_result: Any) -> None:
        raise ValueError("caf\u00e9 \x01 broke")


@flow("exec_raises_once")
def raises_once() -> Flow:
    return Flow(start=RaisesOnce(name="once"))


def test_a_node_failure_the_ledger_refuses_to_record_still_fails_the_run_as_the_nodes(
    db: Any, ctx: WorkerContext, publish: Publish, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recording a node's failure meets a non-transient ledger error (as the NUL byte did
    on PostgreSQL): the run fails at once with the cause cleaned, and no crash is
    counted (which ran the node again and blamed the executor)."""
    real = lifecycle.fail_run

    def refuses_raw_text(db: Any, run_id: str, error_msg: str, **kw: Any) -> bool:
        if "\u00e9" in error_msg:
            raise DataError("INSERT", {}, Exception("text refused"))
        return real(db, run_id, error_msg, **kw)

    monkeypatch.setattr(lifecycle, "fail_run", refuses_raw_text)
    first = start(db, "exec_raises_once")
    assert drain(ctx, publish, first) == ["failed"]
    run = db.get_run(first.run_id)
    assert run["status"] == "failed"
    assert run["error_msg"].startswith("ValueError: caf\\xe9 \\x01 broke"), run["error_msg"]
    assert "DataError" in run["error_msg"]
    assert [a["outcome"] for a in db.get_attempts(first.run_id)] == ["failed"]


def test_every_text_the_ledger_writes_may_hold_a_nul(db: Any) -> None:
    """Not only a node's error: a model name given to ``report_usage``, an event's text,
    a run's ``error_msg`` (written through SQLAlchemy or the batch pipeline alike)."""
    from pocoflow.ledger.tables import pf_usage
    from pocoflow.usage import UsageReport

    nul = STORED_NUL[db.dialect]
    db.create_run("r\x00", "f")
    db.add_usage(UsageReport("r\x00", 0, 1, "n\x00de", None, "gpt\x00", 1, 1, None))
    db.save_event("r\x00", "node_error", step=0, error_msg="bad\x00text")
    db.update_run("r\x00", status="failed", error_msg="why\x00not")
    run = db.get_run("r\x00")  # read back by the same id: escaped both ways
    assert run["error_msg"] == f"why{nul}not"
    assert [e["error_msg"] for e in db.get_events("r\x00")] == [f"bad{nul}text"]
    models = db._read(lambda conn: list(conn.execute(pf_usage.select()).mappings()))
    assert [(m["model"], m["node_name"]) for m in models] == [(f"gpt{nul}", f"n{nul}de")]
