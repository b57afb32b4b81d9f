"""Session servers and per-test ledgers (design rule 5: real servers, never skipped).

``redis_url`` / ``database_url`` / ``amqp_url`` honour ``POCOFLOW_TEST_REDIS_URL`` /
``POCOFLOW_TEST_DATABASE_URL`` / ``POCOFLOW_TEST_AMQP_URL``, else start private servers
(``tests.servers``; RabbitMQ only if installed, else its tests skip saying so) once per
session, only when a test asks for them. ``ledger_url`` runs a test on SQLite and on
PostgreSQL, each time on a fresh empty database; ``db`` opens a ``WorkflowDB`` on it.

Every test carries exactly one marker, its folder's (``-m unit``, ``-m ledger``...), and
every process the suite starts keeps its temp files (``pymp-*`` of a killed worker's
pool, ...) in one session dir removed at the end: the suite leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.servers import rabbitmq_binary, start_postgres, start_rabbitmq, start_redis

REDIS_ENV = "POCOFLOW_TEST_REDIS_URL"
#: Because the distributed tests empty (FLUSHDB) databases 1-15 of the Redis they use: a
#: Redis given by URL is used only when its owner says these may be emptied.
REDIS_FLUSH_ENV = "POCOFLOW_TEST_REDIS_FLUSH"
DATABASE_ENV = "POCOFLOW_TEST_DATABASE_URL"
AMQP_ENV = "POCOFLOW_TEST_AMQP_URL"
LEDGER_BACKENDS = ["sqlite", "postgresql"]

TESTS_ROOT = Path(__file__).resolve().parent
#: The marker of each test folder; a test collected elsewhere is an error.
FOLDER_MARKERS = {
    "unit": "unit",
    "ledger": "ledger",
    "distributed": "distributed",
    "examples": "examples",
    "compat": "compat",
    "e2e": "e2e",
}


@pytest.fixture(autouse=True)
def _main_module_kept() -> Iterator[None]:
    """Streamlit's ``AppTest`` runs its script as ``sys.modules["__main__"]`` and leaves it
    there; every later ``multiprocessing`` spawn would then re-run that script in its
    child instead of importing the test. Each test gets the real ``__main__`` back."""
    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main


@pytest.fixture(autouse=True, scope="module")
def _heartbeats_end_with_their_module() -> Iterator[None]:
    """A test that runs a step in-process starts this process's heartbeat for its ledger
    (``liveness.ensure``), a thread that beats every second until the process ends: over
    a session, hundreds of them wrote to ledgers long deleted, and one caught holding a
    checkout made a fork-gate test flaky. Each module's heartbeats stop with it (after
    its own fixtures: this one is set up first, so torn down last)."""
    yield
    liveness = sys.modules.get("pocoflow.distributed.liveness")
    if liveness is not None:
        liveness.stop()


def folder_marker(path: Path) -> str | None:
    """The marker a test file gets from the folder it lives in under ``tests/``."""
    try:
        folder = Path(path).resolve().relative_to(TESTS_ROOT).parts[0]
    except (ValueError, IndexError):
        return None
    return FOLDER_MARKERS.get(folder)


def folder_markers_of(item: pytest.Item) -> set[str]:
    return {m.name for m in item.iter_markers() if m.name in FOLDER_MARKERS.values()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test its folder's marker; refuse a test with none or a second one."""
    wrong = []
    for item in items:
        if not Path(item.path).resolve().is_relative_to(TESTS_ROOT):
            continue  # e.g. doctests of the package: not the suite's business
        marker = folder_marker(item.path)
        if marker is not None:
            item.add_marker(marker)
        if marker is None or folder_markers_of(item) != {marker}:
            wrong.append(f"{item.nodeid}: {sorted(folder_markers_of(item))}")
    if wrong:
        raise pytest.UsageError(
            "each test must carry exactly its folder's marker (one of "
            f"{sorted(FOLDER_MARKERS)}); move or unmark:\n  " + "\n  ".join(wrong)
        )


_session_tmp: str | None = None
_SESSION_PREFIX = "pocoflow-tests-"


def pytest_configure(config: pytest.Config) -> None:
    """Child processes (workers, CLI runs, servers) write their temp files into a session
    dir that is removed at the end, because a worker killed with -9 cannot remove its
    own ``pymp-*`` dirs. This process keeps the temp dir it had (tmp_path etc.)."""
    global _session_tmp
    external_redis_url(os.environ)  # refuse at once, not in the first distributed test
    tempfile.gettempdir()  # cached first, so only children see the new TMPDIR
    if os.environ.get("PYTEST_XDIST_WORKER") and _SESSION_PREFIX in os.environ.get("TMPDIR", ""):
        # A pytest-xdist test process: its controller's session dir is already TMPDIR
        # (and removed by it). Not one more level: Chromium's socket path must stay
        # under 108 bytes.
        return
    _session_tmp = tempfile.mkdtemp(prefix=_SESSION_PREFIX)
    os.environ["TMPDIR"] = _session_tmp


