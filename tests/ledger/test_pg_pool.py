"""The PostgreSQL ledger's pool keeps the connections a burst of threads opened: the
item calls of a threads-pool worker come in bursts, and a connection opened for one and
closed at its checkin costs a server backend per item."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event, text

from pocoflow.db import WorkflowDB
from pocoflow.ledger.engine import POSTGRES_POOL_SIZE

pytestmark = pytest.mark.ledger

BURST = 12  # a threads pool of 8 items, and the worker's own threads


def _burst(db: WorkflowDB) -> None:
    """``BURST`` threads each hold a connection at the same moment."""
    barrier = threading.Barrier(BURST)

    def hold() -> None:
        with db._ledger.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            barrier.wait(timeout=30)

    threads = [threading.Thread(target=hold) for _ in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_a_second_burst_of_checkouts_opens_no_connection(database_url: str) -> None:
    from tests.conftest import fresh_postgres_database

    assert POSTGRES_POOL_SIZE >= BURST
    with fresh_postgres_database(database_url) as url:
        db = WorkflowDB(url)
        try:
            opened: list[object] = []
            event.listen(db._ledger.engine, "connect", lambda *_: opened.append(None))
            _burst(db)
            first = len(opened)
            _burst(db)
            assert len(opened) == first  # all kept: none opened again
        finally:
            db.close()
