"""Every shipped example and every Python block of the README runs, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from examples import approval, article, hello, summarize

ROOT = Path(__file__).resolve().parents[2]


def test_hello(tmp_path, capsys):
    store = hello.main(tmp_path / "hello.db")
    assert store["loud"] == "HELLO, POCOFLOW!"
    out = capsys.readouterr().out
    assert "completed in 2 steps" in out


def test_article_pipeline_is_deterministic(tmp_path):
    first = article.main("durable workflows", str(tmp_path / "a.db"))
    second = article.main("durable workflows", str(tmp_path / "b.db"))
    assert first["summary"] == second["summary"]
    assert len(first["drafts"]) == len(first["sections"]) == 3
    assert first["summary"].startswith("In short:")


def test_the_summarizers_rate_limit_holds_its_calls_back(tmp_path, monkeypatch):
    """Lowered to 10/s, the limit binds on 25 calls that would take milliseconds: the
    first 10 start at once, the next 10 a second later, the last 5 a second after."""
    monkeypatch.setattr(summarize.SummarizeEach, "rate_limit", "10/s")
    started = time.monotonic()
    store, usage = summarize.main(25, str(tmp_path / "s.db"))
    assert time.monotonic() - started >= 1.9
    assert len(store["summaries"]) == 25 and usage["by_node"]["SummarizeEach"]["calls"] == 25


def test_summarizer_reports_cost_per_node(tmp_path):
    store, usage = summarize.main(12, str(tmp_path / "s.db"))
    assert len(store["summaries"]) == 12 and store["digest"].startswith("In short:")
    by_node = usage["by_node"]
    assert by_node["SummarizeEach"]["calls"] == 12 and by_node["Combine"]["calls"] == 1
    # priced from the example's table: the small model per document, the large one once
    assert 0 < by_node["SummarizeEach"]["cost_usd"] < by_node["Combine"]["cost_usd"]
    assert usage["cost_usd"] == pytest.approx(
        by_node["SummarizeEach"]["cost_usd"] + by_node["Combine"]["cost_usd"]
    )


def test_approval_flow_waits_for_each_answer(tmp_path, capsys):
    from pocoflow.db import WorkflowDB

    store = approval.main(tmp_path / "approval.db")
    assert store["published"] == store["draft"] and store["round"] == 2
    out = capsys.readouterr().out
    run_id = re.search(r"run (approval-[0-9a-f]{8}) is waiting; draft 1", out).group(1)
    assert f"run {run_id} is completed: published" in out
    db = WorkflowDB(tmp_path / "approval.db")
    events = [e["event"] for e in db.get_events(run_id)]
    assert events.count("run_waiting") == 2 and events.count("signal_sent") == 2
    assert [s["key"] for s in db.get_signals(run_id)] == ["review-1", "review-2"]


def test_approval_flow_from_the_command_line(tmp_path):
    db = str(tmp_path / "cli.db")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pocoflow.cli", *args, "--db", db],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    started = cli("run", "examples.approval:build_flow", "--store", '{"topic": "tides"}')
    assert started.returncode == 0, started.stderr
    run_id = re.search(r"run (approval-[0-9a-f]{8}): waiting for a value", started.stdout).group(1)
    sent = cli("send", run_id, "review-1", '{"ok": true}')
    assert sent.returncode == 0 and "the run is waiting" in sent.stdout, sent.stderr
    twice = cli("send", run_id, "review-1", '{"ok": false}')
    assert twice.returncode == 2 and "already has a value for 'review-1'" in twice.stderr
    unknown = cli("send", "approval-nope", "review-1", "true")
    assert unknown.returncode == 2 and "'approval-nope'" in unknown.stderr
    resumed = cli("resume", run_id, "--flows", "examples.approval")
    assert resumed.returncode == 0 and f"run {run_id}: completed" in resumed.stdout
    assert '"published": "Tides: a short section' in resumed.stdout


def readme_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_python_block_runs(index, tmp_path):
    code = readme_blocks()[index]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_cli_run_show_and_bad_input(tmp_path):
    db = str(tmp_path / "cli.db")
    cli = [sys.executable, "-m", "pocoflow.cli"]
    ok = subprocess.run(
        [*cli, "run", "examples.hello:build_flow", "--store", '{"name": "Ada"}', "--db", db],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Greet -> shout" in ok.stdout and "HELLO, ADA!" in ok.stdout
    run_id = re.search(r"run (hello-[0-9a-f]{8}): completed", ok.stdout).group(1)

    shown = subprocess.run(
        [*cli, "show", run_id, "--db", db], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0 and "node_end" in shown.stdout and "HELLO, ADA!" in shown.stdout

    listed = subprocess.run(
        [*cli, "runs", "--db", db], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run_id in listed.stdout

    unknown = subprocess.run(
        [*cli, "show", "hello-nope", "--db", db],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 2 and "unknown run id 'hello-nope'" in unknown.stderr

    bad_json = subprocess.run(
        [*cli, "run", "examples.hello:build_flow", "--store", "{name:", "--db", db],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_json.returncode == 2 and "not valid JSON" in bad_json.stderr

    failing = subprocess.run(
        [*cli, "run", "examples.hello:build_flow", "--store", "{}", "--db", db],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failing.returncode == 1 and "KeyError" in failing.stderr


def cli_on(db: str, env: dict[str, str]) -> Any:
    """``pocoflow ARGS --db DB`` in a subprocess with ``env``."""

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pocoflow.cli", *args, "--db", db],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    return cli


def test_cli_resume_and_fork(tmp_path):
    db = str(tmp_path / "cli.db")
    marker = tmp_path / "fail-once"
    marker.touch()
    env = {**os.environ, "POCOFLOW_TEST_FAIL_ONCE": str(marker), "PYTHONPATH": str(ROOT)}

    cli = cli_on(db, env)

    failed = cli("run", "tests.examples.cli_flows:build", "--store", '{"n": 0}')
    assert failed.returncode == 1 and "transient failure" in failed.stderr
    run_id = re.search(r"run (cli-count-[0-9a-f]{8}) failed", failed.stderr).group(1)

    # No --flow: the ledger recorded the MODULE:BUILDER `pocoflow run` was given.
    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert '"n": 3' in resumed.stdout

    forked = cli("fork", run_id, "--from-step", "0")
    assert forked.returncode == 0, forked.stderr
    assert '"n": 3' in forked.stdout and run_id not in forked.stdout
    fork_id = re.search(r"run (cli-count-[0-9a-f]{8}): completed", forked.stdout).group(1)
    assert cli("fork", fork_id, "--from-step", "0").returncode == 0  # a fork records it too
    # --flow still wins over the recorded builder
    forked = cli("fork", run_id, "--from-step", "0", "--flow", "tests.examples.cli_flows:build")
    assert forked.returncode == 0, forked.stderr

    assert (
        cli(
            "fork", run_id, "--from-step", "99", "--flow", "tests.examples.cli_flows:build"
        ).returncode
        == 2
    )
    assert cli("resume", run_id, "--flows", "tests.examples.cli_flows").returncode == 2  # completed
    assert cli("resume", "cli-count-nope").returncode == 2


def test_cli_bad_ledger_path_is_bad_input(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.touch()
    bad = subprocess.run(
        [sys.executable, "-m", "pocoflow.cli", "run", "examples.hello:build_flow",
         "--store", '{"name": "x"}', "--db", str(blocker / "x.db")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and str(blocker) in bad.stderr


def test_demo_runs_the_article_pipeline_on_real_workers(tmp_path):
    # From a scratch dir (examples found on PYTHONPATH): the demo's .pocoflow/ state dir
    # lands there, not in the checkout.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "pocoflow.cli", "demo", "--workers", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert (tmp_path / ".pocoflow" / "demo.db").exists()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "summary: In short:" in done.stdout
    workers = set(re.findall(r"-> \S+ +[\d.]+ ms +on (\S+)", done.stdout))
    assert len(workers) >= 1 and "Summarise  -> done" in done.stdout
    # The fan-out: a live progress line up to every item, then tokens and cost by node.
    progress = [int(n) for n in re.findall(r"items done: (\d+)/50", done.stdout)]
    assert progress and progress == sorted(progress) and progress[-1] == 50, progress
    assert re.search(r"50 summaries in [\d.]+ s", done.stdout)
    assert re.search(r"SummarizeEach +50 calls +\d+ tokens in", done.stdout)
    total = re.search(r"total: (\d+) tokens, \$(\d+\.\d+)", done.stdout)
    assert total and int(total[1]) > 0 and float(total[2]) > 0, done.stdout


def test_fake_llm_failures_follow_the_attempt_not_the_process():
    from examples.fake_llm import FakeLLM, FakeLLMError

    local = FakeLLM(fail_first=1)
    with pytest.raises(FakeLLMError, match="try 1 of this prompt, attempt 1"):
        local.complete("draft: x")
    assert local.complete("draft: x").startswith("X:")  # an in-process retry succeeds
    # A worker retry is attempt 2, often in a fresh process: it succeeds there at once.
    assert FakeLLM(fail_first=1).complete("draft: x", attempt=2).startswith("X:")


def test_cli_resume_uses_the_recorded_builder_even_with_pocoflow_flows_set(tmp_path):
    """POCOFLOW_FLOWS is set in every deployment (the workers need it); a run started with
    ``pocoflow run MODULE:BUILDER`` of a builder no module registers must still resume
    from the builder the ledger recorded, without --flow."""
    (tmp_path / "plain_flows.py").write_text(
        "from pocoflow import Flow\n"
        "from tests.examples.cli_flows import Count\n\n"
        "def build():\n"
        "    node = Count()\n"
        "    node.then('again', node)\n"
        "    return Flow(start=node)\n"
    )
    db = str(tmp_path / "cli.db")
    marker = tmp_path / "fail-once"
    marker.touch()
    env = {
        **os.environ,
        "POCOFLOW_TEST_FAIL_ONCE": str(marker),
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
        "POCOFLOW_FLOWS": "tests.examples.cli_flows",  # registers other flows only
    }

    cli = cli_on(db, env)

    failed = cli("run", "plain_flows:build", "--store", '{"n": 0}')
    assert failed.returncode == 1 and "transient failure" in failed.stderr
    run_id = re.search(r"run (\S+) failed", failed.stderr).group(1)
    resumed = cli("resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert '"n": 3' in resumed.stdout