#: The private RabbitMQ booting in the background (``pytest_collection_finish``), and
#: what stops it at the end of the session.
_rabbit: tuple[Future[Any], contextlib.ExitStack] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the private RabbitMQ as soon as the collected tests show one will want it:
    its boot (about 10 s, mostly Erlang starting) then runs beside the tests before the
    first ``amqp_url``, instead of stalling it."""
    global _rabbit
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each test process collects every test, not only those it will run: the process
        # that runs the RabbitMQ tests boots it on first use (``amqp_url``).
        return
    wanted = any("amqp_url" in getattr(item, "fixturenames", ()) for item in session.items)
    binary = rabbitmq_binary() if wanted and not os.environ.get(AMQP_ENV) else None
    if binary is None:
        return
    stack = contextlib.ExitStack()
    pool = ThreadPoolExecutor(1, thread_name_prefix="rabbitmq-boot")
    _rabbit = (pool.submit(stack.enter_context, start_rabbitmq(binary)), stack)
    pool.shutdown(wait=False)  # the boot goes on in its thread


def pytest_unconfigure(config: pytest.Config) -> None:
    if _rabbit is not None:
        with contextlib.suppress(Exception):  # a boot that failed failed its tests already
            _rabbit[0].result()
        _rabbit[1].close()  # before the session dir its data lives in is removed
    if _session_tmp is not None:
        shutil.rmtree(_session_tmp, ignore_errors=True)


def external_redis_url(env: Mapping[str, str]) -> str | None:
    """The Redis named by ``POCOFLOW_TEST_REDIS_URL``, if any, once its owner allowed the
    suite to empty its databases 1-15; else a ``pytest.UsageError`` saying so."""
    url = env.get(REDIS_ENV)
    if not url:
        return None
    if env.get(REDIS_FLUSH_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        raise pytest.UsageError(
            f"{REDIS_ENV}={url} would have databases 1-15 of that Redis emptied (FLUSHDB) by "
            f"the distributed tests. Set {REDIS_FLUSH_ENV}=1 if they hold nothing you need, "
            f"or unset {REDIS_ENV} to let the suite start a private Redis."
        )
    return url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    external = external_redis_url(os.environ)
    if external:
        yield external
        return
    with start_redis() as server:
        yield server.url


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A RabbitMQ broker: ``POCOFLOW_TEST_AMQP_URL``, else a private ``rabbitmq-server``
    started here; without either the test is skipped, saying so (RabbitMQ is an optional
    broker). One that is installed but cannot start fails the suite."""
    if os.environ.get(AMQP_ENV):
        yield os.environ[AMQP_ENV]
        return
    if _rabbit is not None:  # booting since collection ended
        yield _rabbit[0].result().url
        return
    binary = rabbitmq_binary()
    if binary is None:
        pytest.skip(
            f"no RabbitMQ: set {AMQP_ENV}=amqp://... or install rabbitmq-server "
            "(apt-get install rabbitmq-server) to run the amqp:// broker tests"
        )
    with start_rabbitmq(binary) as server:
        yield server.url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A PostgreSQL server URL whose user may create databases."""
    if os.environ.get(DATABASE_ENV):
        yield os.environ[DATABASE_ENV]
        drop_spare_databases()
        return
    with start_postgres() as server:
        yield server.url
        drop_spare_databases()  # before the server goes: nothing outlives the session


#: Emptied databases ready for the next test, by server: CREATE DATABASE costs ~0.3 s of
#: server CPU (a copy of template1), emptying one ~5 ms, over ~500 PostgreSQL tests.
_spare_databases: dict[str, list[str]] = {}


@contextlib.contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A new empty database on the server: a name never used before, no tables, types,
    sequences or sessions.

    A database given back has its sessions ended and is renamed, so nothing still holding
    its URL (a thread or pool a test left behind) can reach it again; it is then emptied
    (schema ``public`` dropped and made again) for the next caller. One that cannot be
    renamed or emptied is dropped. ``drop_spare_databases`` drops the rest at the end."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(server_url).set(drivername="postgresql")
    dsn = admin.render_as_string(hide_password=False)
    spares = _spare_databases.setdefault(dsn, [])
    if spares:
        name = spares.pop()
    else:
        name = f"pf_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(drivername="postgresql+psycopg", database=name).render_as_string(
            hide_password=False
        )
    finally:
        spare = f"pf_test_{uuid.uuid4().hex[:12]}"
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(f'ALTER DATABASE "{name}" RENAME TO "{spare}"')
            emptied = admin.set(database=spare).render_as_string(hide_password=False)
            with psycopg.connect(emptied, autocommit=True) as db:
                db.execute("DROP SCHEMA public CASCADE")
                db.execute("CREATE SCHEMA public")
            spares.append(spare)
        except psycopg.Error:  # a session came back in between: drop it instead
            with psycopg.connect(dsn, autocommit=True) as conn:
                for gone in (name, spare):
                    conn.execute(f'DROP DATABASE IF EXISTS "{gone}" WITH (FORCE)')


def drop_spare_databases() -> None:
    """Drop the emptied databases kept for reuse (they live on in a server not ours)."""
    import psycopg

    for dsn, names in _spare_databases.items():
        with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _spare_databases.clear()


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
