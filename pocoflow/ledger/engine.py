"""Engine set-up: the only place where SQLite and PostgreSQL differ (besides migrations).

``resolve_url`` turns what a user passes (a file path, a ``Path``, ``sqlite:///...``,
``postgresql://...``) into a SQLAlchemy URL; ``shared_engine`` builds one pooled engine
per (URL, options) per process and checks the schema once for it, so opening a
``WorkflowDB`` on an up-to-date database costs a dictionary lookup.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError

from pocoflow import settings
from pocoflow.ledger.combine import Combiner
from pocoflow.ledger.errors import is_locked
from pocoflow.ledger.forkgate import gate as fork_gate
from pocoflow.settings import DEFAULT_SQLITE_SYNCHRONOUS, SQLITE_SYNCHRONOUS_MODES

SYNCHRONOUS_ENV = settings.ENV_VARS["sqlite_synchronous"]
DEFAULT_BUSY_TIMEOUT_S = 5.0

_PG_SCHEMES = ("postgresql", "postgres")


def mask_url(url: URL | str) -> str:
    """The URL as text with every secret replaced by ``***``: safe for logs and errors.

    SQLAlchemy hides only the userinfo password; :func:`pocoflow.settings.mask_url` then
    hides the rest (``?password=``, ``?sslpassword=``, tokens...), so every label, error
    and repr built from here is masked like the CLI's own output."""
    if isinstance(url, URL):
        return settings.mask_url(url.render_as_string(hide_password=True))
    return settings.mask_url(url)


def sqlite_file(location: str) -> Path | None:
    """The file behind an SQLite location (a path or ``sqlite:///...``), None for a
    server URL: what a reader checks exists before opening it, since opening an SQLite
    path creates an empty database where a typo pointed."""
    if "://" not in location:
        return Path(location).expanduser()
    if location.startswith("sqlite"):
        path = urlsplit(location).path
        # sqlite:///rel.db -> "/rel.db" (relative), sqlite:////abs.db -> "//abs.db".
        return Path(path[1:]).expanduser() if path else None
    return None


def resolve_url(location: str | os.PathLike[str]) -> URL:
    """What ``WorkflowDB(...)`` accepts -> a SQLAlchemy URL with an explicit driver.

    A plain path (no ``://``) is an SQLite file, as in 0.2. ``postgresql://`` and
    ``postgres://`` get the psycopg 3 driver. For SQLite files the parent directories are
    created (0.2 did the same); a path that cannot have them raises ``ValueError``.
    """
    text = os.fspath(location)
    if "://" not in text:
        path = Path(text).expanduser()
        _ensure_parent(path)
        return URL.create("sqlite+pysqlite", database=str(path))
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise ValueError(f"Not a database URL or path: {mask_url(text)}") from exc
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError(
                "An in-memory SQLite ledger is private to one connection; "
                "give a file path, e.g. sqlite:///pocoflow.db"
            )
        _ensure_parent(Path(url.database).expanduser())
        return url.set(drivername="sqlite+pysqlite")
    if backend in _PG_SCHEMES:
        driver = url.get_driver_name()
        if "+" not in url.drivername or backend == "postgres":
            driver = "psycopg"
        return url.set(drivername=f"postgresql+{driver}")
    raise ValueError(
        f"Unsupported ledger URL {mask_url(url)}: use a file path, sqlite:///FILE or "
        "postgresql://USER@HOST/DB"
    )


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"Cannot create the directory for the ledger database {str(path)!r}: {exc}"
        ) from exc
    if path.is_dir():
        raise ValueError(f"The ledger database path {str(path)!r} is a directory, not a file")


def synchronous_mode(value: str | None) -> str:
    """NORMAL unless asked otherwise (argument, then ``POCOFLOW_SQLITE_SYNCHRONOUS``); the
    values :class:`pocoflow.settings.Settings` accepts, from the same constant."""
    mode = value or os.environ.get(SYNCHRONOUS_ENV) or DEFAULT_SQLITE_SYNCHRONOUS
    mode = mode.strip().upper()
    if mode not in SQLITE_SYNCHRONOUS_MODES:
        raise ValueError(
            f"SQLite synchronous mode must be one of {', '.join(SQLITE_SYNCHRONOUS_MODES)}, "
            f"got {mode!r} (argument synchronous= or env {SYNCHRONOUS_ENV})"
        )
    return mode


