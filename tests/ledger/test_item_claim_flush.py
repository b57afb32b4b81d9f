"""An item claim on PostgreSQL: one round trip (BEGIN, the run's guard, the claim, the
COMMIT) whose COMMIT waits for no WAL flush (``SET LOCAL synchronous_commit``: a claim is
a lease, a claim lost in a server crash is one that never was), and a setting that stays
with the claim's transaction: the pooled connections the item's commit runs on flush
theirs as every commit does."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from pocoflow.db import WorkflowDB
from pocoflow.ledger.items import ItemClaim
from tests.helpers import pg_client_trace, round_trips_of

pytestmark = pytest.mark.ledger

LEASE = 10.0
RUN = "r1"


@pytest.fixture
def pg_db(database_url: str) -> Any:
    from tests.conftest import fresh_postgres_database

    with fresh_postgres_database(database_url) as url:
        # The test server flushes no commit (fsync off): the sessions do, as in production.
        sep = "&" if "?" in url else "?"
        db = WorkflowDB(f"{url}{sep}options=-c%20synchronous_commit%3Don")
        db.create_run(RUN, "f", initial_store={}, status="running")
        db.insert_step(RUN, 0, "M", lease_s=LEASE)
        assert db.claim_step(RUN, 0, 1, "w0", LEASE, holder="w0#1")
        assert db.fan_out(RUN, 0, 1, "w0#1", "w0", ['"a"', '"b"'], [])
        yield db
        db.close()


def test_a_claim_is_one_round_trip_whose_commit_waits_for_no_flush(pg_db: WorkflowDB) -> None:
    pg_db.close()  # pooled connections were made untraced
    with pg_client_trace(pg_db._ledger.engine) as sent:
        got = pg_db.claim_item(ItemClaim(RUN, 0, 0, 1, "w1#1"), "M", LEASE)
    assert got[0] and got[2] == ('"a"', 1)
    assert round_trips_of(sent) == 1, sent
    front = [p for p in sent if len(p) > 3 and p[1] == "F"]
    text_sent = "\n".join("\t".join(p) for p in front)
    assert "SET LOCAL synchronous_commit TO OFF" in text_sent
    assert "BEGIN" in text_sent and "COMMIT" in text_sent


def test_the_claims_setting_stays_in_its_transaction(pg_db: WorkflowDB) -> None:
    assert pg_db.claim_item(ItemClaim(RUN, 0, 0, 1, "w1#1"), "M", LEASE)[0]
    assert pg_db.claim_item(ItemClaim(RUN, 0, 1, 1, "w1#2"), "M", LEASE)[0]
    engine = pg_db._ledger.engine
    conns = [engine.connect() for _ in range(3)]  # the pooled ones first
    try:
        assert {c.execute(text("SHOW synchronous_commit")).scalar() for c in conns} == {"on"}
    finally:
        for c in conns:
            c.close()
    ok, state = pg_db.commit_item(ItemClaim(RUN, 0, 0, 1, "w1#1"), result_json="1", lease_s=LEASE)
    assert ok and state["done"] == 1
