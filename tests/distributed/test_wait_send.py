"""Human in the loop with real workers (issue 7): a run that waits holds no worker, a send
wakes it on any worker, across a restart of every worker; double sends and the CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pocoflow.distributed import client
from pocoflow.errors import SendRefused
from tests.distributed import wait_flows  # noqa: F401  (registers the flows here too)
from tests.distributed.conftest import Cluster
from tests.distributed.faults import FLOWS_MODULE
from tests.distributed.test_cli import cli
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

WAIT_FLOWS = "tests.distributed.wait_flows"
WORKER_ENV = {"POCOFLOW_FLOWS": f"{FLOWS_MODULE},{WAIT_FLOWS}"}
TIMEOUT_S = 60.0


def status_is(live: Cluster, run_id: str, status: str) -> Any:
    return lambda: live.db.get_run(run_id)["status"] == status


def held_by_nobody(live: Cluster, run_id: str) -> bool:
    """No attempt of the run is running and its waiting step has no holder, no lease."""
    attempts = live.db.get_attempts(run_id)
    step = live.db.get_step(run_id, 1)
    return (
        all(a["ended_at"] is not None for a in attempts)
        and step["status"] == "queued"
        and step["lease_owner"] is None
        and step["lease_expires_at"] is None
    )


SENTINEL = "pocoflow:broker-sentinel"


def parked_or_refused(live: Cluster) -> int:
    """Step deliveries the workers ended as ``waiting`` or ``duplicate`` so far (one "Task
    pocoflow.step[...] succeeded ...: 'waiting'" log line each): what a copy of a parked
    step's message ends as, whose refused claim writes no ledger row. Waits first for the
    broker sentinel: a fresh broker's first sweep may take it for a lost one and send
    queued steps again."""
    import redis

    broker = redis.Redis.from_url(live.settings.broker_url)
    wait_until(lambda: broker.exists(SENTINEL), TIMEOUT_S, interval=0.2)
    logs = "".join(worker.log() for worker in live.workers)  # whole: live.logs() is cut
    return logs.count("s: 'waiting'") + logs.count("s: 'duplicate'")


def test_a_run_waits_holding_no_worker_and_a_send_completes_it(live: Cluster) -> None:
    tasks = parked_or_refused(live) + 1  # the delivery that parks
    handle = live.submit("wait_approval", {"topic": "tides"})
    wait_until(status_is(live, handle.run_id, "waiting"), TIMEOUT_S)
    assert handle.status == "waiting"
    assert held_by_nobody(live, handle.run_id)
    wait_until(lambda: parked_or_refused(live) >= tasks, TIMEOUT_S)
    # Still waiting after several sweeps and lease periods: nothing re-runs it, nor even
    # sends it again (a copy's refused claim would write no attempt: the log counts it).
    before = len(live.db.get_attempts(handle.run_id))
    sweeps = live.db.clock() + 3.0
    wait_until(lambda: live.db.clock() > sweeps, TIMEOUT_S, interval=0.2)
    assert handle.status == "waiting" and len(live.db.get_attempts(handle.run_id)) == before
    assert parked_or_refused(live) == tasks

    handle.send("approval", {"ok": True, "by": "ada"})
    store = handle.wait(timeout=TIMEOUT_S)
    assert store["approval"] == {"ok": True, "by": "ada"} and store["outcome"] == "shipped"
    assert store["preps"] == 1  # the node ran again from prep on the Store before it
    with pytest.raises(SendRefused, match=f"Run '{handle.run_id}' is completed"):
        handle.send("approval", {"ok": False})


def test_wait_and_send_across_a_restart_of_every_worker(live: Cluster) -> None:
    handle = live.submit("wait_approval", {"topic": "eels"})
    wait_until(status_is(live, handle.run_id, "waiting"), TIMEOUT_S)
    live.stop()  # kill -9 every worker while the run waits
    assert held_by_nobody(live, handle.run_id)
    client.send(handle.run_id, "approval", {"ok": True}, settings=live.settings)
    with pytest.raises(SendRefused, match=f"Run '{handle.run_id}' already has a value"):
        client.send(handle.run_id, "approval", {"ok": False}, settings=live.settings)
    live.ensure_workers(2)  # brand-new processes: the value and the step are in the ledger
    store = handle.wait(timeout=TIMEOUT_S)
    assert store["approval"] == {"ok": True} and store["outcome"] == "shipped"


def test_a_wait_that_times_out_follows_the_node(live: Cluster) -> None:
    handle = live.submit("wait_quick_timeout", {"topic": "fog"})
    store = handle.wait(timeout=TIMEOUT_S)  # the sweeper wakes it after 1 s
    assert store["approval"] == {"ok": False, "note": "timed out"}
    assert store["outcome"] == "dropped"
    events = [e["event"] for e in handle.events()]
    assert "run_waiting" in events and "wait_timed_out" in events


def test_send_from_the_command_line(live: Cluster) -> None:
    unknown = cli(live, "send", "wait_approval-nope", "approval", "true")
    assert unknown.returncode == 2 and "'wait_approval-nope'" in unknown.stderr
    handle = live.submit("wait_approval", {"topic": "kelp"})
    wait_until(status_is(live, handle.run_id, "waiting"), TIMEOUT_S)
    bad = cli(live, "send", handle.run_id, "approval", "{ok:")
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    # A key nobody waits on yet is kept (the run waits on), and takes one value only.
    note = cli(live, "send", handle.run_id, "note", '"later"')
    assert note.returncode == 0 and "the run is waiting" in note.stdout, note.stderr
    again = cli(live, "send", handle.run_id, "note", '"again"')
    assert again.returncode == 2 and "already has a value for 'note'" in again.stderr
    sent = cli(live, "send", handle.run_id, "approval", json.dumps({"ok": False}))
    assert sent.returncode == 0, sent.stderr
    assert f"run {handle.run_id}: value sent for 'approval'" in sent.stdout
    assert handle.wait(timeout=TIMEOUT_S)["outcome"] == "dropped"
    late = cli(live, "send", handle.run_id, "approval", "true")
    assert late.returncode == 2 and f"Run '{handle.run_id}' is completed" in late.stderr
    shown = cli(live, "show", handle.run_id)
    assert "signal 'approval': sent" in shown.stdout


def test_submit_wait_stops_following_a_run_that_waits(live: Cluster) -> None:
    """`pocoflow submit --wait` followed a waiting run for ever; it now says what the
    run waits for and how to send it."""
    store = json.dumps({"topic": "coves"})
    done = cli(live, "submit", "wait_approval", "--store", store, "--wait", "--flows", WAIT_FLOWS)
    assert done.returncode == 0, done.stderr
    assert ": waiting" in done.stdout and "waits for 'approval'" in done.stderr
    run_id = done.stdout.split("run ", 1)[1].split(":", 1)[0]
    client.send(run_id, "approval", {"ok": True}, settings=live.settings)
    assert client.attach(run_id, settings=live.settings).wait(timeout=TIMEOUT_S)["outcome"] == (
        "shipped"
    )


def test_a_waiting_run_is_cancelled_and_resumed(live: Cluster) -> None:
    handle = live.submit("wait_approval", {"topic": "reefs"})
    wait_until(status_is(live, handle.run_id, "waiting"), TIMEOUT_S)
    handle.cancel()
    assert handle.status == "cancelled"
    with pytest.raises(SendRefused, match="is cancelled"):
        handle.send("approval", {"ok": True})
    resumed = client.resume_run(handle.run_id, settings=live.settings)
    wait_until(status_is(live, handle.run_id, "waiting"), TIMEOUT_S)  # it asks again
    resumed.send("approval", {"ok": True})
    assert resumed.wait(timeout=TIMEOUT_S)["outcome"] == "shipped"


def test_a_pause_of_a_waiting_run_holds_it_after_the_send(live: Cluster) -> None:
    """pause() of a waiting run was silently dropped (only queued/running runs took the
    request): after the send the run went on to its end. Now the request stands: the
    woken step meets it and the run pauses before its node, until resume()."""
    handle = live.submit("wait_approval", {"topic": "dunes"})
    wait_until(status_is(live, handle.run_id, "waiting"), TIMEOUT_S)
    handle.pause()
    assert live.db.get_run(handle.run_id)["control"] == "pause"
    handle.send("approval", {"ok": True})
    wait_until(status_is(live, handle.run_id, "paused"), TIMEOUT_S)
    assert live.db.latest_checkpoint(handle.run_id)["step"] == 0  # Draft only
    handle.resume()
    assert handle.wait(timeout=TIMEOUT_S)["outcome"] == "shipped"


def test_a_pause_of_a_waiting_run_can_be_withdrawn_from_the_cli(live: Cluster) -> None:
    handle = live.submit("wait_approval", {"topic": "capes"})
    wait_until(status_is(live, handle.run_id, "waiting"), TIMEOUT_S)
    handle.pause()
    withdrawn = cli(live, "resume", handle.run_id)
    assert withdrawn.returncode == 0 and "pause withdrawn" in withdrawn.stdout, withdrawn.stderr
    handle.send("approval", {"ok": True})
    assert handle.wait(timeout=TIMEOUT_S)["outcome"] == "shipped"


def test_a_broker_loss_while_a_run_waits_resends_nothing_and_a_send_completes_it(
    live: Cluster,
) -> None:
    """The sweeper's bulk re-send after a broker loss (FLUSHDB: the sentinel is gone)
    leaves a parked step alone: it has no message to lose; the send wakes it."""
    import redis

    broker = redis.Redis.from_url(live.settings.broker_url)
    tasks = parked_or_refused(live) + 1  # the delivery that parks
    handle = live.submit("wait_approval", {"topic": "atolls"})
    wait_until(status_is(live, handle.run_id, "waiting"), TIMEOUT_S)
    wait_until(lambda: parked_or_refused(live) >= tasks, TIMEOUT_S)
    before = len(live.db.get_attempts(handle.run_id))
    broker.flushdb()  # the broker loses every message (a restart without persistence)
    # The sentinel is set again once a sweeper has handled the loss.
    wait_until(lambda: broker.exists(SENTINEL), TIMEOUT_S, interval=0.2)
    sweeps = live.db.clock() + 2.0
    wait_until(lambda: live.db.clock() > sweeps, TIMEOUT_S, interval=0.2)
    assert handle.status == "waiting" and held_by_nobody(live, handle.run_id)
    assert len(live.db.get_attempts(handle.run_id)) == before
    assert parked_or_refused(live) == tasks  # a re-sent copy of the parked step would add one
    handle.send("approval", {"ok": True})
    assert handle.wait(timeout=TIMEOUT_S)["outcome"] == "shipped"