def _ensure_wal(cur: Any, wait_s: float) -> None:
    """Switch a new file to WAL. The switch needs an exclusive lock and SQLite does not
    wait for it (no busy handler), so processes opening a fresh file at once retry."""
    if cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    deadline = time.monotonic() + max(wait_s, 1.0)
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# Both engines are created with hide_parameters=True because SQLAlchemy otherwise puts a
# failing statement's parameters (Store values, a user's data) into the error text, and
# from there into tracebacks, logs and the run's error_msg.


def _sqlite_engine(url: URL, synchronous: str, busy_timeout_s: float) -> Engine:
    engine = create_engine(
        url,
        # Because pooled connections cross threads (RunHandle, background runs); each is
        # used by one thread at a time.
        connect_args={"check_same_thread": False},
        hide_parameters=True,
    )
    busy_ms = max(0, int(busy_timeout_s * 1000))
    # Because a process forked mid-transaction could never write the file (forkgate).
    event.listen(engine, "checkout", fork_gate.checkout)
    event.listen(engine, "checkin", fork_gate.checkin)
    # A connection detached for LedgerEngine.borrow leaves the pool checked out: its
    # loans are reported to the gate by borrow and give_back from then on.
    event.listen(engine, "detach", fork_gate.checkin)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Because we emit BEGIN ourselves (ledger.txn): the sqlite3 module's own
        # transaction handling skips BEGIN before DDL and SELECT, which breaks
        # transactional migrations and repeatable reads. (Not from a "begin" engine event:
        # any engine event slows every statement's dispatch.)
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        # Because concurrent writers (threads, worker processes) should queue for the write
        # lock inside SQLite instead of failing at once; set first so the pragmas below
        # wait too.
        cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
        # Because in WAL readers (monitor, RunHandle.wait polling) never block the writer
        # nor it them. Persistent in the file, so only a new file needs it.
        _ensure_wal(cur, busy_timeout_s)
        # Because with WAL, NORMAL survives application crashes and never corrupts, and
        # skips the fsync per commit (a power loss may drop the last commits); FULL
        # fsyncs every commit for machines that must not lose one (EXTRA: the directory
        # too). OFF never fsyncs: for throwaway ledgers only, a power loss can corrupt.
        cur.execute(f"PRAGMA synchronous = {synchronous}")
        # Because SQLite ignores foreign keys unless each connection asks for them.
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    return engine


#: Server-side limits on every ledger session. A worker cut off (partition, frozen host)
#: between an UPDATE and its COMMIT keeps its row locks until the server notices; with
#: PostgreSQL's defaults (no idle-in-transaction limit, TCP keepalive after 2 h) the
#: sweeper's take-over of its step would wait that long (G3). No ledger transaction idles:
#: each runs its statements back to back, so 5 s only ever ends a session that is gone.
#: The keepalives make the server find a dead peer of an idle session in ~11 s.
POSTGRES_SESSION_OPTIONS = (
    "-c idle_in_transaction_session_timeout=5000 "
    "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
)


#: The client side of the same: a peer that vanished without a word (its host died, the
#: link was cut) leaves a half-open socket, on which a call waiting for a reply would
#: wait for ever (or ~15 min of retransmissions, if its request was not acknowledged).
#: Until then a worker thread is stuck, and with it every item commit its process groups
#: behind that thread (``combine``). Keepalive probes start after 5 s of silence, and
#: ``tcp_user_timeout`` ends the socket 30 s after the peer last answered, probes or
#: retransmissions alike (on Linux it replaces the probes' count). Not shorter: Linux also
#: ends a session whose server answers but reads nothing for that long, as a pipelined
#: batch whose first statement waits on a lock does once it fills the server's window,
#: and a session cut off holding that lock is ended by the server within ~16 s (above).
#: A new connection gives up after 10 s. A setting in the URL wins, and
#: ``PGCONNECT_TIMEOUT`` over the connect timeout.
POSTGRES_CLIENT_KEEPALIVES = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def _client_limits(url: URL) -> dict[str, int]:
    """``POSTGRES_CLIENT_KEEPALIVES`` but what the URL or the environment sets."""
    given = set(url.query)
    if os.environ.get("PGCONNECT_TIMEOUT"):
        given.add("connect_timeout")
    return {k: v for k, v in POSTGRES_CLIENT_KEEPALIVES.items() if k not in given}


