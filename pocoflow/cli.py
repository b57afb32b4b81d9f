"""The ``pocoflow`` command: each command parses, calls one library function, formats.

Exit codes: 0 ok, 1 the run failed, 2 bad input (unknown run, malformed JSON, a target
that is not a flow builder).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from pocoflow.settings import DEFAULT_DB_URL, mask_url

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2


class BadInput(click.ClickException):
    exit_code = EXIT_BAD_INPUT


def db_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--db",
        "db_url",
        envvar="POCOFLOW_DB_URL",
        default=DEFAULT_DB_URL,
        show_default=True,
        help="Ledger: a SQLite path or an SQLAlchemy URL (env POCOFLOW_DB_URL).",
    )(func)


def flows_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--flows",
        envvar="POCOFLOW_FLOWS",
        default="",
        help="Comma-separated modules that register flows with @flow (env POCOFLOW_FLOWS).",
    )(func)


@click.group(
    epilog='Examples:\n\n  pocoflow run examples.hello:build_flow --store \'{"name": "Ada"}\''
    "\n\n  pocoflow runs\n\n  pocoflow show hello-1a2b3c4d"
)
@click.version_option(package_name="pocoflow")
def main() -> None:
    """PocoFlow: run, inspect, resume and fork LLM workflows."""


# ── helpers ──────────────────────────────────────────────────────────────────


def parse_store(text: str | None) -> dict[str, Any]:
    """``--store`` is JSON, or ``@path`` to a JSON file; it must be an object."""
    if not text:
        return {}
    source = "--store"
    if text.startswith("@"):
        source = text[1:]
        try:
            with open(source, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise BadInput(f"cannot read store file {source!r}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise BadInput(f"{source} must be a JSON object, got {type(data).__name__}")
    return data


def load_builder(target: str) -> Callable[..., Any]:
    """``MODULE:BUILDER`` named on the command line (never from a message)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise BadInput(f"expected MODULE:BUILDER, got {target!r}")
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadInput(f"cannot import module {module_name!r}: {exc}") from None
    finally:
        sys.path.remove(".")
    builder = getattr(module, attr, None)
    if builder is None:
        raise BadInput(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(builder):
        raise BadInput(f"{target} is not callable")
    return builder


def build(target: str) -> Any:
    from pocoflow.flow import Flow

    built = load_builder(target)()
    if isinstance(built, Flow):
        return built
    raise BadInput(f"{target} returned {type(built).__name__}, not a Flow")


def flow_for_run(db: Any, run_id: str, target: str | None, flows: str) -> Any:
    """The graph to continue ``run_id`` with: ``--flow MODULE:BUILDER`` or the registry."""
    run = get_run_or_fail(db, run_id)
    if target:
        return build(target)
    from pocoflow.registry import UnknownFlowError, build_flow, import_flow_modules

    sys.path.insert(0, ".")
    try:
        import_flow_modules(flows)
    except ImportError as exc:
        raise BadInput(f"cannot import flow module: {exc}") from None
    finally:
        sys.path.remove(".")
    try:
        return build_flow(run["flow_name"])
    except UnknownFlowError as exc:
        raise BadInput(f"{exc}; or pass --flow MODULE:BUILDER") from None


def open_db(db_url: str) -> Any:
    from pocoflow.db import WorkflowDB

    try:
        return WorkflowDB(db_url)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


def get_run_or_fail(db: Any, run_id: str) -> dict[str, Any]:
    run = db.get_run(run_id)
    if run is None:
        raise BadInput(f"unknown run id {run_id!r} in {mask_url(str(db.url))}")
    return run


def live_lines(flow: Any) -> None:
    """One line per node as it ends: the progress of an in-process run."""

    def node_end(name: str, action: str | None, elapsed: float, store: Any) -> None:
        click.echo(
            f"  {click.style('ok', fg='green')} {name} -> {action}  ({elapsed * 1000:.1f} ms)"
        )

    def node_error(name: str, exc: BaseException, store: Any) -> None:
        click.echo(f"  {click.style('!!', fg='red')} {name}: {type(exc).__name__}: {exc}")

    flow.on("node_end", node_end).on("node_error", node_error)


def store_json(store: Any) -> str:
    from pocoflow import codec

    return json.dumps(
        {k: json.loads(codec.encode(v, key=k)) for k, v in store.items()},
        indent=2,
        ensure_ascii=False,
    )


def finish_local(flow: Any, runner: Callable[[], Any]) -> None:
    from pocoflow.flow import RunSetupError

    live_lines(flow)
    try:
        store = runner()
    except RunSetupError as exc:
        raise BadInput(str(exc)) from None
    except Exception as exc:
        click.echo(f"run {flow.last_run_id} failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_RUN_FAILED)
    click.echo(f"run {flow.last_run_id}: completed")
    click.echo(store_json(store))


# ── commands ─────────────────────────────────────────────────────────────────


@main.command(epilog='Example: pocoflow run examples.hello:build_flow --store \'{"name": "Ada"}\'')
@click.argument("target")
@click.option("--store", "store_text", help="Initial Store as JSON, or @file.json.")
@db_option
def run(target: str, store_text: str | None, db_url: str) -> None:
    """Run the flow built by MODULE:BUILDER in this process, a line per node."""
    data = parse_store(store_text)
    flow = build(target)
    if flow.db_path is None:
        flow.db_path = db_url
    finish_local(flow, lambda: flow.run(data))


@main.command(epilog="Example: pocoflow runs --limit 20")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@db_option
def runs(limit: int, db_url: str) -> None:
    """List recent runs, newest first."""
    from rich.console import Console
    from rich.table import Table

    table = Table("run id", "flow", "status", "steps", "started", "error")
    for row in open_db(db_url).list_runs(limit=limit):
        table.add_row(
            row["run_id"],
            row["flow_name"],
            row["status"],
            str(row["total_steps"] or 0),
            (row["started_at"] or "")[:19],
            (row["error_msg"] or "")[:60],
        )
    Console().print(table)


@main.command(epilog="Example: pocoflow show hello-1a2b3c4d")
@click.argument("run_id")
@db_option
def show(run_id: str, db_url: str) -> None:
    """Show one run: its row, its events with timings and its latest Store."""
    from rich.console import Console
    from rich.table import Table

    db = open_db(db_url)
    run = get_run_or_fail(db, run_id)
    console = Console()
    for key in (
        "run_id",
        "flow_name",
        "status",
        "started_at",
        "completed_at",
        "total_steps",
        "current_node",
        "error_msg",
    ):
        console.print(f"[bold]{key}[/bold]: {run.get(key)}")
    table = Table("step", "event", "node", "action", "ms", "error")
    for event in db.get_events(run_id):
        elapsed = event.get("elapsed_ms")
        table.add_row(
            "" if event["step"] is None else str(event["step"]),
            event["event"],
            event["node_name"] or "",
            event["action"] or "",
            "" if elapsed is None else f"{elapsed:.1f}",
            (event["error_msg"] or "")[:60],
        )
    console.print(table)
    latest = db.latest_checkpoint(run_id)
    store = db.load_checkpoint(run_id, latest["step"] if latest else -1)
    click.echo(store_json(store))


@main.command(epilog="Example: pocoflow resume article-1a2b3c4d --flows examples.article")
@click.argument("run_id")
@click.option("--flow", "target", help="MODULE:BUILDER that builds the run's graph.")
@flows_option
@db_option
def resume(run_id: str, target: str | None, flows: str, db_url: str) -> None:
    """Continue a failed, cancelled or interrupted run from its last checkpoint."""
    db = open_db(db_url)
    flow = flow_for_run(db, run_id, target, flows)
    flow.db_path = db_url
    finish_local(flow, lambda: flow.resume(run_id))


@main.command(
    epilog="Example: pocoflow fork article-1a2b3c4d --from-step 2 --flows examples.article"
)
@click.argument("run_id")
@click.option("--from-step", "from_step", required=True, type=int, help="Checkpoint to fork from.")
@click.option("--flow", "target", help="MODULE:BUILDER that builds the run's graph.")
@flows_option
@db_option
def fork(run_id: str, from_step: int, target: str | None, flows: str, db_url: str) -> None:
    """Start a new run from checkpoint N of RUN; RUN itself is left untouched."""
    db = open_db(db_url)
    flow = flow_for_run(db, run_id, target, flows)
    flow.db_path = db_url
    finish_local(flow, lambda: flow.fork(run_id, from_step))


if __name__ == "__main__":  # pragma: no cover
    main()
