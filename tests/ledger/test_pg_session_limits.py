"""PostgreSQL session limits of the ledger engine (G3): a worker cut off between an UPDATE
and its COMMIT must not hold its row locks, and so the sweeper's take-over, for hours."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import text

from pocoflow.db import WorkflowDB
from tests.conftest import fresh_postgres_database

pytestmark = pytest.mark.ledger

#: idle_in_transaction_session_timeout (5 s) plus room for a loaded 2-core box.
RELEASED_WITHIN_S = 15.0


@pytest.fixture
def pg_db(database_url: str) -> Any:
    """PostgreSQL only: an SQLite ledger has no sessions to cut off."""
    with fresh_postgres_database(database_url) as url:
        db = WorkflowDB(url)
        yield db
        db.close()


def test_ledger_sessions_carry_the_idle_transaction_limit(pg_db: WorkflowDB) -> None:
    with pg_db._ledger.engine.connect() as conn:
        shown = conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one()
        keepalive = conn.execute(text("SHOW tcp_keepalives_idle")).scalar_one()
    assert shown == "5s"
    assert keepalive in ("5", "5s", "0")  # 0 where the server has no TCP link (a socket)


def test_a_session_gone_quiet_inside_a_transaction_releases_its_row_lock(
    pg_db: WorkflowDB,
) -> None:
    """What a partition does to a worker mid-commit: its session holds a row lock and
    says nothing more. The server ends it, and the next writer of that row goes on."""
    pg_db.create_run("quiet-1", flow_name="f")
    stuck = pg_db._ledger.engine.connect()
    stuck.begin()
    stuck.execute(text("UPDATE pf_runs SET error_msg = 'stuck' WHERE run_id = 'quiet-1'"))
    done = threading.Event()

    def writer() -> None:
        pg_db.update_run("quiet-1", error_msg="next writer")
        done.set()

    started = time.monotonic()
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        assert done.wait(RELEASED_WITHIN_S), "the quiet session still holds its lock"
        assert time.monotonic() - started >= 3.0  # it waited for the limit, not luck
        assert pg_db.get_run("quiet-1")["error_msg"] == "next writer"
    finally:
        try:
            stuck.close()
        except Exception:  # the server ended that session: nothing left to close
            pass
