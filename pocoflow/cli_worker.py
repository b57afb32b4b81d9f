"""``pocoflow worker``: start a Celery worker for PocoFlow steps (``workers.app``).

The process *becomes* the Celery worker (exec), so signals sent to ``pocoflow worker``
(Ctrl-C, SIGTERM from a supervisor, SIGKILL from a chaos test) reach Celery itself.
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


if __name__ == "__main__":  # pragma: no cover - `python -m pocoflow.cli_worker FLOWS`
    run_worker(sys.argv[1] if len(sys.argv) > 1 else None)
