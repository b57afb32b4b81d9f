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

DEMO_FLOWS = "examples.article"


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

    echo(f"starting a private Redis and {workers} workers (logs in {state_dir / 'logs'})")
    started = time.monotonic()
    with local_cluster(
        db_url, DEMO_FLOWS, workers=workers, cwd=root, log_dir=state_dir / "logs"
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
    echo("look further:")
    echo(f"  pocoflow show {handle.run_id} --db {mask_url(db_url)}")
    echo(f"  pocoflow runs --db {mask_url(db_url)}")
    echo("  with your own Redis and workers: pocoflow worker --flows examples.article,")
    echo('  pocoflow submit article --store \'{"topic": "tides"}\' --wait, pocoflow flower')
    return handle.run_id


def _follow(handle, settings: Settings, timeout: float, echo: Callable[[str], None]) -> None:
    """A line per step as the workers commit it: node, action, time and which worker."""
    from pocoflow.recorder import open_ledger

    db = open_ledger(settings.db_url)
    seen = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
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
        if handle.is_done:
            return
        time.sleep(0.05)


def _ran_on(db, run_id: str, step: int) -> str:
    """Which worker process committed ``step``: the attempt row's ``host:pid``."""
    for attempt in db.get_attempts(run_id):
        if attempt["step"] == step and attempt["outcome"] == "committed":
            return f"on {attempt['worker']}"
    return ""
