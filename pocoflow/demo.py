"""``pocoflow demo``: the article pipeline on real workers, with nothing set up by hand.

Starts a private Redis and worker processes, submits ``examples.article`` with a SQLite
ledger under ``.pocoflow/``, shows each step as the ledger records it, prints the result
and the commands to look further, and stops what it started.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pocoflow.devcluster import local_cluster
from pocoflow.settings import Settings, mask_url

DEMO_FLOWS = "examples.article,examples.summarize"
#: The fan-out part: this many documents, each one simulated LLM call of this latency.
DOCUMENTS = 50
LLM_LATENCY_S = 0.2
#: Item slots per worker (threads: the calls wait on the network, not the CPU).
THREADS = 4


def run_demo(
    *,
    workers: int = 2,
    topic: str = "durable workflows",
    db_url: str | None = None,
    state_dir: Path | None = None,
    timeout: float = 120.0,
    echo: Callable[[str], None] = print,
) -> str:
    """Run the demo; returns the run id. Raises ``RuntimeError`` if the run fails."""
    root = Path.cwd()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if importlib.util.find_spec("examples") is None:
        raise FileNotFoundError(
            "pocoflow demo runs examples/article.py: start it from the repository root (make demo)"
        )
    state_dir = state_dir or root / ".pocoflow"
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite:///{state_dir / 'demo.db'}"

    echo(
        f"starting a private Redis and {workers} workers x {THREADS} threads "
        f"(logs in {state_dir / 'logs'})"
    )
    started = time.monotonic()
    latency = {"POCOFLOW_EXAMPLE_LLM_LATENCY": str(LLM_LATENCY_S)}
    with local_cluster(
        db_url,
        DEMO_FLOWS,
        workers=workers,
        cwd=root,
        log_dir=state_dir / "logs",
        concurrency=THREADS,
        pool="threads",
        env=latency,
    ) as (redis, procs):
        echo(
            f"ready in {time.monotonic() - started:.1f}s: Redis {redis.url}, workers "
            + ", ".join(f"{w.name} (pid {w.pid})" for w in procs)
        )
        from examples.article import build_article_flow
        from pocoflow.distributed.client import submit

        settings = Settings(db_url=db_url, broker_url=redis.url)
        handle = submit(build_article_flow(), {"topic": topic}, settings=settings)
        echo(f"submitted run {handle.run_id}; ledger {mask_url(db_url)}")
        _follow(handle, settings, timeout, echo)
        store = handle.wait(timeout=timeout)
        echo("")
        echo(f"summary: {store['summary']}")
        echo(f"sections: {', '.join(store['sections'])}; review rounds: {store['reviews']}")
        echo("")
        fan_out = _fan_out(settings, workers, timeout, echo)
    echo("")
    echo("look further:")
    echo(f"  pocoflow show {handle.run_id} --db {mask_url(db_url)}")
    echo(f"  pocoflow show {fan_out} --db {mask_url(db_url)}   (the fan-out, its cost by node)")
    echo(f"  pocoflow runs --db {mask_url(db_url)}")
    echo("  with your own Redis and workers: pocoflow worker --flows examples.article,")
    echo('  pocoflow submit article --store \'{"topic": "tides"}\' --wait, pocoflow flower')
    return handle.run_id


def _fan_out(settings: Settings, workers: int, timeout: float, echo: Callable[[str], None]) -> str:
    """The summariser over ``DOCUMENTS`` documents: one task per document spread over
    the workers, a live line of items done, then tokens and cost by node."""
    from examples.summarize import build_summarize_flow, documents
    from pocoflow.distributed.client import submit

    echo(
        f"fan-out: summarising {DOCUMENTS} documents ({LLM_LATENCY_S:g} s per simulated LLM "
        f"call) on {workers} workers, one task per document"
    )
    started = time.monotonic()
    handle = submit(build_summarize_flow(), {"documents": documents(DOCUMENTS)}, settings=settings)
    _progress(handle, settings, timeout, echo)
    store = handle.wait(timeout=timeout)
    elapsed = time.monotonic() - started
    serial = DOCUMENTS * LLM_LATENCY_S
    echo(f"  {len(store['summaries'])} summaries in {elapsed:.1f} s ({serial:.0f} s one by one)")
    usage = handle.usage()
    for name, row in usage["by_node"].items():
        echo(
            f"  {name:<14} {row['calls']:>3} calls {row['input_tokens']:>7} tokens in "
            f"{row['output_tokens']:>6} out  ${row['cost_usd']:.4f}"
        )
    tokens = usage["input_tokens"] + usage["output_tokens"]
    echo(f"  total: {tokens} tokens, ${usage['cost_usd']:.4f}")
    return handle.run_id


def _progress(handle, settings: Settings, timeout: float, echo: Callable[[str], None]) -> None:
    """A live line of the map's items done (rewritten in place on a terminal; a line per
    tenth of the items otherwise, e.g. in a log)."""
    from pocoflow.recorder import open_ledger

    db = open_ledger(settings.db_url)
    live = sys.stdout.isatty() and echo is print
    shown = -1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not handle.is_done:
        join = db.get_join(handle.run_id, 0)
        done = join["done"] if join else 0
        step = max(1, DOCUMENTS // 10)
        if live:
            bar = "#" * (done * 30 // DOCUMENTS)
            print(f"\r  items [{bar:<30}] {done}/{DOCUMENTS} done", end="", flush=True)
        elif done >= shown + step or (done == DOCUMENTS and shown != done):
            echo(f"  items done: {done}/{DOCUMENTS}")
            shown = done
        time.sleep(0.1)
    if live:
        print(f"\r  items [{'#' * 30}] {DOCUMENTS}/{DOCUMENTS} done")
        return
    join = db.get_join(handle.run_id, 0)  # the run ended between two looks: say where
    if join and join["done"] != shown:
        echo(f"  items done: {join['done']}/{DOCUMENTS}")


def _follow(handle, settings: Settings, timeout: float, echo: Callable[[str], None]) -> None:
    """A line per step as the workers commit it: node, action, time and which worker."""
    from pocoflow.recorder import open_ledger

    db = open_ledger(settings.db_url)
    seen = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Read "done" before the events: the last step's events are then read after it.
        done = handle.is_done
        events = db.get_events(handle.run_id, after_id=seen)
        for event in events:
            seen = event["id"]
            if event["event"] == "node_end":
                echo(
                    f"  step {event['step']:>2}  {event['node_name']:<10} -> "
                    f"{event['action']:<9} {event['elapsed_ms']:7.1f} ms  "
                    f"{_ran_on(db, handle.run_id, event['step'])}"
                )
            elif event["event"] in ("node_retry", "node_error"):
                echo(
                    f"  step {event['step']:>2}  {event['node_name']:<10} {event['event']}: "
                    f"{event['error_msg']}"
                )
        if done:
            return
        time.sleep(0.05)


def _ran_on(db, run_id: str, step: int) -> str:
    """Which worker process committed ``step``: the attempt row's ``host:pid``."""
    for attempt in db.get_attempts(run_id):
        if attempt["step"] == step and attempt["outcome"] == "committed":
            return f"on {attempt['worker']}"
    return ""
