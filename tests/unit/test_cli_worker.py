"""``pocoflow worker`` options become the Celery command line; ``--pool threads`` asks
Celery for its threads pool (I/O-bound nodes, many steps per process)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from pocoflow import cli_worker
from pocoflow.cli import main
from pocoflow.cli_worker import flower_argv, worker_argv


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


def test_flower_runs_on_the_worker_app_with_a_bounded_task_list() -> None:
    argv = flower_argv(port=5556, extra=["--max_tasks=50000", "--basic-auth=a:b"])
    assert argv[:5] == ["-m", "celery", "-A", "workers.app", "flower"]
    assert "--port=5556" in argv and "--address=127.0.0.1" in argv
    # Extra arguments come last, so they override the defaults.
    assert argv.index("--max_tasks=10000") < argv.index("--max_tasks=50000")
    assert argv[-1] == "--basic-auth=a:b"


def test_the_cli_passes_flower_its_own_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(cli_worker, "run_flower", lambda **kw: calls.append(kw))
    result = CliRunner().invoke(main, ["flower", "--address", "0.0.0.0", "--", "--basic-auth=u:p"])
    assert result.exit_code == 0, result.output
    assert calls == [{"port": 5555, "address": "0.0.0.0", "extra": ("--basic-auth=u:p",)}]


def test_no_shipped_doc_puts_a_flower_password_on_a_command_line() -> None:
    """``ps`` shows every process's arguments to every user: Flower's password goes in
    ``FLOWER_BASIC_AUTH`` (the env file), which ``pocoflow flower`` hands on, never in
    ``-- --basic-auth=user:pw``."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shipped = [root / "README.md", root / "docker-compose.yml", root / "pocoflow" / "cli.py"]
    shipped += sorted((root / "deploy").rglob("*"))
    offenders = [
        str(p.relative_to(root))
        for p in shipped
        if p.is_file() and "--basic-auth=" in p.read_text()
    ]
    assert offenders == []
