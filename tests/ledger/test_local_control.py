"""An in-process run with a ledger checks for cancel/pause requests before every node (G4)
from the value its previous step's commit read, not from a read transaction per node: the
local step's cost (bench/ledger_overhead.py) without weakening the check."""

from __future__ import annotations

import pytest

from pocoflow import Flow
from pocoflow.db import WorkflowDB
from tests.ledger.test_flow_runs import Count, counter_flow

pytestmark = pytest.mark.ledger


def test_a_local_run_reads_cancel_and_pause_requests_in_its_commits(ledger_url, monkeypatch):
    """The request is checked before every node (G4), but after the first node it comes
    with the previous step's commit: no read transaction of its own per node."""
    from pocoflow import attach

    reads = []
    real = WorkflowDB.get_control
    monkeypatch.setattr(
        WorkflowDB, "get_control", lambda self, run_id: reads.append(run_id) or real(self, run_id)
    )
    flow = counter_flow(ledger_url)
    flow.run({"n": 0, "until": 5})
    assert reads == [flow.last_run_id]  # before the first node only

    class CancelledByAnother(Count):
        def exec(self, n):  # as `pocoflow cancel` from another process would, mid-node
            if n == 2:
                attach(self.run_id, db_url=ledger_url).cancel()
            return super().exec(n)

    node = CancelledByAnother()
    node.then("next", node)
    flow = Flow(start=node, db_path=ledger_url, flow_name="count")
    assert flow.run({"n": 0, "until": 5})["n"] == 3  # step 2 committed, step 3 never ran
    assert WorkflowDB(ledger_url).get_run(flow.last_run_id)["status"] == "cancelled"


def test_a_cancel_from_another_process_while_paused_in_process_stops_the_run(ledger_url):
    """The run is held by its own handle's pause (status ``paused``) when ``pocoflow
    cancel`` lands (status ``cancelled``); the handle's resume must not set it running
    again and run the next node (G4): the cancel stands and the run ends there."""
    import threading

    from pocoflow import attach
    from tests.helpers import wait_until

    reached, go = threading.Event(), threading.Event()

    class Gate(Count):
        def exec(self, n):
            if n == 1:
                reached.set()
                assert go.wait(10)
            return super().exec(n)

    node = Gate()
    node.then("next", node)
    flow = Flow(start=node, db_path=ledger_url, flow_name="count")
    handle = flow.run_background({"n": 0, "until": 5})
    assert reached.wait(10)
    handle.pause()  # in-process: hold before the next node
    go.set()
    db = WorkflowDB(ledger_url)
    wait_until(lambda: db.get_run(handle.run_id)["status"] == "paused", 10)
    attach(handle.run_id, db_url=ledger_url).cancel()  # as from another process
    handle.resume()
    store = handle.wait(timeout=10)
    assert db.get_run(handle.run_id)["status"] == "cancelled"
    assert store["n"] == 2  # steps 0 and 1 committed, step 2 never ran
    assert db.latest_checkpoint(handle.run_id)["step"] == 1