def _postgres_engine(url: URL) -> Engine:
    from pocoflow.ledger import pgtext  # psycopg: only installed with the postgres extra

    # No pool_pre_ping: it costs a round trip per checkout on the hot path; a dropped
    # connection is invalidated by SQLAlchemy and the ledger retries the call once.
    users = url.query.get("options")
    options = POSTGRES_SESSION_OPTIONS if not users else f"{POSTGRES_SESSION_OPTIONS} {users}"
    engine = create_engine(
        url,
        pool_size=5,
        max_overflow=10,
        hide_parameters=True,
        connect_args={
            "options": options,
            **_client_limits(url),
        },
    )
    # Every string written escapes NUL, which PostgreSQL's text refuses (pgtext).
    event.listen(engine, "connect", pgtext.register)
    return engine


class SqliteLoan:
    """One SQLite driver connection lent by ``LedgerEngine.borrow``, and what a batched
    transaction body (``pipeline``) uses of a Connection: ``dialect`` and
    ``connection.driver_connection``; no ``execute``."""

    __slots__ = ("dialect", "driver_connection", "generation")

    def __init__(self, driver_connection: sqlite3.Connection, dialect: Any, generation: int):
        self.driver_connection = driver_connection
        self.dialect = dialect
        self.generation = generation

    @property
    def connection(self) -> SqliteLoan:
        # A property, not an attribute holding self: that cycle would keep the loan, and
        # its open files, alive until a full garbage collection.
        return self


class KeptConnection:
    """The idle SQLite connection a ledger keeps for ``LedgerEngine.borrow``: one, since a
    batched transaction borrows it under the ledger's ``writers`` lock, so at most one
    loan is out at a time (a second is made only if a caller borrows outside it).

    A holder of its own, not fields of the ledger, so the ledger's finalizer can close it
    without referring to the ledger. ``generation`` counts ``close`` calls: a loan made
    before one is closed when given back, not kept."""

    __slots__ = ("_loan", "_lock", "generation")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loan: SqliteLoan | None = None
        self.generation = 0

    def take(self) -> SqliteLoan | None:
        with self._lock:
            loan, self._loan = self._loan, None
        return loan

    def keep(self, loan: SqliteLoan) -> bool:
        """Keep ``loan`` for the next ``take``; False (the caller closes it) if one is
        kept already or ``close`` ran since it was made."""
        with self._lock:
            if self._loan is not None or loan.generation != self.generation:
                return False
            self._loan = loan
            return True

    def close(self) -> None:
        with self._lock:
            self.generation += 1
            loan, self._loan = self._loan, None
        if loan is not None:
            close_loan(loan)

    def forget(self) -> None:
        """In a forked child: the parent's connection is never used (nor closed) here."""
        self._lock = threading.Lock()
        self._loan = None
        self.generation += 1


def close_loan(loan: SqliteLoan) -> None:
    """Close a lent connection inside the fork gate, as a transaction runs: closing
    takes SQLite's own mutexes, which a child forked meanwhile would find held for ever."""
    fork_gate.checkout(None, loan, None)
    try:
        loan.driver_connection.close()
    finally:
        fork_gate.checkin(None, loan)


def _release(engine: Engine, kept: KeptConnection) -> None:
    """A ledger no ``WorkflowDB`` uses any more: its kept connection and its pool."""
    kept.close()
    engine.dispose()


