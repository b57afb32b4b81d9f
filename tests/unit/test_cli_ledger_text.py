"""``pocoflow runs`` and ``show`` print ledger values (error messages, node and flow
names, signal keys) as text: a value that looks like Rich markup (``x[/y]``, ``[bold]``)
is shown as it is, never parsed, so one run's error message cannot crash the listing of
every run nor restyle the terminal."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner

from pocoflow.cli import main
from pocoflow.db import WorkflowDB

ERROR = "KeyError: 'x[/y]' [bold]loud"


def test_runs_and_show_print_markup_like_values_literally(tmp_path: Any) -> None:
    path = str(tmp_path / "ledger.db")
    db = WorkflowDB(path)
    db.create_run("odd-1", "[red]flow", initial_store={"k": "[/v]"})
    db.update_run("odd-1", status="failed", error_msg=ERROR, current_node="[/n]")
    db.save_event("odd-1", "node_error", step=0, node_name="[/n]", error_msg=ERROR)
    db.close()
    runs = CliRunner().invoke(main, ["runs", "--db", path], terminal_width=200)
    assert runs.exit_code == 0, runs.output
    assert "x[/y]" in runs.output and "[red]flow" in runs.output
    show = CliRunner().invoke(main, ["show", "odd-1", "--db", path], terminal_width=200)
    assert show.exit_code == 0, show.output
    assert ERROR in show.output and "[/n]" in show.output
