"""What doctor, submit and monitor print or hand on: a password in a broker, Redis or
ledger URL never reaches a printed line or another process's command line (``ps`` shows
every user's), even when a client library quotes part of a malformed URL; and doctor
fails what every other command would refuse."""

from __future__ import annotations

import os
from typing import Any

import pytest
from click.testing import CliRunner

from pocoflow import doctor
from pocoflow.cli import main
from pocoflow.settings import Settings

# A password holding "/" that is not percent-escaped: redis-py and kombu then read part of
# it as the port and quote it in their ValueError.
BAD = "redis://:s3cr/etpw@127.0.0.1:1/0"


def test_doctor_and_submit_lines_hide_a_password_quoted_by_the_client_error() -> None:
    settings = Settings(broker_url=BAD, redis_url=BAD, db_url="sqlite:///:memory:")
    problem = doctor.broker_problem(BAD, timeout_s=0.5)
    assert problem is not None
    lines = [doctor.check_broker(settings).line(), doctor.check_redis(settings).line(), problem]
    for line in lines:
        assert "s3cr" not in line and "etpw" not in line, line
    assert "cannot be reached" in lines[0] and "cannot be reached" in lines[1]


def test_monitor_passes_the_ledger_url_in_the_environment_not_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("streamlit")
    calls: list[tuple[Any, ...]] = []

    def fake_exec(path: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        calls.append((path, argv, env))

    monkeypatch.setattr(os, "execv", lambda p, a: fake_exec(p, a))
    monkeypatch.setattr(os, "execve", fake_exec)
    url = "postgresql://user:s3cretpw@ledger-host/pocoflow"
    result = CliRunner().invoke(main, ["monitor", "--db", url])
    assert result.exit_code == 0, result.output
    assert "s3cretpw" not in result.output
    (_, argv, env) = calls[0]
    assert not any("s3cretpw" in arg for arg in argv), argv
    assert env is not None and env["POCOFLOW_DB_URL"] == url


def test_doctor_fails_a_ledger_newer_than_this_pocoflow(tmp_path: Any) -> None:
    """Every command refuses a ledger at a revision this version does not know (a newer
    pocoflow migrated it); doctor must say so, not "ok ... migrates it"."""
    import sqlite3

    from pocoflow.db import WorkflowDB

    path = tmp_path / "newer.db"
    WorkflowDB(str(path)).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE pf_alembic_version SET version_num = '9999'")
    check, db = doctor.check_ledger(Settings(db_url=f"sqlite:///{path}"))
    assert db is None
    assert not check.ok and "9999" in check.detail and "upgrade pocoflow" in check.detail


def test_monitor_listens_on_loopback_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like ``pocoflow flower``: the monitor shows every Store value, so a bare
    ``pocoflow monitor`` must not serve them on every interface (Streamlit's default);
    deployments say 0.0.0.0 with --address or STREAMLIT_SERVER_ADDRESS."""
    pytest.importorskip("streamlit")
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append(argv))
    monkeypatch.delenv("STREAMLIT_SERVER_ADDRESS", raising=False)
    assert CliRunner().invoke(main, ["monitor", "--db", "x.db"]).exit_code == 0
    assert calls[-1][calls[-1].index("--server.address") + 1] == "127.0.0.1"
    monkeypatch.setenv("STREAMLIT_SERVER_ADDRESS", "0.0.0.0")
    assert CliRunner().invoke(main, ["monitor", "--db", "x.db"]).exit_code == 0
    assert calls[-1][calls[-1].index("--server.address") + 1] == "0.0.0.0"
    args = ["monitor", "--db", "x.db", "--address", "10.0.0.5"]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert calls[-1][calls[-1].index("--server.address") + 1] == "10.0.0.5"


def test_doctor_says_a_missing_sqlite_ledger_is_missing_and_leaves_no_file(tmp_path: Any) -> None:
    typo = tmp_path / "typo.db"
    for location in (str(typo), f"sqlite:///{typo}"):
        check, db = doctor.check_ledger(Settings(db_url=location))
        assert not check.ok and db is None
        assert "does not exist" in check.detail, check.detail
        assert not typo.exists()