@dataclass(eq=False, repr=False)
class LedgerEngine:
    """One pooled engine for one database, shared by every ``WorkflowDB`` on it."""

    url: URL
    engine: Engine
    #: Runs the read-only calls: on PostgreSQL in autocommit (under READ COMMITTED a
    #: transaction adds nothing to a read but the BEGIN and COMMIT round trips).
    reader: Engine
    dialect: str
    schema_ready: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: SQLite: the write transactions of this process's threads, one at a time (see
    #: ``txn.run``); PostgreSQL: the groups of item commits, one at a time.
    writers: threading.Lock = field(default_factory=threading.Lock)
    #: SQLite: the idle connection ``borrow`` lends.
    kept: KeptConnection = field(default_factory=KeptConnection)
    #: The groups of this process's write calls (``combine``): on SQLite the grouped
    #: ones (``txn.run(grouped=True)``), on PostgreSQL the map items' commits.
    grouped: Combiner = field(default_factory=Combiner)

    @property
    def label(self) -> str:
        """Names the database in errors: the file for SQLite, the masked URL otherwise."""
        if self.dialect == "sqlite":
            return str(self.url.database)
        return mask_url(self.url)

    def __repr__(self) -> str:
        # Not the dataclass repr: URL and Engine reprs show ?password= query parameters.
        return f"LedgerEngine({mask_url(self.url)!r})"

    def dispose(self) -> None:
        _release(self.engine, self.kept)

    def borrow(self) -> SqliteLoan:
        """An SQLite connection for one transaction of this thread, lent outside the pool
        until ``give_back``.

        Because a step commit is a handful of statements, the pool's checkout and checkin
        (a connection record, reset on return, a queue and two events) cost more than any
        of them; the kept connection costs a lock. A new one comes from the pool, so it
        has the engine's pragmas, and is then detached from it. Each loan is reported to
        the fork gate, as a checkout is (and waits, as one does, while a fork is pending)."""
        loan = self.kept.take()
        if loan is None:
            pooled = self.engine.raw_connection()
            raw = pooled.driver_connection
            pooled.detach()
            loan = SqliteLoan(raw, self.engine.dialect, self.kept.generation)  # type: ignore[arg-type]
        fork_gate.checkout(None, loan, None)
        return loan

    def give_back(self, loan: SqliteLoan) -> None:
        """End a ``borrow``: the connection is kept for the next, unless it is still in a
        transaction (its rollback failed), one is kept already, or ``dispose`` ran since.
        Closed before the fork gate hears it is back, so no fork comes between."""
        try:
            if loan.driver_connection.in_transaction or not self.kept.keep(loan):
                loan.driver_connection.close()
        finally:
            fork_gate.checkin(None, loan)


_registry: weakref.WeakValueDictionary[tuple[Any, ...], LedgerEngine] = (
    weakref.WeakValueDictionary()
)
_registry_lock = threading.Lock()


def shared_engine(
    url: URL, *, synchronous: str | None = None, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
) -> LedgerEngine:
    """The process-wide engine for ``url`` (created on first use, dropped with its last user).

    Held weakly: when no ``WorkflowDB`` refers to it any more its pool is closed, so
    short-lived databases (tests, one-off CLI calls) do not pile up open files.
    """
    dialect = url.get_backend_name()
    sync = synchronous_mode(synchronous) if dialect == "sqlite" else None
    key = (url.render_as_string(hide_password=False), sync, busy_timeout_s)
    with _registry_lock:
        found = _registry.get(key)
        if found is not None:
            return found
        if dialect == "sqlite":
            assert sync is not None
            engine = _sqlite_engine(url, sync, busy_timeout_s)
        else:
            engine = _postgres_engine(url)
        reader = engine
        if dialect == "postgresql":
            reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        ledger = LedgerEngine(url=url, engine=engine, reader=reader, dialect=dialect)
        weakref.finalize(ledger, _release, engine, ledger.kept)
        _registry[key] = ledger
        return ledger


def _after_fork_in_child() -> None:
    # Because a forked worker (Celery prefork) must not share its parent's sockets and
    # file handles: drop the inherited pools without closing the parent's connections.
    # The same for the process-local locks: one held by a thread of the parent (a writer
    # queued in ``txn``) would stay held for ever in the child, where that thread is gone.
    for ledger in list(_registry.values()):
        ledger.engine.dispose(close=False)
        ledger.kept.forget()  # the parent's, as the pool's above
        ledger.lock = threading.Lock()
        ledger.writers = threading.Lock()
        ledger.grouped = Combiner()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
