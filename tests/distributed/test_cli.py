"""The distributed commands of the CLI against real workers: submit, pause, resume, cancel,
fork."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pocoflow.devcluster import free_port
from tests.distributed.conftest import Cluster
from tests.distributed.faults import REPO_ROOT
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60.0


def cli(live: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCOFLOW_")}
    env.update(
        POCOFLOW_DB_URL=live.settings.db_url,
        POCOFLOW_BROKER_URL=live.settings.broker_url,
        POCOFLOW_FLOWS="tests.distributed.flows",
        PYTHONPATH=str(REPO_ROOT),
    )
    return subprocess.run(
        [sys.executable, "-m", "pocoflow.cli", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip


def test_submit_waits_and_prints_the_final_store(live: Cluster) -> None:
    done = cli(live, "submit", "counter", "--store", '{"count": 0}', "--wait")
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.splitlines()[0]
    assert re.fullmatch(r"counter-[0-9a-f]{8}", run_id)
    assert json.loads(done.stdout.split("completed\n", 1)[1])["count"] == 20
    assert live.db.get_run(run_id)["status"] == "completed"


def test_submit_of_an_unknown_flow_is_bad_input(live: Cluster) -> None:
    refused = cli(live, "submit", "no-such-flow", "--store", "{}")
    assert refused.returncode == 2 and "'no-such-flow' is not registered" in refused.stderr


def test_pause_resume_and_cancel_from_the_command_line(live: Cluster) -> None:
    side = live.side_dir()
    submitted = cli(
        live, "submit", "hold", "--store", json.dumps({"count": 0, "side_dir": str(side)})
    )
    run_id = submitted.stdout.strip()
    wait_until(lambda: any(Path(side).glob(f"{run_id}.*.pid")), TIMEOUT_S)
    assert cli(live, "pause", run_id).returncode == 0
    (Path(side) / f"{run_id}.release").touch()
    wait_until(lambda: live.db.get_run(run_id)["status"] == "paused", TIMEOUT_S)
    assert live.db.latest_checkpoint(run_id)["step"] == 1  # "after" is held back

    resumed = cli(live, "resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert live.db.get_run(run_id)["status"] == "completed"
    assert cli(live, "cancel", run_id).returncode == 0  # finished: nothing to cancel
    assert live.db.get_run(run_id)["status"] == "completed"
    assert cli(live, "cancel", "counter-00000000").returncode == 2


def test_fork_onto_the_workers_from_the_command_line(live: Cluster) -> None:
    from pocoflow.registry import build_flow

    parent = live.submit("counter", {"count": 0})
    parent.wait(timeout=TIMEOUT_S)
    forked = cli(live, "fork", parent.run_id, "--from-step", "1", "--wait")
    assert forked.returncode == 0, forked.stderr
    fork_id = forked.stdout.splitlines()[0]
    assert re.fullmatch(r"counter-[0-9a-f]{8}", fork_id) and fork_id != parent.run_id
    assert forked.stdout.splitlines()[1] == f"run {fork_id}: completed"
    assert json.loads(forked.stdout.split("completed\n", 1)[1])["count"] == 20
    fork = live.db.get_run(fork_id)
    assert (fork["parent_run_id"], fork["forked_from_step"]) == (parent.run_id, 1)
    assert {a["step"] for a in live.db.get_attempts(fork_id)} == set(range(2, 20))  # workers'

    local = build_flow("counter")  # a run of this process: --workers sends its fork there
    local.db_path = live.settings.db_url
    local.run({"count": 50})
    onto = cli(live, "fork", local.last_run_id, "--from-step", "0", "--workers", "--run-id", "f-1")
    assert onto.returncode == 0 and onto.stdout.strip() == "f-1", onto.stderr
    assert live.db.get_run("f-1")["queue"] == "pocoflow"
    wait_until(lambda: live.db.get_run("f-1")["status"] == "completed", TIMEOUT_S)
    assert live.db.load_checkpoint("f-1", 19)["count"] == 70

    here = cli(live, "fork", parent.run_id, "--from-step", "17", "--local")  # as before
    assert here.returncode == 0 and '"count": 20' in here.stdout, here.stderr
    here_id = re.search(r"run (counter-[0-9a-f]{8}): completed", here.stdout).group(1)
    assert live.db.get_run(here_id)["queue"] is None and not live.db.get_attempts(here_id)

    last = cli(live, "fork", parent.run_id, "--from-step", "19")
    assert last.returncode == 2 and "step 19 was its last step" in last.stderr
    flow_given = cli(live, "fork", parent.run_id, "--from-step", "1", "--flow", "m:b", "--workers")
    assert flow_given.returncode == 2 and "--local" in flow_given.stderr


def test_flower_serves_the_workers(live: Cluster) -> None:
    port = free_port()
    env = {**os.environ, "POCOFLOW_BROKER_URL": live.settings.broker_url}
    flower = subprocess.Popen(
        [sys.executable, "-m", "pocoflow.cli", "flower", "--port", str(port)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def page() -> bytes | None:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            except OSError:
                return None

        assert b"Flower" in wait_until(page, TIMEOUT_S, interval=0.2)
    finally:
        flower.terminate()
        flower.wait(10)


def test_doctor_says_each_part_is_fine_and_lists_the_live_workers(live: Cluster) -> None:
    done = cli(live, "doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(ln.startswith("ok") and "ledger" in ln and "(current)" in ln for ln in lines)
    assert any(ln.startswith("ok") and "broker" in ln and "reachable" in ln for ln in lines)
    assert any(ln.startswith("ok") and "redis" in ln and "PING" in ln for ln in lines)
    assert any("live worker process" in ln for ln in lines), lines


def test_doctor_names_an_unreachable_broker_and_submit_refuses_it(live: Cluster) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env_broker = ("--broker", dead)
    checked = cli(live, "doctor", *env_broker)
    assert checked.returncode == 1
    line = next(ln for ln in checked.stdout.splitlines() if "broker" in ln)
    assert line.startswith("FAIL") and "cannot be reached" in line and dead in line
    before = {r["run_id"] for r in live.db.list_runs(limit=1000)}
    refused = cli(live, "submit", "counter", "--store", '{"count": 0}', *env_broker)
    assert refused.returncode == 2 and "cannot be reached" in refused.stderr
    assert "nothing was submitted" in refused.stderr
    parent = live.submit("counter", {"count": 0})
    parent.wait(timeout=TIMEOUT_S)
    before.add(parent.run_id)
    no_fork = cli(live, "fork", parent.run_id, "--from-step", "1", *env_broker)
    assert no_fork.returncode == 2 and "no fork was recorded" in no_fork.stderr
    assert {r["run_id"] for r in live.db.list_runs(limit=1000)} == before  # no run recorded


def test_completion_scripts_for_each_shell(live: Cluster) -> None:
    for shell in ("bash", "zsh", "fish"):
        done = cli(live, "completion", shell)
        assert done.returncode == 0 and "_POCOFLOW_COMPLETE" in done.stdout, shell
    offered = subprocess.run(
        [sys.executable, "-m", "pocoflow.cli"],
        env={**os.environ, "_POCOFLOW_COMPLETE": "bash_complete", "COMP_WORDS": "pocoflow ru",
             "COMP_CWORD": "1", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert "run" in offered.stdout and "runs" in offered.stdout
