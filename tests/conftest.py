"""Session servers and per-test ledgers (design rule 5: real servers, never skipped).

``redis_url`` / ``database_url`` honour ``POCOFLOW_TEST_REDIS_URL`` /
``POCOFLOW_TEST_DATABASE_URL``, else start private servers (``tests.servers``) once per
session, only when a test asks for them. ``ledger_url`` runs a test on SQLite and on
PostgreSQL, each time on a fresh empty database; ``db`` opens a ``WorkflowDB`` on it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

from tests.servers import start_postgres, start_redis

REDIS_ENV = "POCOFLOW_TEST_REDIS_URL"
DATABASE_ENV = "POCOFLOW_TEST_DATABASE_URL"
LEDGER_BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if os.environ.get(REDIS_ENV):
        yield os.environ[REDIS_ENV]
        return
    with start_redis() as server:
        yield server.url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A PostgreSQL server URL whose user may create databases."""
    if os.environ.get(DATABASE_ENV):
        yield os.environ[DATABASE_ENV]
        return
    with start_postgres() as server:
        yield server.url


@contextlib.contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A new empty database on the server (dropped after, connections and all)."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(server_url).set(drivername="postgresql")
    dsn = admin.render_as_string(hide_password=False)
    name = f"pf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=LEDGER_BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh, empty ledger database URL, once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    server = request.getfixturevalue("database_url")
    with fresh_postgres_database(server) as url:
        yield url


@pytest.fixture
def db(ledger_url: str):
    from pocoflow.db import WorkflowDB

    ledger = WorkflowDB(ledger_url)
    yield ledger
    ledger.close()
