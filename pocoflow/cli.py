"""The ``pocoflow`` command: each command parses, calls one library function, formats.

Exit codes: 0 ok, 1 the run failed, 2 bad input (unknown run, malformed JSON, a target
that is not a flow builder).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from pocoflow.cli_worker import POOLS
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


def broker_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--broker",
        "broker_url",
        envvar="POCOFLOW_BROKER_URL",
        default=None,
        help="Celery broker URL (env POCOFLOW_BROKER_URL, default redis://localhost:6379/0).",
    )(func)


def cli_settings(db_url: str, broker_url: str | None = None, flows: str | None = None) -> Any:
    from pocoflow.settings import Settings

    try:
        return Settings.from_env(db_url=db_url, broker_url=broker_url, flows=flows or None)
    except ValueError as exc:
        raise BadInput(str(exc)) from None


class _cwd_on_path:
    """Flow modules usually live in the directory the command runs in."""

    def __enter__(self) -> None:
        sys.path.insert(0, ".")

    def __exit__(self, *exc: object) -> None:
        sys.path.remove(".")


@click.group(
    epilog='Examples:\n\n  pocoflow run examples.hello:build_flow --store \'{"name": "Ada"}\''
    "\n\n  pocoflow runs\n\n  pocoflow show hello-1a2b3c4d"
    "\n\n  pocoflow send approval-1a2b3c4d approved true"
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
        built.builder = target  # recorded with its runs: resume and fork find it there
        return built
    raise BadInput(f"{target} returned {type(built).__name__}, not a Flow")


def flow_for_run(db: Any, run_id: str, target: str | None, flows: str) -> Any:
    """The graph to continue ``run_id`` with: ``--flow MODULE:BUILDER``, else the builder
    the ledger recorded for a run the CLI started (``pocoflow run``), else the registry.

    The recorded builder wins over ``--flows``/``POCOFLOW_FLOWS``: that setting is
    exported wherever workers run, and the builder names the very graph the run used,
    which no registered module may build."""
    run = get_run_or_fail(db, run_id)
    target = target or run.get("builder")
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
    except (ValueError, OSError) as exc:
        raise BadInput(str(exc)) from None
    except Exception as exc:  # the driver could not reach the database
        raise BadInput(f"cannot open ledger {mask_url(db_url)}: {type(exc).__name__}") from None


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
    run_id = flow.last_run_id
    if flow.db_path and open_db(str(flow.db_path)).get_run(run_id)["status"] == "waiting":
        click.echo(
            f"run {run_id}: waiting for a value; send it with `pocoflow send {run_id} KEY "
            f"JSON`, then continue with `pocoflow resume {run_id}`"
        )
        return
    click.echo(f"run {run_id}: completed")
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
    open_db(str(flow.db_path))  # a bad ledger is bad input (2), found before any node runs
    finish_local(flow, lambda: flow.run(data))


@main.command(
    epilog="Examples:\n\n  pocoflow runs --limit 20\n\n"
    "  pocoflow runs --status failed,paused --flow article --since 2h --json"
)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--status", "statuses", default="", help="Only these statuses (comma-separated).")
@click.option("--flow", "flow_name", default=None, help="Only runs of this flow.")
@click.option("--since", default=None, help="Only runs started in the last 30m, 12h, 7d...")
@click.option("--json", "as_json", is_flag=True, help="One JSON array, for scripts.")
@db_option
def runs(
    limit: int,
    statuses: str,
    flow_name: str | None,
    since: str | None,
    as_json: bool,
    db_url: str,
) -> None:
    """List recent runs, newest first, with the tokens and cost each reported."""
    from datetime import UTC, datetime, timedelta

    from pocoflow.settings import parse_duration

    chosen = [s.strip() for s in statuses.split(",") if s.strip()]
    since_iso = None
    if since:
        try:
            age_s = parse_duration(since, "--since")
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        since_iso = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat()
    db = open_db(db_url)
    try:
        rows = db.list_runs(limit=limit, statuses=chosen, flow_name=flow_name, since=since_iso)
    except ValueError as exc:
        raise BadInput(f"--status: {exc}") from None
    spent = db.usage_by_run([row["run_id"] for row in rows])  # one grouped query
    if as_json:
        for row in rows:
            used = spent.get(row["run_id"])
            row["tokens"] = used["input_tokens"] + used["output_tokens"] if used else 0
            row["cost_usd"] = used["cost_usd"] if used else 0.0
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Run ids are what users copy into the next command: never cut, even on 80 columns
    # (no vertical rules, so the eight columns fit).
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True, pad_edge=False)
    table.add_column("run id", min_width=max((len(r["run_id"]) for r in rows), default=6))
    for name in ("flow", "status", "steps", "tokens", "cost $", "started", "error"):
        table.add_column(name)
    for row in rows:
        used = spent.get(row["run_id"])
        table.add_row(
            row["run_id"],
            row["flow_name"],
            row["status"],
            str(row["total_steps"] or 0),
            str(used["input_tokens"] + used["output_tokens"]) if used else "",
            f"{used['cost_usd']:.4f}" if used else "",
            (row["started_at"] or "")[:19],
            (row["error_msg"] or "")[:60],
        )
    Console(markup=False).print(table)


@main.command(epilog="Example: pocoflow show hello-1a2b3c4d")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@flows_option
@db_option
def show(run_id: str, as_json: bool, flows: str, db_url: str) -> None:
    """Show one run: its row, its events with timings and its latest Store.

    --flows imports the modules that register the Store's own classes, if any.
    """
    from pocoflow.registry import import_flow_modules

    with _cwd_on_path():
        import_flow_modules(flows)
    from rich.console import Console
    from rich.table import Table

    db = open_db(db_url)
    run = get_run_or_fail(db, run_id)
    if as_json:
        click.echo(show_json(db, run))
        return
    console = Console(markup=False)
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
        console.print(labelled(key, run.get(key)))
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
    usage_table(console, db.get_usage(run_id), run)
    for signal in db.get_signals(run_id):
        state = (
            "sent"
            if "value" in signal
            else "waited for"
            if signal["waiting_step"] is not None
            else "not sent"
        )
        console.print(labelled("signal", f"{signal['key']!r}: {state}", sep=" "))
    latest = db.latest_checkpoint(run_id)
    step = latest["step"] if latest else -1
    try:
        click.echo(store_json(db.load_checkpoint(run_id, step)))
    except TypeError as exc:  # a class this process has not registered
        click.echo(f"store of step {step} not shown: {exc}", err=True)


def labelled(label: str, value: Any, sep: str = ": ") -> Any:
    """``label`` in bold, then ``value`` as plain text. The CLI's consoles parse no Rich
    markup (``markup=False``): ledger values (error messages, node names, keys) are
    printed as they are, so an error quoting ``x[/y]`` neither crashes nor restyles."""
    from rich.text import Text

    return Text.assemble((label, "bold"), f"{sep}{value}")


def show_json(db: Any, run: dict[str, Any]) -> str:
    """``show --json``: the run row, its events, usage, signals (keys, and whether each was
    sent) and its latest Store, as one JSON object."""
    run_id = run["run_id"]
    latest = db.latest_checkpoint(run_id)
    step = latest["step"] if latest else -1
    try:
        store: Any = json.loads(store_json(db.load_checkpoint(run_id, step)))
    except TypeError as exc:  # a class this process has not registered
        store = {"error": f"store of step {step} not shown: {exc}"}
    signals = [
        {"key": s["key"], "sent": "value" in s, "waiting_step": s.get("waiting_step")}
        for s in db.get_signals(run_id)
    ]
    document = {
        "run": run,
        "events": db.get_events(run_id),
        "usage": db.get_usage(run_id),
        "signals": signals,
        "store_step": step,
        "store": store,
    }
    return json.dumps(document, indent=2, default=str, ensure_ascii=False)


def usage_table(console: Any, usage: dict[str, Any], run: dict[str, Any]) -> None:
    """The run's ``report_usage`` totals by node, and its budget, if it has either."""
    from rich.table import Table

    budget = [
        f"{name}={run[name]:g}"
        for name in ("max_tokens", "max_cost_usd")
        if run.get(name) is not None
    ]
    if budget:
        console.print(labelled("budget", ", ".join(budget)))
    if not usage["calls"]:
        return
    table = Table("node", "calls", "input tokens", "output tokens", "cost $", title="usage")
    rows = [*usage["by_node"].items(), ("total", usage)]
    for name, part in rows:
        table.add_row(
            name,
            str(part["calls"]),
            str(part["input_tokens"]),
            str(part["output_tokens"]),
            f"{part['cost_usd']:.6f}",
        )
    console.print(table)


