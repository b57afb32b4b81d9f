"""``pocoflow worker`` options become the Celery command line; ``--pool threads`` asks
Celery for its threads pool (I/O-bound nodes, many steps per process)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from pocoflow import cli_worker
from pocoflow.cli import main
from pocoflow.cli_worker import worker_argv


def test_worker_argv_passes_pool_and_concurrency() -> None:
    argv = worker_argv(concurrency=8, pool="threads")
    assert argv[argv.index("--pool") + 1] == "threads"
    assert argv[argv.index("--concurrency") + 1] == "8"
    assert "--pool" not in worker_argv()  # Celery's default (prefork) unless asked
    with pytest.raises(ValueError, match="Unknown worker pool 'gevent'"):
        worker_argv(pool="gevent")


def test_the_cli_hands_the_pool_to_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_run_worker(*args: Any, **kwargs: Any) -> None:
        calls.append((*args, kwargs))

    monkeypatch.setattr(cli_worker, "run_worker", fake_run_worker)
    result = CliRunner().invoke(
        main, ["worker", "--flows", "m", "--pool", "threads", "--concurrency", "8"]
    )
    assert result.exit_code == 0, result.output
    assert calls == [("m", 8, None, "info", {"pool": "threads"})]
    bad = CliRunner().invoke(main, ["worker", "--pool", "gevent"])
    assert bad.exit_code == 2 and "gevent" in bad.output
