"""``pocoflow worker`` and ``pocoflow flower``: Celery's worker and Flower on ``workers.app``.

The process *becomes* the Celery worker or Flower (exec), so signals sent to it (Ctrl-C,
SIGTERM from a supervisor, SIGKILL from a chaos test) reach Celery itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pocoflow.distributed.celery_app import DEFAULT_QUEUE

#: Because PocoFlow keeps no worker-to-worker state (the ledger is shared), gossip and
#: mingle only slow start-up (mingle waits a second for replies) and add broker traffic.
QUIET_FLAGS = ("--without-gossip", "--without-mingle")
#: The Celery pools a PocoFlow worker supports. ``threads`` suits I/O-bound nodes (an LLM
#: call waits on the network, not the CPU): one process runs ``--concurrency`` steps or
#: map items at once, each thread with its own copy of every flow graph, so what a step
#: sets on its node objects (``run_id``, ``step``, ``attempt``) is never another's.
POOLS = ("prefork", "threads", "solo")


def worker_argv(
    *,
    concurrency: int | None = None,
    queues: str | Sequence[str] | None = None,
    loglevel: str = "info",
    pool: str | None = None,
    hostname: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``celery`` command line ``run_worker`` executes (without the interpreter)."""
    if isinstance(queues, str):
        queues = [q.strip() for q in queues.split(",") if q.strip()]
    argv = ["-m", "celery", "-A", "workers.app", "worker", "--loglevel", loglevel]
    argv += ["--queues", ",".join(queues or [DEFAULT_QUEUE])]
    if concurrency:
        argv += ["--concurrency", str(int(concurrency))]
    if pool:
        if pool not in POOLS:
            raise ValueError(f"Unknown worker pool {pool!r}; choose one of {', '.join(POOLS)}")
        argv += ["--pool", pool]
    if hostname:
        argv += ["--hostname", hostname]
    return [*argv, *QUIET_FLAGS, *extra]


def run_worker(
    flows: str | Sequence[str] | None = None,
    concurrency: int | None = None,
    queues: str | Sequence[str] | None = None,
    loglevel: str = "info",
    *,
    pool: str | None = None,
    hostname: str | None = None,
    extra: Sequence[str] = (),
) -> None:
    """Replace this process with a Celery worker running ``workers.app``.

    ``flows`` (comma-separated or a list) become ``POCOFLOW_FLOWS`` for the worker, which
    imports them at start; the other settings come from the environment as usual.
    Never returns.
    """
    try:
        import celery  # noqa: F401
    except ImportError:
        sys.exit("pocoflow worker needs Celery: pip install 'pocoflow[distributed]'")
    env = dict(os.environ)
    if flows:
        env["POCOFLOW_FLOWS"] = flows if isinstance(flows, str) else ",".join(flows)
    # Because the flow modules usually sit in the directory the worker starts in.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    argv = worker_argv(
        concurrency=concurrency,
        queues=queues,
        loglevel=loglevel,
        pool=pool,
        hostname=hostname,
        extra=extra,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)


#: Flower keeps every task it saw in memory: a busy cluster runs thousands of steps an
#: hour, so the list is bounded, and workers gone for 5 minutes leave the dashboard.
FLOWER_DEFAULTS = ("--max_tasks=10000", "--purge_offline_workers=300")


def flower_argv(
    *, port: int = 5555, address: str = "127.0.0.1", extra: Sequence[str] = ()
) -> list[str]:
    """The ``celery`` command line ``run_flower`` executes (without the interpreter).

    Flower's own ``enable_events`` (on) asks every worker it sees to send task events,
    so steps are listed even by workers started without ``POCOFLOW_TASK_EVENTS=1``.
    ``extra`` goes last, so it overrides the defaults (``--max_tasks=50000``) and adds
    Flower options (``--url_prefix=flower``; a password goes in ``FLOWER_BASIC_AUTH``, which
    ``run_flower`` hands on with the environment: ``ps`` shows arguments)."""
    argv = ["-m", "celery", "-A", "workers.app", "flower", f"--port={int(port)}"]
    return [*argv, f"--address={address}", *FLOWER_DEFAULTS, *extra]


def run_flower(*, port: int = 5555, address: str = "127.0.0.1", extra: Sequence[str] = ()) -> None:
    """Replace this process with Flower watching PocoFlow's broker. Never returns."""
    try:
        import flower  # noqa: F401
    except ImportError:
        sys.exit("pocoflow flower needs Flower: pip install 'pocoflow[flower]'")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(
        sys.executable, [sys.executable, *flower_argv(port=port, address=address, extra=extra)], env
    )


if __name__ == "__main__":  # pragma: no cover - `python -m pocoflow.cli_worker FLOWS`
    run_worker(sys.argv[1] if len(sys.argv) > 1 else None)