@main.command(
    epilog="Examples:\n\n  pocoflow resume article-1a2b3c4d --flows examples.article"
    "\n\n  pocoflow resume article-1a2b3c4d --force   # accept a changed graph"
    "\n\n  pocoflow resume article-1a2b3c4d --max-tokens 200000   # a higher budget"
)
@click.argument("run_id")
@click.option("--flow", "target", help="MODULE:BUILDER that builds the run's graph (local runs).")
@click.option("--force", is_flag=True, help="Distributed run: accept the flow's current graph.")
@click.option("--wait/--no-wait", default=True, help="Distributed run: wait for the end.")
@click.option(
    "--max-tokens", type=click.IntRange(0), default=None, help="Raise the run's token budget."
)
@click.option(
    "--max-cost-usd",
    type=click.FloatRange(0),
    default=None,
    help="Raise the run's cost budget (USD).",
)
@flows_option
@broker_option
@db_option
def resume(
    run_id: str,
    target: str | None,
    force: bool,
    wait: bool,
    max_tokens: int | None,
    max_cost_usd: float | None,
    flows: str,
    broker_url: str | None,
    db_url: str,
) -> None:
    """Continue a failed, cancelled, paused or interrupted run from its last checkpoint.

    A run submitted to workers is sent back to them; a run that ran in a process is
    continued in this one.
    """
    db = open_db(db_url)
    run = get_run_or_fail(db, run_id)
    # The budget first, in the ledger: whoever goes on with the run reads it there.
    db.set_budget(run_id, max_tokens=max_tokens, max_cost_usd=max_cost_usd)
    if run.get("queue"):
        from pocoflow.distributed.client import resume_run
        from pocoflow.registry import import_flow_modules

        settings = cli_settings(db_url, broker_url, flows)
        if run["status"] in ("queued", "running", "waiting") and run.get("control") == "pause":
            from pocoflow.distributed.client import attach

            attach(run_id, settings=settings).resume()  # not parked yet: withdraw the request
            click.echo(f"run {run_id}: pause withdrawn; it goes on")
            return
        if force:
            with _cwd_on_path():
                import_flow_modules(settings.flows)
        try:
            handle = resume_run(run_id, force=force, settings=settings)
        except (KeyError, ValueError, LookupError) as exc:
            raise BadInput(str(exc.args[0] if exc.args else exc)) from None
        click.echo(f"run {run_id}: resumed on the workers")
        if wait:
            wait_for(handle)
        return
    if run.get("control") == "pause":  # held by a live process: let it go on
        db.update_run_if(run_id, control_in=("pause",), control=None)
        click.echo(f"run {run_id}: resume requested; the process holding it goes on")
        return
    flow = flow_for_run(db, run_id, target, flows)
    flow.db_path = db_url
    finish_local(flow, lambda: flow.resume(run_id))


