"""The monitor on runs of real workers: its controls pause, resume, cancel and fork them
through Redis, the ledger and the broker, and its pages show their graph, attempts,
workers and a fork's diff against its parent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pocoflow.ui.actions import TOKEN_ENV
from tests.distributed.conftest import Cluster
from tests.helpers import wait_until

pytestmark = pytest.mark.distributed

TIMEOUT_S = 60.0
TOKEN = "monitor-token"


def app(location, allow_control=False):
    from pocoflow.ui.monitor import render_workflow_monitor

    render_workflow_monitor(location, allow_control=allow_control)


@pytest.fixture
def monitor_env(live: Cluster, monkeypatch):
    """The monitor's process as `pocoflow monitor --allow-control` would run beside the
    workers: their broker and Redis in its environment, a control token set."""
    monkeypatch.setenv("POCOFLOW_BROKER_URL", live.settings.broker_url)
    monkeypatch.setenv("POCOFLOW_REDIS_URL", live.settings.redis_url)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return live


def page(live: Cluster, **params) -> AppTest:
    at = AppTest.from_function(app, args=(live.settings.db_url, True), default_timeout=30)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def apply(at: AppTest, run_id: str, action: str) -> None:
    at.selectbox(key=f"ctl-action-{run_id}").set_value(action)
    at.text_input(key=f"ctl-token-{run_id}").set_value(TOKEN)
    # A fresh tick for this action: a tick confirms only the action it named.
    at.checkbox(key=f"ctl-confirm-{run_id}").uncheck().run()
    at.checkbox(key=f"ctl-confirm-{run_id}").check()
    at.button(key=f"ctl-go-{run_id}").click().run()
    assert not at.exception and not at.error, at.error
    assert f"{action} requested" in " ".join(s.value for s in at.success)


def status(live: Cluster, run_id: str) -> str:
    return live.db.get_run(run_id)["status"]


def test_pause_and_resume_a_run_on_workers_from_the_monitor(monitor_env: Cluster) -> None:
    live = monitor_env
    side = live.side_dir()
    handle = live.submit("hold", {"count": 0, "side_dir": str(side)})
    run_id = handle.run_id
    wait_until(lambda: any(Path(side).glob(f"{run_id}.*.pid")), TIMEOUT_S)
    at = page(live, run=run_id)
    (chart,) = at.get("graphviz_chart")
    assert (
        '"before" -> "Hold"' in chart.proto.spec
        and '"Hold" [label="Hold", fillcolor="#ffd54f"]' in chart.proto.spec
    )
    apply(at, run_id, "pause")
    (Path(side) / f"{run_id}.release").touch()
    wait_until(lambda: status(live, run_id) == "paused", TIMEOUT_S)
    assert live.db.latest_checkpoint(run_id)["step"] == 1  # "after" held back
    apply(at, run_id, "resume")
    wait_until(lambda: status(live, run_id) == "completed", TIMEOUT_S)
    at.run()
    attempts = next(d.value for d in at.dataframe if "outcome" in d.value.columns)
    assert set(attempts["outcome"]) == {"committed"} and attempts["worker"].notna().all()


def test_cancel_a_run_on_workers_from_the_monitor(monitor_env: Cluster) -> None:
    live = monitor_env
    handle = live.submit("slow_chain", {"slow_s": 0.5})
    run_id = handle.run_id
    wait_until(lambda: status(live, run_id) == "running", TIMEOUT_S)
    apply(page(live, run=run_id), run_id, "cancel")
    wait_until(lambda: status(live, run_id) == "cancelled", TIMEOUT_S)
    assert live.db.count_committed(run_id) < 8


def test_workers_page_lists_the_live_workers(monitor_env: Cluster) -> None:
    live = monitor_env
    live.submit("counter", {"count": 0}).wait(TIMEOUT_S)
    at = page(live, view="workers")
    workers = at.dataframe[0].value
    assert len(workers) >= 2 and not workers["stale"].head(2).any()
    assert workers["last_step"].notna().any()


def test_fork_from_the_monitor_runs_on_the_workers_and_diffs_against_its_parent(
    monitor_env: Cluster,
) -> None:
    live = monitor_env
    parent = live.submit("counter", {"count": 0})
    full = parent.wait(timeout=TIMEOUT_S).as_dict()
    run_id = parent.run_id
    at = page(live, run=run_id)
    at.selectbox(key=f"ctl-action-{run_id}").set_value("fork").run()
    at.number_input(key=f"ctl-step-{run_id}").set_value(1)
    at.text_input(key=f"ctl-token-{run_id}").set_value(TOKEN)
    at.checkbox(key=f"ctl-confirm-{run_id}").uncheck().run()
    at.checkbox(key=f"ctl-confirm-{run_id}").check()
    at.button(key=f"ctl-go-{run_id}").click().run()
    assert not at.exception and not at.error, at.error
    done = " ".join(s.value for s in at.success).replace("\\", "")
    fork_id = re.search(r"forked from step 1 as (counter-[0-9a-f]{8})", done).group(1)
    wait_until(lambda: status(live, fork_id) == "completed", TIMEOUT_S)
    assert live.db.load_checkpoint(fork_id, 19).as_dict() == full
    assert {a["step"] for a in live.db.get_attempts(fork_id)} == set(range(2, 20))

    at.button(key=f"ctl-open-fork-{fork_id}").click().run()
    assert at.query_params["run"] == fork_id
    radio = at.radio(key=f"diff-src-{fork_id}")
    radio.set_value(radio.options[1]).run()
    caption = " ".join(c.value for c in at.caption).replace("\\", "")
    assert f"parent {run_id} at step 1 -> this run at step 19: 2 keys differ" in caption
    diff = next(d.value for d in at.dataframe if "change" in d.value.columns)
    assert sorted(diff["key"]) == ["count", "trail"] and set(diff["change"]) == {"changed"}
