"""The Streamlit monitor page by page with ``streamlit.testing.v1.AppTest``, on an SQLite
ledger file written by real local runs (tests/monitor_ledger.py): runs list and its
URL filters, paging, the run page's tabs, workers and stuck runs, live refresh, controls,
bad input and escaping. The queries themselves run on both backends in
tests/ledger/test_monitor_queries.py."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, datetime

import pytest
from sqlalchemy import event
from streamlit.testing.v1 import AppTest

from pocoflow.ui import actions
from pocoflow.ui.actions import ControlRefused
from pocoflow.ui.charts import gantt_bars, gantt_from_events, graph_dot
from pocoflow.ui.text import escape_md
from tests.monitor_ledger import NASTY, fill

TOKEN = "s3cret-token"


def app(location, allow_control=False):
    from pocoflow.ui.monitor import render_workflow_monitor

    render_workflow_monitor(location, allow_control=allow_control)


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("monitor") / "ledger.db"
    fill(str(path), extra=60).close()
    return str(path)


def page(location, allow_control=False, **params):
    at = AppTest.from_function(app, args=(location, allow_control), default_timeout=30)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def run_ids(at):
    return at.dataframe[0].value["run id"].tolist()


def texts(elements):
    return " | ".join(str(e.value) for e in elements)


# ── runs ─────────────────────────────────────────────────────────────────────


def test_runs_page_lists_newest_runs_with_status_badges(ledger_path):
    at = page(ledger_path)
    table = at.dataframe[0].value
    assert list(table.columns) == [
        "run id",
        "flow",
        "status",
        "started",
        "duration",
        "steps",
        "current node",
        "error",
    ]
    assert len(table) == 50  # one page, never the whole table
    assert "64 runs · page 1 of 2" in texts(at.caption)
    assert run_ids(at)[0] == "many-059"
    assert [o.label for o in at.selectbox if o.key == "refresh-runs"] == ["Auto-refresh"]
    assert at.selectbox(key="refresh-runs").options == ["off", "5 s", "10 s", "30 s"]


def test_auto_refresh_choice_is_kept_in_the_url(ledger_path):
    at = page(ledger_path, refresh="10")
    assert at.selectbox(key="refresh-runs").value == "10 s"
    at.selectbox(key="refresh-runs").set_value("30 s").run()
    assert at.query_params["refresh"] == "30"
    at.selectbox(key="refresh-runs").set_value("off").run()
    assert "refresh" not in at.query_params


def test_second_page_comes_from_the_url(ledger_path):
    at = page(ledger_path, page="2")
    assert len(run_ids(at)) == 14 and run_ids(at)[-1] == "alpha-1"
    assert "page 2 of 2" in texts(at.caption)


def test_paging_then_a_new_filter_starts_on_its_first_page(ledger_path):
    at = page(ledger_path)
    at.number_input(key="runs-page").set_value(2).run()
    assert at.query_params["page"] == "2" and run_ids(at)[-1] == "alpha-1"
    at.multiselect[1].set_value(["bulk"]).run()
    assert "page" not in at.query_params
    assert "60 runs · page 1 of 2" in texts(at.caption) and run_ids(at)[0] == "many-059"


def test_filters_are_read_from_and_written_to_the_url(ledger_path):
    at = page(ledger_path, status="failed")
    assert run_ids(at) == ["beta-1"]
    row = at.dataframe[0].value.iloc[0]
    assert row["status"] == "🔴 failed" and row["error"] == NASTY
    at.multiselect[0].set_value(["running", "failed"]).run()
    assert at.query_params["status"] == "running,failed"
    assert sorted(run_ids(at)) == ["beta-1", "live-1"]
    at.multiselect[1].set_value(["beta"]).run()
    at.text_input[0].set_value("live").run()
    assert run_ids(at) == ["live-1"]
    assert at.query_params["flow"] == "beta" and at.query_params["q"] == "live"


def test_a_filter_matching_nothing_says_so(ledger_path):
    at = page(ledger_path, q="no-such-run")
    assert not at.dataframe
    assert "No runs match these filters." in texts(at.info)


def test_open_run_from_the_list(ledger_path):
    at = page(ledger_path, flow="beta")
    at.selectbox(key="open-from-runs").set_value("beta-1")
    at.button(key="open-from-runs-go").click().run()
    assert at.query_params["run"] == "beta-1"
    assert "Run beta\\-1" in texts(at.subheader)


# ── one run ──────────────────────────────────────────────────────────────────


def test_run_page_header_and_tabs(ledger_path):
    at = page(ledger_path, run="alpha-1")
    assert [t.label for t in at.tabs] == [
        "Timeline",
        "Attempts",
        "Store",
        "Diff",
        "Usage",
        "Graph",
        "Resume",
    ]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Status"] == "🟢 completed" and metrics["Steps"] == "2"
    assert metrics["Current node"] == "Note" and metrics["Flow"] == "alpha"
    assert metrics["Calls"] == "2" and metrics["Input tokens"] == "110"
    assert metrics["Cost (USD)"] == "0.5100"


def test_timeline_pages_and_failures_only(ledger_path):
    at = page(ledger_path, run="beta-1")
    events = at.dataframe[0].value
    assert {"node_start", "node_error"} <= set(events["event"])
    at.checkbox(key="failures-beta-1").check().run()
    failures = at.dataframe[0].value
    assert set(failures["event"]) <= {"node_error", "node_retry", "flow_end"}
    assert failures["error_msg"].notna().all() or "node_error" in set(failures["event"])
    assert "with a failure" in texts(at.caption)


def test_attempts_tab_shows_worker_outcome_and_error(ledger_path):
    at = page(ledger_path, run="alpha-1")
    attempts = next(d.value for d in at.dataframe if "outcome" in d.value.columns)
    assert attempts[["attempt", "worker", "outcome"]].values.tolist() == [
        [1, "w-1", "failed"],
        [2, "w-1", "committed"],
    ]
    assert attempts["error_msg"].iloc[0] == "provider hiccup"


def test_store_inspector_follows_the_step_slider(ledger_path):
    at = page(ledger_path, run="alpha-1")
    slider = at.slider(key="store-alpha-1")
    assert (slider.min, slider.max, slider.value) == (-1, 1, 1)

    def store_table():
        return next(d.value for d in at.dataframe if list(d.value.columns) == ["key", "value"])

    assert dict(store_table().values.tolist())["count"] == "2"
    assert at.json[0].value is not None and '"note"' in at.json[0].value
    slider.set_value(-1).run()
    assert store_table().values.tolist() == [["topic", '"ledgers"']]
    assert "After step \\-1" in texts(at.caption)


def test_diff_between_two_checkpoints(ledger_path):
    at = page(ledger_path, run="alpha-1")

    def diff():
        return next(d.value for d in at.dataframe if "change" in d.value.columns)

    changes = dict(diff()[["key", "change"]].values.tolist())
    assert changes == {"count": "changed", "note": "added", "topic": "removed"}
    at.slider(key="diff-from-alpha-1").set_value(-1).run()
    assert dict(diff()[["key", "change"]].values.tolist()) == {
        "answer": "added",
        "count": "added",
        "note": "added",
        "topic": "removed",
    }


def test_diff_of_a_fork_against_its_parent(ledger_path):
    at = page(ledger_path, run="gamma-1")
    radio = at.radio(key="diff-src-gamma-1")
    radio.set_value(radio.options[1]).run()
    assert "parent alpha\\-1 at step 0" in texts(at.caption)
    assert "0 keys differ" in texts(at.caption)  # the fork starts from the parent's step 0


def test_usage_per_node_and_model(ledger_path):
    at = page(ledger_path, run="alpha-1")
    usage = next(d.value for d in at.dataframe if "model" in d.value.columns)
    assert usage[["node_name", "model", "calls"]].values.tolist() == [
        ["Ask", "m-large", 1],
        ["Ask", "m-small", 1],
    ]


def test_graph_highlights_the_current_node(ledger_path):
    at = page(ledger_path, run="alpha-1")
    (chart,) = at.get("graphviz_chart")
    spec = chart.proto.spec
    assert '"Ask" -> "Note" [label="default"]' in spec
    assert '"Note" [label="Note", fillcolor="#ffd54f"]' in spec
    dot = graph_dot(
        {"nodes": {'A"]': {"edges": {}}}}, None, {'A"]': {"done": 3, "failed": 1, "running": 2}}
    )
    assert r'"A\"]" [label="A\"]\n3 done / 1 failed / 2 running"' in dot


def test_resume_tab_has_a_snippet(ledger_path):
    at = page(ledger_path, run="beta-1")
    code = texts(at.code)
    assert "attach('beta-1'" in code and "handle.resume()" in code
    assert "pocoflow resume beta-1 --db" in code


def test_live_refresh_reads_only_new_events(ledger_path):
    from pocoflow.db import WorkflowDB

    at = page(ledger_path, run="live-1")
    assert "new events since" not in texts(at.caption)
    WorkflowDB(ledger_path).save_event("live-1", "tick", node_name="Waiter")
    at.run()
    live = next(d.value for d in at.dataframe if "tick" in set(d.value.get("event", [])))
    assert live["event"].tolist() == ["tick"]
    assert "1 new events since this page opened" in texts(at.caption)


def test_run_page_reads_bounded_queries_only(ledger_path):
    """Every statement touching events, checkpoints, values or runs is a page (LIMIT) or
    one aggregate/keyed row: nothing reads a whole table."""
    from pocoflow.db import WorkflowDB

    engine = WorkflowDB(ledger_path)._ledger.engine
    seen: list[str] = []

    def record(conn, cursor, statement, *args):
        seen.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        page(ledger_path)
        page(ledger_path, run="alpha-1")
    finally:
        event.remove(engine, "before_cursor_execute", record)
    selects = [s for s in seen if s.startswith("SELECT") and "pf_" in s]
    assert selects
    for statement in selects:
        bounded = (
            "LIMIT" in statement
            or re.search(r"\b(count|max|min|sum)\(", statement)
            or re.search(r"WHERE .*run_id = \?", statement)
            or "pf_alembic_version" in statement
        )
        assert bounded, statement


# ── workers and stuck runs ───────────────────────────────────────────────────


def test_workers_and_stuck_runs_page(ledger_path):
    at = page(ledger_path, view="workers")
    workers = at.dataframe[0].value
    assert workers["worker"].tolist() == ["w-1"] and workers["stale"].tolist() == [False]
    assert "No stuck runs." in texts(at.success)
    at.number_input(key="stuck-after").set_value(1).run()
    assert "live-1" in at.dataframe[1].value["run_id"].tolist()
    at.button(key="nav-runs").click().run()
    assert "view" not in at.query_params and run_ids(at)


def test_flower_link_when_its_url_is_set(ledger_path, monkeypatch):
    monkeypatch.setenv("POCOFLOW_FLOWER_URL", "http://flower.example:5555")
    at = page(ledger_path, view="workers")
    assert at.get("link_button")[0].proto.url == "http://flower.example:5555"


# ── bad input and escaping ───────────────────────────────────────────────────


def test_missing_database(tmp_path):
    missing = tmp_path / "nope.db"
    at = page(str(missing))
    assert "No ledger at" in at.error[0].value and "does not exist" in at.error[0].value
    assert not missing.exists()  # the monitor does not create a ledger by looking


def test_database_that_is_not_a_ledger(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    at = page(str(other))
    assert "is not a PocoFlow ledger" in at.error[0].value
    with sqlite3.connect(other) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert tables == {"customers"}  # nothing added to somebody else's database


def test_file_that_is_not_a_database(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    at = page(str(junk))
    assert "Cannot read" in at.error[0].value


def test_unknown_run_id_is_escaped(ledger_path):
    nasty = "[click](http://evil.example) **x** <b>"
    at = page(ledger_path, run=nasty)
    message = at.error[0].value
    assert "Unknown run id" in message
    assert "[click](" not in message and "**x**" not in message and "<b>" not in message
    assert escape_md("[click](x)") == "\\[click\\]\\(x\\)"


# ── controls ─────────────────────────────────────────────────────────────────


def test_no_controls_without_allow_control(ledger_path, monkeypatch):
    monkeypatch.setenv(actions.TOKEN_ENV, TOKEN)
    at = page(ledger_path, run="live-1")
    assert "Controls" not in [t.label for t in at.tabs]
    with pytest.raises(ControlRefused, match="--allow-control"):
        actions.control_run(
            "cancel",
            "live-1",
            db_url=ledger_path,
            allow_control=False,
            token=TOKEN,
            confirmed=True,
        )


def test_controls_refused_without_a_token_in_the_environment(ledger_path, monkeypatch):
    monkeypatch.delenv(actions.TOKEN_ENV, raising=False)
    at = page(ledger_path, True, run="live-1")
    assert "Controls need a token" in texts(at.warning)
    at.text_input(key="ctl-token-live-1").set_value("")
    at.checkbox(key="ctl-confirm-live-1").check()
    at.button(key="ctl-go-live-1").click().run()
    assert "refused" in texts(at.error) and "POCOFLOW\\_MONITOR\\_TOKEN" in texts(at.error)


def control(at, run_id, action, token, confirm=True):
    at.selectbox(key=f"ctl-action-{run_id}").set_value(action)
    at.text_input(key=f"ctl-token-{run_id}").set_value(token)
    if confirm:  # a fresh tick for this action: a tick confirms the action it named
        at.checkbox(key=f"ctl-confirm-{run_id}").uncheck().run()
        at.checkbox(key=f"ctl-confirm-{run_id}").check()
    else:
        at.checkbox(key=f"ctl-confirm-{run_id}").uncheck()
    at.button(key=f"ctl-go-{run_id}").click().run()
    assert not at.exception, at.exception


@pytest.fixture
def control_ledger(tmp_path, monkeypatch):
    monkeypatch.setenv(actions.TOKEN_ENV, TOKEN)
    path = str(tmp_path / "control.db")
    db = fill(path)
    yield path, db
    db.close()


def test_wrong_token_and_missing_confirmation_change_nothing(control_ledger):
    path, db = control_ledger
    at = page(path, True, run="live-1")
    control(at, "live-1", "cancel", "wrong")
    assert "Wrong control token" in texts(at.error)
    control(at, "live-1", "cancel", TOKEN, confirm=False)
    assert "Confirm the action first" in texts(at.error)
    assert db.get_run("live-1")["control"] is None


def test_pause_resume_cancel_with_token_and_confirmation(control_ledger):
    path, db = control_ledger
    at = page(path, True, run="live-1")
    control(at, "live-1", "pause", TOKEN)
    assert "pause requested" in texts(at.success)
    assert db.get_run("live-1")["control"] == "pause"
    control(at, "live-1", "resume", TOKEN)
    assert "resume requested" in texts(at.success)
    assert db.get_run("live-1")["control"] is None
    control(at, "live-1", "cancel", TOKEN)
    assert "cancel requested" in texts(at.success)
    assert db.get_run("live-1")["control"] == "cancel"


def test_send_a_value_and_bad_json(control_ledger):
    path, db = control_ledger
    at = page(path, True, run="live-1")
    at.selectbox(key="ctl-action-live-1").set_value("send").run()
    at.text_input(key="ctl-key-live-1").set_value("approval")
    at.text_area(key="ctl-value-live-1").set_value("{not json")
    control(at, "live-1", "send", TOKEN)
    assert "not valid JSON" in texts(at.error)
    at.text_area(key="ctl-value-live-1").set_value('{"ok": true}')
    control(at, "live-1", "send", TOKEN)
    assert "sent" in texts(at.success)
    assert db.read_signal("live-1", "approval").value == {"ok": True}


# ── pocoflow monitor ─────────────────────────────────────────────────────────


class Exec(Exception):
    pass


@pytest.fixture
def execv(monkeypatch):
    calls = []

    def fake(path, argv, env):
        calls.append([*argv, "env:" + env.get("POCOFLOW_DB_URL", "")])
        raise Exec

    monkeypatch.setattr("os.execve", fake)
    return calls


def test_monitor_command_runs_streamlit_on_the_monitor_script(execv, monkeypatch):
    from click.testing import CliRunner

    from pocoflow.cli import main as cli

    monkeypatch.delenv(actions.TOKEN_ENV, raising=False)
    result = CliRunner().invoke(cli, ["monitor", "--db", "x.db", "--port", "8600"])
    assert isinstance(result.exception, Exec)
    (argv,) = execv
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4].endswith("pocoflow/ui/monitor.py")
    assert argv[argv.index("--server.port") + 1] == "8600"
    assert argv[argv.index("--") + 1 :] == ["env:x.db"]  # the ledger URL in the environment


def test_monitor_allow_control_needs_the_token(execv, monkeypatch):
    from click.testing import CliRunner

    from pocoflow.cli import main as cli

    monkeypatch.delenv(actions.TOKEN_ENV, raising=False)
    refused = CliRunner().invoke(cli, ["monitor", "--allow-control"])
    assert refused.exit_code == 2 and "POCOFLOW_MONITOR_TOKEN" in refused.output
    assert execv == []
    monkeypatch.setenv(actions.TOKEN_ENV, TOKEN)
    CliRunner().invoke(cli, ["monitor", "--allow-control", "--db", "y.db"])
    assert execv[0][-2:] == ["--allow-control", "env:y.db"]


def test_script_entry_reads_db_and_flag_from_its_arguments(tmp_path):
    at = AppTest.from_string(
        "from pocoflow.ui.monitor import main\n"
        f"main([{str(tmp_path / 'none.db')!r}, '--allow-control'])\n",
        default_timeout=30,
    )
    at.run()
    assert not at.exception and "No ledger at" in at.error[0].value


def test_gantt_of_attempts_by_worker(ledger_path):
    at = page(ledger_path, run="alpha-1")
    (chart,) = at.get("vega_lite_chart")
    spec = chart.proto.spec
    assert '"worker"' in spec and '"x2"' in spec
    shown = next(d.value for d in at.dataframe if "outcome" in d.value.columns)
    assert "T" not in shown["started"].iloc[0]  # times shortened for the table
    from pocoflow.db import WorkflowDB
    from pocoflow.ui import queries

    rows = queries.attempts_page(WorkflowDB(ledger_path), "alpha-1").rows
    bars = gantt_bars(rows, datetime.now(UTC))
    assert [(b["step"], b["worker"], b["outcome"]) for b in bars] == [
        ("0 #1", "w-1", "failed"),
        ("0 #2", "w-1", "committed"),
    ]
    assert bars[0]["start"] < bars[0]["end"] <= bars[1]["start"] < bars[1]["end"]


def test_gantt_of_a_run_in_a_process_comes_from_its_events(ledger_path):
    at = page(ledger_path, run="beta-1")  # no attempts: it ran in a process
    assert "No attempts" in texts(at.info)
    from pocoflow.db import WorkflowDB

    events = WorkflowDB(ledger_path).get_events("alpha-1")
    bars = gantt_from_events(events)
    assert [b["step"] for b in bars] == ["0 Ask", "1 Note"]
    assert all(b["start"] <= b["end"] for b in bars)


# ── bulk controls ────────────────────────────────────────────────────────────


def bulk(at, action, token, confirm=True):
    at.selectbox(key="bulk-action").set_value(action)
    at.text_input(key="bulk-token").set_value(token)
    at.checkbox(key="bulk-confirm").set_value(confirm)
    at.button(key="bulk-go").click().run()
    assert not at.exception, at.exception


def test_bulk_control_shows_count_and_first_runs_then_acts_on_each(control_ledger):
    path, db = control_ledger
    for i in range(3):
        db.create_run(f"live-{i + 2}", "beta")
    at = page(path, True, status="running")
    assert "4 runs, first: live\\-4, live\\-3, live\\-2, live\\-1" in texts(at.caption)
    assert at.checkbox(key="bulk-confirm").label == "Yes, cancel these 4 runs"
    bulk(at, "pause", "wrong")
    assert "Wrong control token" in texts(at.error)
    bulk(at, "pause", TOKEN)
    assert "pause requested for 4 runs" in texts(at.success)
    assert [db.get_run(f"live-{i}")["control"] for i in range(1, 5)] == ["pause"] * 4
    assert db.get_run("alpha-1")["control"] is None


def test_bulk_control_refuses_when_the_filter_selects_other_runs_now(control_ledger):
    path, db = control_ledger
    at = page(path, True, status="running")
    at.checkbox(key="bulk-confirm").check().run()  # confirmed while it showed 1 run
    db.create_run("live-late", "beta")  # starts after that
    bulk(at, "cancel", TOKEN)
    assert "now selects 2 runs, not the 1 you confirmed" in texts(at.error)
    assert db.get_run("live-1")["control"] is None


def test_bulk_control_is_enforced_in_the_action(control_ledger):
    path, db = control_ledger
    from pocoflow.ui.queries import RunFilter

    assert "Act on every run" not in " ".join(e.label for e in page(path).expander)
    with pytest.raises(ControlRefused, match="--allow-control"):
        actions.control_runs(
            "cancel",
            RunFilter(statuses=("running",)),
            db=db,
            db_url=path,
            allow_control=False,
            token=TOKEN,
            confirmed=True,
            expected=1,
        )
    assert db.get_run("live-1")["control"] is None


def test_events_page_two(tmp_path):
    from pocoflow.db import WorkflowDB

    path = str(tmp_path / "events.db")
    db = WorkflowDB(path)
    db.create_run("chatty-1", "chatty")
    for i in range(150):
        db.save_event("chatty-1", "tick", step=i, node_name="N")
    db.close()
    at = page(path, run="chatty-1")
    first = at.dataframe[0].value
    assert len(first) == 100 and first["step"].iloc[0] == 0
    at.number_input(key="events-page-chatty-1-False").set_value(2).run()
    second = at.dataframe[0].value
    assert len(second) == 50 and second["step"].tolist() == list(range(100, 150))


def test_bulk_control_refuses_other_runs_behind_the_same_count(control_ledger):
    """One run ended and another started since the box was ticked: the count is the same,
    the runs are not; the one nobody saw must not be cancelled."""
    path, db = control_ledger
    at = page(path, True, status="running")
    at.checkbox(key="bulk-confirm").check().run()  # confirmed while it showed live-1
    db.update_run("live-1", status="completed")
    db.create_run("live-late", "beta")
    bulk(at, "cancel", TOKEN)
    assert "refused" in texts(at.error)
    assert db.get_run("live-late")["control"] is None


def test_bulk_confirmation_does_not_carry_over_to_another_filter(control_ledger):
    path, db = control_ledger
    db.create_run("other-1", "gamma")
    at = page(path, True, status="running", flow="beta")
    at.checkbox(key="bulk-confirm").check().run()  # confirmed: live-1 (flow beta)
    at.multiselect[1].set_value(["gamma"]).run()  # another filter, also one run
    bulk(at, "cancel", TOKEN)
    assert db.get_run("other-1")["control"] is None


def test_a_confirmation_is_for_the_action_it_named(control_ledger):
    """Ticked "Yes, pause run live-1", then the action changed to cancel: not confirmed."""
    path, db = control_ledger
    at = page(path, True, run="live-1")
    at.selectbox(key="ctl-action-live-1").set_value("pause").run()
    at.checkbox(key="ctl-confirm-live-1").check().run()
    at.selectbox(key="ctl-action-live-1").set_value("cancel").run()
    at.text_input(key="ctl-token-live-1").set_value(TOKEN)
    at.button(key="ctl-go-live-1").click().run()
    assert db.get_run("live-1")["control"] is None


def test_a_bulk_confirmation_is_for_the_action_it_named(control_ledger):
    path, db = control_ledger
    at = page(path, True, status="running")
    at.selectbox(key="bulk-action").set_value("pause").run()
    at.checkbox(key="bulk-confirm").check().run()  # "Yes, pause these 1 runs"
    bulk(at, "cancel", TOKEN)  # the box still ticked
    assert "Confirm the action first" in texts(at.error)
    assert db.get_run("live-1")["control"] is None


def test_run_header_metrics_escape_ledger_names(tmp_path):
    """st.metric renders its value as Markdown: a flow or node name is escaped there too
    (a link or an image from the ledger would load or lead elsewhere)."""
    from pocoflow.db import WorkflowDB

    nasty = "![x](http://evil.example/p.png) [click](http://evil.example)"
    path = str(tmp_path / "names.db")
    db = WorkflowDB(path)
    db.create_run("named-1", nasty, initial_store={})
    db.update_run("named-1", current_node=nasty)
    db.close()
    at = page(path, run="named-1")
    values = {m.label: m.value for m in at.metric}
    assert values["Flow"] == escape_md(nasty) and values["Current node"] == escape_md(nasty)


# ── fork from a step ─────────────────────────────────────────────────────────


def registered_alpha():
    """Flow ``alpha`` as a worker would build it, so its runs can be forked onto them."""
    from tests.monitor_ledger import alpha

    return alpha(None, None)


@pytest.fixture
def fork_env(control_ledger, monkeypatch):
    """The monitor's environment for forks: flow ``alpha`` registered (in a copy of the
    registry, dropped after the test), and an in-memory broker, so a fork's first step is
    published (nowhere) without a broker server."""
    from pocoflow import registry

    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    registry.register_flow("alpha", registered_alpha)
    monkeypatch.setenv("POCOFLOW_BROKER_URL", "memory://")
    monkeypatch.delenv("POCOFLOW_REDIS_URL", raising=False)
    return control_ledger


def fork_control(at, run_id, step, token, confirm=True):
    at.selectbox(key=f"ctl-action-{run_id}").set_value("fork").run()
    at.number_input(key=f"ctl-step-{run_id}").set_value(step)
    at.text_input(key=f"ctl-token-{run_id}").set_value(token)
    at.checkbox(key=f"ctl-confirm-{run_id}").uncheck().run()
    if confirm:
        at.checkbox(key=f"ctl-confirm-{run_id}").check()
    at.button(key=f"ctl-go-{run_id}").click().run()
    assert not at.exception, at.exception


def run_count(db):
    return len(db.list_runs(limit=1000))


def test_fork_is_refused_without_allow_control(fork_env):
    path, db = fork_env
    at = page(path, run="alpha-1")
    assert "Controls" not in [t.label for t in at.tabs]
    with pytest.raises(ControlRefused, match="--allow-control"):
        actions.fork_from(
            "alpha-1",
            0,
            db_url=path,
            allow_control=False,
            token=TOKEN,
            confirmed=actions.confirm("fork run alpha-1 from step 0"),
        )
    with pytest.raises(ControlRefused, match="--allow-control"):
        actions.control_run(
            "fork",
            "alpha-1",
            db_url=path,
            allow_control=False,
            token=TOKEN,
            confirmed=True,
            from_step="not a step",  # refused for the control before the step is read
        )
    assert run_count(db) == 4


def test_fork_is_refused_without_a_token_a_right_token_or_a_confirmation(fork_env, monkeypatch):
    path, db = fork_env
    at = page(path, True, run="alpha-1")
    fork_control(at, "alpha-1", 0, "wrong")
    assert "fork refused: Wrong control token" in texts(at.error)
    fork_control(at, "alpha-1", 0, TOKEN, confirm=False)
    assert "Confirm the action first" in texts(at.error)
    monkeypatch.delenv(actions.TOKEN_ENV)
    fork_control(at, "alpha-1", 0, TOKEN)
    assert "Controls need a token" in texts(at.error)
    assert run_count(db) == 4  # no fork recorded


def test_fork_from_the_run_page_queues_a_fork_and_links_to_it(fork_env):
    path, db = fork_env
    at = page(path, True, run="alpha-1")
    at.selectbox(key="ctl-action-alpha-1").set_value("fork").run()
    steps = at.number_input(key="ctl-step-alpha-1")
    # The step before the latest: alpha-1 ended at step 1, nothing can be forked from it.
    assert (steps.min, steps.max, steps.value) == (-1, 1, 0)
    fork_control(at, "alpha-1", 0, TOKEN)
    (done,) = [s.value for s in at.success]
    new_id = re.search(r"forked from step 0 as (alpha\\-[0-9a-f]{8})", done).group(1)
    new_id = new_id.replace("\\", "")
    fork = db.get_run(new_id)
    assert (fork["parent_run_id"], fork["forked_from_step"], fork["status"]) == (
        "alpha-1",
        0,
        "queued",
    )
    assert fork["queue"] == "pocoflow"  # a run of the workers now, not of this process
    assert (db.get_step(new_id, 1)["node_id"], db.get_step(new_id, 1)["status"]) == (
        "Note",
        "queued",
    )
    assert f"(?run={new_id})" in texts(at.markdown)
    at.button(key=f"ctl-open-fork-{new_id}").click().run()
    assert at.query_params["run"] == new_id
    assert f"Run {escape_md(new_id)}" in texts(at.subheader)


def test_a_fork_confirmation_is_for_the_step_it_named(fork_env):
    path, db = fork_env
    at = page(path, True, run="alpha-1")
    at.selectbox(key="ctl-action-alpha-1").set_value("fork").run()
    at.number_input(key="ctl-step-alpha-1").set_value(0).run()
    at.checkbox(key="ctl-confirm-alpha-1").check().run()  # "fork ... from step 0"
    at.number_input(key="ctl-step-alpha-1").set_value(-1)
    at.text_input(key="ctl-token-alpha-1").set_value(TOKEN)
    at.button(key="ctl-go-alpha-1").click().run()
    assert "Confirm the action first" in texts(at.error)
    assert run_count(db) == 4


def test_fork_of_a_last_step_says_there_is_nothing_to_fork(fork_env):
    path, db = fork_env
    at = page(path, True, run="alpha-1")
    fork_control(at, "alpha-1", 1, TOKEN)
    assert "step 1 was its last step" in texts(at.error).replace("\\", "")
    assert run_count(db) == 4


def test_bulk_fork_forks_each_run_with_the_step_and_lists_the_skipped(fork_env):
    path, db = fork_env
    at = page(path, True, flow="alpha")
    at.selectbox(key="bulk-action").set_value("fork").run()
    at.number_input(key="bulk-step").set_value(0).run()
    assert at.checkbox(key="bulk-confirm").label == "Yes, fork these 2 runs from step 0"
    at.text_input(key="bulk-token").set_value(TOKEN)
    at.checkbox(key="bulk-confirm").check().run()
    at.button(key="bulk-go").click().run()
    assert not at.exception and not at.error, texts(at.error)
    assert "forked 1 runs from step 0" in texts(at.success)
    forks = next(d.value for d in at.dataframe if "fork" in d.value.columns)
    assert forks["run id"].tolist() == ["alpha-1"]
    assert db.get_run(forks["fork"].iloc[0])["parent_run_id"] == "alpha-1"
    assert "skipped 1 runs with no step 0" in texts(at.warning)
    skipped = next(d.value for d in at.dataframe if "skipped" in d.value.columns)
    assert skipped.values.tolist() == [
        ["gamma-1", "Run 'gamma-1' step 0 was its last step: there is nothing to fork from it"]
    ]


def test_bulk_fork_is_enforced_in_the_action(fork_env):
    path, db = fork_env
    from pocoflow.ui.queries import RunFilter

    filt = RunFilter(flows=("alpha",))
    count, selected = actions.selection(db, filt)
    common = dict(db=db, db_url=path, expected=count, expected_selection=selected)
    yes = actions.confirm("fork from step 0")
    with pytest.raises(ControlRefused, match="--allow-control"):
        actions.fork_runs(filt, 0, allow_control=False, token=TOKEN, confirmed=yes, **common)
    with pytest.raises(ControlRefused, match="Wrong control token"):
        actions.fork_runs(filt, 0, allow_control=True, token="x", confirmed=yes, **common)
    with pytest.raises(ControlRefused, match="Confirm"):
        actions.fork_runs(filt, 0, allow_control=True, token=TOKEN, confirmed=None, **common)
    assert "fork" not in actions.BULK_ACTIONS and "fork" in actions.BULK_CHOICES
    with pytest.raises(
        ValueError, match=r"one of cancel, pause, resume \(a bulk fork is fork_runs"
    ):
        actions.control_runs(
            "fork", filt, allow_control=True, token=TOKEN, confirmed=True, **common
        )
    assert run_count(db) == 4


def test_apply_clicked_twice_makes_one_fork(fork_env):
    """One tick, one fork: Apply clears the tick, and the action uses up its nonce."""
    path, db = fork_env
    at = page(path, True, run="alpha-1")
    fork_control(at, "alpha-1", 0, TOKEN)
    assert "forked from step 0" in texts(at.success) and run_count(db) == 5
    assert not at.checkbox(key="ctl-confirm-alpha-1").value  # the tick was used
    at.button(key="ctl-go-alpha-1").click().run()
    assert "Confirm the action first" in texts(at.error)
    assert run_count(db) == 5


def test_a_fork_confirmation_is_checked_and_used_up_in_the_action(fork_env):
    """What the tick confirmed is passed in and compared in the action (run and step),
    and its nonce works once, whatever page calls it."""
    path, db = fork_env
    common = dict(db_url=path, allow_control=True, token=TOKEN)
    for wrong in (
        True,  # a bare yes confirms no fork
        actions.confirm("fork run alpha-1 from step -1"),  # another step
        actions.confirm("fork run gamma-1 from step 0"),  # another run
        actions.confirm("fork from step 0"),  # a bulk fork's tick
    ):
        with pytest.raises(ControlRefused, match="Confirm the action first"):
            actions.fork_from("alpha-1", 0, confirmed=wrong, **common)
    yes = actions.confirm("fork run alpha-1 from step 0")
    forked = actions.fork_from("alpha-1", 0, confirmed=yes, **common)
    assert forked.sent and db.get_run(forked.run_id)["parent_run_id"] == "alpha-1"
    with pytest.raises(ControlRefused, match="was used already"):
        actions.fork_from("alpha-1", 0, confirmed=yes, **common)
    with pytest.raises(ControlRefused, match="was used already"):
        actions.control_run("fork", "alpha-1", from_step=0, confirmed=yes, **common)
    assert run_count(db) == 5


def test_bulk_apply_clicked_twice_forks_the_selection_once(fork_env):
    """The forks are queued runs the status filter does not select, so the recount
    matches again: only the used-up tick stops a second round of forks."""
    path, db = fork_env
    at = page(path, True, flow="alpha", status="completed")
    at.selectbox(key="bulk-action").set_value("fork").run()
    at.number_input(key="bulk-step").set_value(0).run()
    at.text_input(key="bulk-token").set_value(TOKEN)
    at.checkbox(key="bulk-confirm").check().run()
    at.button(key="bulk-go").click().run()
    assert "forked 1 runs from step 0" in texts(at.success) and run_count(db) == 5
    assert not at.checkbox(key="bulk-confirm").value
    at.button(key="bulk-go").click().run()
    assert "Confirm the action first" in texts(at.error)
    from pocoflow.ui.queries import RunFilter

    filt = RunFilter(flows=("alpha",), statuses=("completed",))
    count, selected = actions.selection(db, filt)
    yes = actions.confirm("fork from step 0")
    common = dict(db=db, db_url=path, allow_control=True, token=TOKEN, expected=count)
    actions.fork_runs(filt, 0, confirmed=yes, expected_selection=selected, **common)
    with pytest.raises(ControlRefused, match="was used already"):
        actions.fork_runs(filt, 0, confirmed=yes, expected_selection=selected, **common)
    assert run_count(db) == 6
    assert [r["parent_run_id"] for r in db.list_runs(limit=10)].count("alpha-1") == 3


def test_bulk_fork_of_nothing_is_no_success(fork_env):
    path, db = fork_env
    at = page(path, True, flow="alpha")
    at.selectbox(key="bulk-action").set_value("fork").run()
    at.number_input(key="bulk-step").set_value(5).run()
    at.text_input(key="bulk-token").set_value(TOKEN)
    at.checkbox(key="bulk-confirm").check().run()
    at.button(key="bulk-go").click().run()
    assert not at.success
    assert "no run was forked from step 5" in texts(at.error)
    assert "skipped 2 runs" in texts(at.warning) and run_count(db) == 4


UNREACHABLE = "redis://127.0.0.1:9/0"  # nothing listens on the discard port


def test_fork_is_refused_before_anything_is_recorded_when_the_broker_is_unreachable(
    fork_env, monkeypatch
):
    path, db = fork_env
    monkeypatch.setenv("POCOFLOW_BROKER_URL", UNREACHABLE)
    at = page(path, True, run="alpha-1")
    fork_control(at, "alpha-1", 0, TOKEN)
    error = texts(at.error).replace("\\", "")
    assert "fork refused" in error and "cannot be reached" in error
    assert "no fork was recorded" in error and not at.success
    bulk = page(path, True, flow="alpha")
    bulk.selectbox(key="bulk-action").set_value("fork").run()
    bulk.text_input(key="bulk-token").set_value(TOKEN)
    bulk.checkbox(key="bulk-confirm").check().run()
    bulk.button(key="bulk-go").click().run()
    assert "no fork was recorded" in texts(bulk.error).replace("\\", "")
    assert run_count(db) == 4


class Unsent:
    """A publisher whose broker takes nothing (as Publisher.send when publishing fails)."""

    def send(self, message, **kwargs):
        return False


def test_a_fork_recorded_but_not_sent_is_said_so(fork_env, monkeypatch):
    from pocoflow.distributed import client

    path, db = fork_env
    monkeypatch.setattr(client, "_publisher", lambda settings: Unsent())
    at = page(path, True, run="alpha-1")
    fork_control(at, "alpha-1", 0, TOKEN)
    assert "forked from step 0" in texts(at.success) and run_count(db) == 5
    assert "Recorded but not sent" in texts(at.warning)
    bulk = page(path, True, flow="alpha", status="completed")
    bulk.selectbox(key="bulk-action").set_value("fork").run()
    bulk.text_input(key="bulk-token").set_value(TOKEN)
    bulk.checkbox(key="bulk-confirm").check().run()
    bulk.button(key="bulk-go").click().run()
    assert "forked 1 runs" in texts(bulk.success)
    assert "Recorded but not sent" in texts(bulk.warning)
    forks = [r["run_id"] for r in db.list_runs(limit=10) if r["status"] == "queued"]
    assert len(forks) == 2 and all(db.get_step(f, 1)["sent_at"] is None for f in forks)


def test_the_link_to_a_fork_escapes_every_reserved_character_of_its_run_id(fork_env, monkeypatch):
    """A flow name (so a run id) with ) / ? would end the Markdown link, or make a path
    or a query of it: each is percent-encoded in the link's target."""
    from pocoflow import Flow, registry
    from tests.monitor_ledger import Ask, Note

    path, db = fork_env
    name = "a)b/c?d"

    def build():
        ask = Ask()
        ask.then("default", Note())
        return Flow(ask, flow_name=name)

    registry.register_flow(name, build)
    local = build()
    local.db_path = path
    local.run({"topic": "t"})
    run_id = local.last_run_id
    at = page(path, True, run=run_id)
    fork_control(at, run_id, 0, TOKEN)
    (fork_id,) = [r["run_id"] for r in db.list_runs(limit=10) if r["parent_run_id"] == run_id]
    suffix = fork_id.rsplit("-", 1)[1]
    assert f"(?run=a%29b%2Fc%3Fd-{suffix})" in texts(at.markdown)