@main.command(
    epilog="Examples:\n\n  pocoflow fork article-1a2b3c4d --from-step 2 --wait"
    "\n\n  pocoflow fork article-1a2b3c4d --from-step 0 --workers --flows examples.article"
    "\n\n  pocoflow fork article-1a2b3c4d --from-step 2 --local --flows examples.article"
)
@click.argument("run_id")
@click.option("--from-step", "from_step", required=True, type=int, help="Checkpoint to fork from.")
@click.option(
    "--workers/--local",
    "on_workers",
    default=None,
    help="Run the fork on the workers / in this process (default: where RUN ran; in this "
    "process with --flow).",
)
@click.option(
    "--flow", "target", help="MODULE:BUILDER that builds the run's graph (implies --local)."
)
@click.option("--run-id", "new_run_id", default=None, help="Run id of the fork.")
@click.option("--queue", default=None, help="Workers: broker queue of the fork (default RUN's).")
@click.option("--wait/--no-wait", default=None, help="Workers: follow the fork until it ends.")
@flows_option
@broker_option
@db_option
def fork(
    run_id: str,
    from_step: int,
    on_workers: bool | None,
    target: str | None,
    new_run_id: str | None,
    queue: str | None,
    wait: bool | None,
    flows: str,
    broker_url: str | None,
    db_url: str,
) -> None:
    """Start a new run from checkpoint N of RUN; RUN itself is left untouched.

    A run submitted to the workers is forked onto them (the fork's id is printed at once);
    a run that ran in a process is forked in this one, as is any run given --flow.
    --workers / --local choose.
    """
    if new_run_id is not None and not new_run_id.strip():
        raise BadInput("--run-id is empty: give the fork's run id, or leave --run-id out")
    db = open_db(db_url)
    run = get_run_or_fail(db, run_id)
    if on_workers is None:
        # Submitted runs record their queue; --flow builds the graph here, as it always did.
        on_workers = bool(run.get("queue")) and not target
    if not on_workers:
        ignored = [n for n, v in (("--queue", queue), ("--wait/--no-wait", wait)) if v is not None]
        if ignored:
            raise BadInput(
                f"{' and '.join(ignored)}: only for a fork on the workers (--workers); a fork "
                "in this process (--local, --flow) runs to its end here"
            )
        flow = flow_for_run(db, run_id, target, flows)
        flow.db_path = db_url
        finish_local(flow, lambda: flow.fork(run_id, from_step, new_run_id=new_run_id))
        return
    if target:
        raise BadInput(
            "--flow builds the graph of a fork in this process (--local); the workers find "
            "the graph by the run's registered flow name (--flows imports its module)"
        )
    from pocoflow.distributed.client import fork_run

    settings = cli_settings(db_url, broker_url, flows)
    _refuse_unreachable_broker(settings.broker_url, "no fork was recorded")
    try:
        with _cwd_on_path():
            handle = fork_run(
                run_id, from_step, new_run_id=new_run_id, queue=queue, settings=settings
            )
    except (KeyError, ValueError, TypeError) as exc:  # TypeError: a Store off the schema
        raise BadInput(str(exc.args[0] if exc.args else exc)) from None
    click.echo(handle.run_id)
    if wait:
        wait_for(handle)


