"""``pocoflow fork`` options on both ledgers, in process (CliRunner): where a fork runs
(--flow implies --local), options that would be ignored are refused, and the help's
examples name runs of the flows their --flows module registers."""

from __future__ import annotations

import importlib
import re
from typing import Any

import pytest
from click.testing import CliRunner

from pocoflow import registry
from pocoflow.cli import fork as fork_command, main as cli
from pocoflow.db import WorkflowDB
from pocoflow.registry import get_builder
from tests.examples.cli_flows import build

BUILDER = "tests.examples.cli_flows:build"


def counted(ledger_url: str) -> str:
    """A completed run of flow cli-count (steps 0..2) in this process."""
    flow = build()
    flow.db_path = ledger_url
    flow.run({"n": 0})
    assert flow.last_run_id is not None
    return flow.last_run_id


def fork(ledger_url: str, *args: str) -> Any:
    return CliRunner().invoke(cli, ["fork", *args, "--db", ledger_url])


def test_flow_without_workers_forks_a_submitted_run_here(ledger_url: str) -> None:
    """Before --workers existed, --flow forked any run in this process: it still does."""
    parent = counted(ledger_url)
    db = WorkflowDB(ledger_url)
    db.update_run(parent, queue="pocoflow")  # as a submitted run records it
    done = fork(ledger_url, parent, "--from-step", "0", "--flow", BUILDER)
    assert done.exit_code == 0, done.output
    assert '"n": 3' in done.output
    fork_id = re.search(r"run (cli-count-[0-9a-f]{8}): completed", done.output).group(1)
    assert db.get_run(fork_id)["queue"] is None  # ran here, not queued for workers
    refused = fork(ledger_url, parent, "--from-step", "0", "--flow", BUILDER, "--workers")
    assert refused.exit_code == 2 and "--flow builds the graph" in refused.output
    db.close()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--queue", "q2"], "--queue"),
        (["--wait"], "--wait/--no-wait"),
        (["--no-wait"], "--wait/--no-wait"),
        (["--queue", "q2", "--flow", BUILDER], "--queue"),
    ],
)
def test_workers_options_of_a_local_fork_are_refused(
    ledger_url: str, options: list[str], named: str
) -> None:
    parent = counted(ledger_url)
    refused = fork(ledger_url, parent, "--from-step", "0", "--local", *options)
    assert refused.exit_code == 2, refused.output
    assert named in refused.output and "only for a fork on the workers" in refused.output
    db = WorkflowDB(ledger_url)
    assert [r["run_id"] for r in db.list_runs(limit=10)] == [parent]  # no fork
    db.close()


def test_an_empty_run_id_is_refused(ledger_url: str) -> None:
    parent = counted(ledger_url)
    for where in ("--local", "--workers"):
        refused = fork(ledger_url, parent, "--from-step", "0", "--run-id", "", where)
        assert refused.exit_code == 2 and "--run-id is empty" in refused.output, refused.output
    db = WorkflowDB(ledger_url)
    assert [r["run_id"] for r in db.list_runs(limit=10)] == [parent]
    db.close()


def test_the_help_examples_fork_runs_of_the_flows_they_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each example's run id is a run of a flow the module of its --flows registers
    (the workers and the local fork find the graph by that name): in a registry holding
    only what that module registers."""
    examples = [line.strip() for line in (fork_command.epilog or "").splitlines()]
    examples = [line.split() for line in examples if line.startswith("pocoflow fork")]
    with_flows = [words for words in examples if "--flows" in words]
    assert len(with_flows) >= 2
    for words in with_flows:
        module = importlib.import_module(words[words.index("--flows") + 1])
        monkeypatch.setattr(registry, "_BUILDERS", {})
        importlib.reload(module)
        get_builder(words[2].rsplit("-", 1)[0])  # UnknownFlowError: the example cannot work
