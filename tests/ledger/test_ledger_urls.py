"""Ledger URLs: secrets never printed, SQLite options the same as the settings'."""

from __future__ import annotations

import logging
import socket

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from pocoflow.cli import main as cli
from pocoflow.db import WorkflowDB
from pocoflow.ledger import engine
from pocoflow.settings import SQLITE_SYNCHRONOUS_MODES, Settings
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.ledger

SECRET = "S3cret"
TOKEN = "T0ken"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_secrets(url: str) -> str:
    """``url`` with a password in the query string (libpq reads it as the password)."""
    return f"{url}?password={SECRET}&sslpassword={TOKEN}"


# ── secrets in URLs ───────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://bob@127.0.0.1:{{port}}/db?password={SECRET}",
        f"postgresql://bob:{SECRET}@127.0.0.1:{{port}}/db?sslpassword={SECRET}",
        f"postgresql+psycopg://bob@127.0.0.1:{{port}}/db?password={SECRET}&sslmode=disable",
    ],
)
def test_unreachable_ledger_error_hides_the_password(url: str) -> None:
    url = url.format(port=_closed_port())
    with pytest.raises(ValueError, match="Cannot open the ledger database") as info:
        WorkflowDB(url)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert "127.0.0.1" in str(info.value)  # still says which database


def test_unsupported_ledger_url_error_hides_the_password() -> None:
    with pytest.raises(ValueError, match="Unsupported ledger URL") as info:
        WorkflowDB(f"mysql://bob@127.0.0.1:1/db?password={SECRET}")
    assert SECRET not in str(info.value)
    assert "mysql://bob@127.0.0.1:1/db" in str(info.value)


def test_cli_show_never_prints_a_query_string_password() -> None:
    url = f"postgresql://bob@127.0.0.1:{_closed_port()}/db?password={SECRET}"
    result = CliRunner().invoke(cli, ["show", "x", "--db", url])
    assert result.exit_code == 2
    assert "Cannot open the ledger database" in result.output
    assert SECRET not in result.output


def test_mask_url_of_an_sqlalchemy_url_hides_query_secrets() -> None:
    url = engine.resolve_url(f"postgresql://bob:{SECRET}@h/db?password={SECRET}&token={TOKEN}")
    masked = engine.mask_url(url)
    assert SECRET not in masked and TOKEN not in masked
    assert masked.startswith("postgresql+psycopg://bob:***@h/db?")


def test_open_ledger_url_repr_and_logs_hide_the_password(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The test server trusts every connection, so the password is accepted and ignored.
    with fresh_postgres_database(database_url) as plain:
        caplog.set_level(logging.DEBUG, logger="pocoflow")
        db = WorkflowDB(_with_secrets(plain))
        try:
            db.create_run("r1", "f")
            assert db.get_run("r1")["status"] == "running"
            shown = [str(db.url), repr(db), repr(db._ledger), db._ledger.label, caplog.text]
            for text_ in shown:
                assert SECRET not in text_ and TOKEN not in text_, text_
            assert "password=***" in str(db.url)
            assert "127.0.0.1" in repr(db)
        finally:
            db.close()


# ── SQLite synchronous ────────────────────────────────────────────────────────


def test_synchronous_modes_are_one_constant_shared_with_settings() -> None:
    assert engine.SQLITE_SYNCHRONOUS_MODES is SQLITE_SYNCHRONOUS_MODES
    assert set(SQLITE_SYNCHRONOUS_MODES) == {"OFF", "NORMAL", "FULL", "EXTRA"}


@pytest.mark.parametrize("mode", SQLITE_SYNCHRONOUS_MODES)
def test_every_synchronous_mode_settings_accept_opens_a_workflow_db(
    mode: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}[mode]
    assert Settings(sqlite_synchronous=mode.lower()).sqlite_synchronous == mode

    def pragma(db: WorkflowDB) -> int:
        with db._ledger.engine.connect() as conn:
            return conn.execute(text("PRAGMA synchronous")).scalar_one()

    db = WorkflowDB(tmp_path / "arg.db", synchronous=mode.lower())
    try:
        db.create_run("r1")
        assert pragma(db) == expected
    finally:
        db.close()
    monkeypatch.setenv(engine.SYNCHRONOUS_ENV, f" {mode.lower()} ")
    db = WorkflowDB(tmp_path / "env.db")
    try:
        assert pragma(db) == expected
    finally:
        db.close()


def test_an_unknown_synchronous_mode_is_refused_the_same_way_everywhere(tmp_path) -> None:
    with pytest.raises(ValueError, match="OFF, NORMAL, FULL, EXTRA"):
        WorkflowDB(tmp_path / "x.db", synchronous="SOMETIMES")
    with pytest.raises(ValueError, match="OFF, NORMAL, FULL, EXTRA"):
        Settings(sqlite_synchronous="SOMETIMES")