# ── distributed runs ─────────────────────────────────────────────────────────


#: Statuses only a person moves a run out of (resume, send): following it stops there.
HELD_STATUSES = ("paused", "waiting")


def held_reason(db: Any, run: dict[str, Any]) -> str:
    """What a paused or waiting run needs, from its latest event saying why it stopped."""
    from pocoflow.hooks import RUN_PAUSED, RUN_WAITING
    from pocoflow.usage import BUDGET_EXCEEDED

    run_id = run["run_id"]
    events = db.get_events(run_id)
    held = [i for i, e in enumerate(events) if e["event"] in (RUN_PAUSED, RUN_WAITING)]
    last = events[held[-1]] if held else None
    if run["status"] == "waiting":
        what = f" ({last['error_msg']})" if last and last["event"] == RUN_WAITING else ""
        return f"run {run_id} waits{what}: send it with `pocoflow send {run_id} KEY JSON`"
    # A budget pause records why just before it pauses the run.
    before = events[held[-1] - 1] if held and held[-1] > 0 else None
    if last and last["event"] == RUN_PAUSED and before and before["event"] == BUDGET_EXCEEDED:
        return str(before["error_msg"])
    return f"run {run_id} is paused: `pocoflow resume {run_id}` lets it go on"


def items_progress(db: Any, run_id: str, step: int) -> str:
    """``, items [####      ] 12/30`` while step ``step`` is a fan-out; else ``""``."""
    join = db.get_join(run_id, step)
    if not join or not join["total"]:
        return ""
    done, total = join["done"], join["total"]
    bar = "#" * (done * 20 // total)
    return f", items [{bar:<20}] {done}/{total}"


def wait_for(handle: Any) -> None:
    """Follow a distributed run with a progress line until it ends (exit 1 if it fails)
    or is held: paused or waiting for a value, which nobody but a person changes."""
    from rich.console import Console

    from pocoflow.runner import FINISHED_STATUSES

    console = Console(stderr=True, markup=False)
    with console.status(f"run {handle.run_id}: waiting for the workers") as status:
        while True:
            run = handle._db.get_run(handle.run_id)
            step = run["total_steps"] or 0
            status.update(
                f"run {handle.run_id}: {run['status']}, {step} steps, "
                f"at {run['current_node'] or '-'}{items_progress(handle._db, run['run_id'], step)}"
            )
            if run["status"] in FINISHED_STATUSES or run["status"] in HELD_STATUSES:
                break
            time.sleep(0.1)
    click.echo(f"run {handle.run_id}: {run['status']}")
    if run["status"] in HELD_STATUSES:
        click.echo(held_reason(handle._db, run), err=True)
    if run["status"] == "failed":
        click.echo(f"error: {run['error_msg']}", err=True)
        sys.exit(EXIT_RUN_FAILED)
    if run["status"] == "completed":
        click.echo(store_json(handle.store()))


@main.command(
    epilog='Example: pocoflow submit article --store \'{"topic": "tides"}\' --flows examples.article'
)
@click.argument("flow_name")
@click.option("--store", "store_text", help="Initial Store as JSON, or @file.json.")
@click.option("--run-id", default=None, help="Run id to use (default <flow>-<8 hex>).")
@click.option("--queue", default=None, help="Broker queue for the run's steps.")
@click.option("--wait/--no-wait", default=False, help="Follow the run until it ends.")
@flows_option
@broker_option
@db_option
def submit(
    flow_name: str,
    store_text: str | None,
    run_id: str | None,
    queue: str | None,
    wait: bool,
    flows: str,
    broker_url: str | None,
    db_url: str,
) -> None:
    """Start registered flow FLOW_NAME on the workers; prints the run id at once."""
    from pocoflow.distributed.client import submit as submit_run
    from pocoflow.registry import UnknownFlowError, build_flow, import_flow_modules

    data = parse_store(store_text)
    settings = cli_settings(db_url, broker_url, flows)
    try:
        with _cwd_on_path():
            import_flow_modules(settings.flows)
        flow = build_flow(flow_name)
    except (ImportError, UnknownFlowError) as exc:
        raise BadInput(str(exc)) from None
    _refuse_unreachable_broker(settings.broker_url, "nothing was submitted")
    try:
        handle = submit_run(flow, data, run_id=run_id, queue=queue, settings=settings)
    except (TypeError, ValueError) as exc:
        raise BadInput(str(exc)) from None
    click.echo(handle.run_id)
    if wait:
        wait_for(handle)


def _refuse_unreachable_broker(broker_url: str, outcome: str) -> None:
    """Bad input before a run is recorded when the broker does not answer (see
    ``broker_refusal``)."""
    from pocoflow.doctor import broker_refusal

    refusal = broker_refusal(broker_url, outcome)
    if refusal:
        raise BadInput(refusal)


def _control(verb: str) -> Callable[..., None]:
    def command(run_id: str, db_url: str, broker_url: str | None, **options: Any) -> None:
        from pocoflow.distributed.client import attach

        settings = cli_settings(db_url, broker_url)
        try:
            handle = attach(run_id, settings=settings)
        except KeyError as exc:
            raise BadInput(str(exc.args[0])) from None
        getattr(handle, verb)(**options)
        click.echo(f"run {run_id}: {verb} requested")

    return command


@main.command(
    epilog="Examples:\n\n  pocoflow send approval-1a2b3c4d approved true"
    '\n\n  pocoflow send approval-1a2b3c4d review \'{"ok": false, "note": "too long"}\''
)
@click.argument("run_id")
@click.argument("key")
@click.argument("value_json", metavar="JSON")
@broker_option
@db_option
def send(run_id: str, key: str, value_json: str, broker_url: str | None, db_url: str) -> None:
    """Send the JSON value for KEY to RUN: the node waiting in wait_for(KEY) goes on.

    A run on the workers continues by itself; a run that ran in a process stays waiting
    until `pocoflow resume RUN`. Each key takes one value: a second send is refused.
    """
    from pocoflow.distributed.client import send as send_value
    from pocoflow.errors import SendRefused

    try:
        value = json.loads(value_json)
    except ValueError as exc:
        raise BadInput(f"JSON for {key!r} is not valid JSON: {exc}") from None
    settings = cli_settings(db_url, broker_url)
    try:
        status = send_value(run_id, key, value, settings=settings)
    except KeyError as exc:  # UnknownRunError
        raise BadInput(str(exc.args[0] if exc.args else exc)) from None
    except (SendRefused, ValueError) as exc:
        raise BadInput(str(exc)) from None
    click.echo(f"run {run_id}: value sent for {key!r}; the run is {status}")


@main.command(epilog="Example: pocoflow cancel article-1a2b3c4d --terminate")
@click.argument("run_id")
@click.option("--terminate", is_flag=True, help="Also stop the step running now.")
@broker_option
@db_option
def cancel(run_id: str, terminate: bool, broker_url: str | None, db_url: str) -> None:
    """Cancel RUN before its next node starts."""
    _control("cancel")(run_id, db_url, broker_url, terminate=terminate)


@main.command(epilog="Example: pocoflow pause article-1a2b3c4d")
@click.argument("run_id")
@broker_option
@db_option
def pause(run_id: str, broker_url: str | None, db_url: str) -> None:
    """Hold RUN before its next node; `pocoflow resume RUN` lets it go on."""
    _control("pause")(run_id, db_url, broker_url)


@main.command(epilog="Example: pocoflow prune --older-than 30d --status completed,cancelled")
@click.option("--older-than", "older_than", required=True, help="Age: 30d, 12h, 90m, or seconds.")
@click.option(
    "--status",
    "statuses",
    default="completed,failed,cancelled",
    show_default=True,
    help="Comma-separated finished statuses to delete.",
)
@click.option("--dry-run", is_flag=True, help="Print how many runs would go; delete nothing.")
@click.option(
    "--batch",
    default=50,  # pocoflow.ledger.prune.DEFAULT_BATCH (not imported: --help stays light)
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Runs per delete transaction.",
)
@db_option
def prune(older_than: str, statuses: str, dry_run: bool, batch: int, db_url: str) -> None:
    """Delete finished runs older than --older-than, with all their rows, in batches.

    Never touches a queued, running, paused or waiting run; each batch is its own short
    transaction, so running steps are not held up.
    """
    from pocoflow.settings import parse_duration

    try:
        age_s = parse_duration(older_than, "--older-than")
        chosen = tuple(s.strip() for s in statuses.split(",") if s.strip())
        db = open_db(db_url)
        count = db.prune_runs(age_s, statuses=chosen, dry_run=dry_run, batch=batch)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {count} runs ({', '.join(chosen)}) older than {older_than}")


@main.command(
    epilog="Examples: pocoflow worker --flows examples.article --concurrency 4\n\n"
    "pocoflow worker --flows examples.article --pool threads --concurrency 8"
)
@flows_option
@click.option("--concurrency", type=click.IntRange(1, 512), default=None, help="Pool size.")
@click.option("--queues", default=None, help="Comma-separated queues (default pocoflow).")
@click.option(
    "--pool",
    type=click.Choice(POOLS),
    default=None,
    help="Celery pool: prefork (default; CPU-bound nodes), threads (I/O-bound nodes such "
    "as LLM calls: many steps and items per process), solo (one at a time).",
)
@click.option("--loglevel", default="info", show_default=True)
def worker(
    flows: str, concurrency: int | None, queues: str | None, pool: str | None, loglevel: str
) -> None:
    """Run a Celery worker for PocoFlow steps (celery -A workers.app worker)."""
    from pocoflow.cli_worker import run_worker

    run_worker(flows or None, concurrency, queues, loglevel, pool=pool)


@main.command(
    epilog="Examples: pocoflow flower --port 5555; "
    "FLOWER_BASIC_AUTH=admin:secret pocoflow flower --address 0.0.0.0",
    context_settings={"ignore_unknown_options": True},
)
@click.option("--port", default=5555, show_default=True, type=int)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (0.0.0.0 in a container; put auth in front first).",
)
@broker_option
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int, address: str, broker_url: str | None, flower_args: tuple[str, ...]) -> None:
    """Watch workers and step tasks in Flower (celery -A workers.app flower).

    Each step is listed as FLOW.NODE with its run id, step, node and attempt; any
    further arguments go to Flower as they are."""
    import os

    from pocoflow.cli_worker import run_flower

    if broker_url:
        os.environ["POCOFLOW_BROKER_URL"] = broker_url
    run_flower(port=port, address=address, extra=flower_args)


@main.command(
    epilog="Examples:\n\n  pocoflow monitor --db sqlite:///pocoflow.db --port 8501"
    "\n\n  POCOFLOW_MONITOR_TOKEN=s3cret pocoflow monitor --allow-control"
)
@click.option("--port", default=8501, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--allow-control",
    is_flag=True,
    help="Offer cancel/pause/resume/send on run pages; each needs the token of "
    "POCOFLOW_MONITOR_TOKEN typed into the page.",
)
@click.option(
    "--address",
    envvar="STREAMLIT_SERVER_ADDRESS",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (env STREAMLIT_SERVER_ADDRESS); 0.0.0.0 serves every "
    "Store value to the network, so put auth in front first.",
)
@db_option
def monitor(port: int, allow_control: bool, address: str, db_url: str) -> None:
    """Watch the ledger's runs in the Streamlit monitor (streamlit run pocoflow/ui/monitor.py)."""
    import importlib.util
    import os
    from pathlib import Path

    if importlib.util.find_spec("streamlit") is None:
        raise BadInput("The monitor needs Streamlit: pip install 'pocoflow[ui]'")
    if allow_control and not os.environ.get("POCOFLOW_MONITOR_TOKEN"):
        raise BadInput("--allow-control needs a token: set POCOFLOW_MONITOR_TOKEN")
    script = Path(__file__).resolve().parent / "ui" / "monitor.py"
    argv = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port)]
    # Loopback unless told (Streamlit's own default is every interface), as `flower`.
    argv += ["--server.address", address, "--server.headless", "true", "--"]
    argv += ["--allow-control"] if allow_control else []
    # The ledger URL goes in the environment, not the command line: ``ps`` shows every
    # process's arguments to every user of the machine, and the URL may hold a password.
    env = {**os.environ, "POCOFLOW_DB_URL": db_url}
    click.echo(f"monitor of {mask_url(db_url)} on http://{address}:{port}")
    os.execve(sys.executable, argv, env)


@main.command(epilog="Example: pocoflow doctor --db postgresql://ledger-host/pocoflow")
@broker_option
@db_option
def doctor(broker_url: str | None, db_url: str) -> None:
    """Check the ledger, the broker, the flags' Redis and the live workers: one line
    each, saying what is wrong. Exit 1 when a check fails."""
    from pocoflow.doctor import run_checks

    checks = run_checks(cli_settings(db_url, broker_url))
    for check in checks:
        click.echo(check.line())
    if not all(check.ok for check in checks):
        sys.exit(EXIT_RUN_FAILED)


@main.command(epilog='Example (bash, in ~/.bashrc): eval "$(pocoflow completion bash)"')
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (commands, options, file names)."""
    from click.shell_completion import get_completion_class

    complete = get_completion_class(shell)
    assert complete is not None  # the three choices are click's own
    click.echo(complete(main, {}, "pocoflow", "_POCOFLOW_COMPLETE").source())


@main.command(epilog="Example: pocoflow demo --workers 2")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 8))
@click.option("--topic", default="durable workflows", show_default=True)
def demo(workers: int, topic: str) -> None:
    """Run the article pipeline on a private Redis and worker processes started here."""
    from pocoflow.demo import run_demo

    try:
        run_demo(workers=workers, topic=topic, echo=click.echo)
    except FileNotFoundError as exc:
        raise BadInput(str(exc)) from None
    except Exception as exc:
        click.echo(f"demo failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_RUN_FAILED)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="pocoflow")  # as the console script: usage lines, completion variable
