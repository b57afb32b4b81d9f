"""Reusable fault operations for the distributed suite: real worker processes, kill -9,
SIGSTOP/SIGCONT, Redis restarts, network partitions (a loopback TCP proxy).

Workers are started exactly as ``pocoflow worker`` starts them (``worker_argv``), each in
its own session (process group), so a fault can hit one worker node (main process and
pool children) and teardown can reap everything it started, and nothing else.
Readiness and every fault outcome are polled, never slept for.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pocoflow import devcluster
from pocoflow.devcluster import WorkerProcess
from tests.helpers import wait_until

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from tests.servers import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
FLOWS_MODULE = "tests.distributed.flows"
#: Short lease and sweep so a lost step is re-run within ~3 s in tests (G3).
TEST_LEASE_S = 2.0
TEST_SWEEP_S = 0.5


def worker_env(
    db_url: str,
    broker_url: str,
    *,
    lease_s: float = TEST_LEASE_S,
    sweep_s: float = TEST_SWEEP_S,
    flows: str = FLOWS_MODULE,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a test worker: only our POCOFLOW_* settings, never the caller's."""
    env = devcluster.worker_environment(
        db_url, broker_url, flows, lease_s=lease_s, sweep_s=sweep_s, pythonpath=str(REPO_ROOT)
    )
    env.update(extra or {})
    return env


def start_worker(
    name: str,
    env: dict[str, str],
    log_dir: Path,
    *,
    concurrency: int = 1,
    queues: str | None = None,
    pool: str | None = None,
) -> WorkerProcess:
    """Start a worker node from the repository root (not waiting: call ``wait_ready``)."""
    return devcluster.start_worker(
        name, env, log_dir, cwd=REPO_ROOT, concurrency=concurrency, queues=queues, pool=pool
    )


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ── ledger views ─────────────────────────────────────────────────────────────


def open_attempt(db: WorkflowDB, run_id: str, step: int) -> dict[str, Any] | None:
    """The attempt of ``step`` that is running now (started, not ended), if any."""
    for attempt in reversed(db.get_attempts(run_id)):
        if attempt["step"] == step and attempt["ended_at"] is None:
            return attempt
    return None


def step_pid(db: WorkflowDB, run_id: str, step: int, timeout: float = 30.0) -> int:
    """The pid of the process running ``step`` of ``run_id``, from its ``pf_attempts`` row
    (``worker`` = ``hostname:pid``)."""
    attempt = wait_until(lambda: open_attempt(db, run_id, step), timeout)
    return int(str(attempt["worker"]).rsplit(":", 1)[1])


def worker_running(workers: list[WorkerProcess], pid: int) -> WorkerProcess:
    for worker in workers:
        if worker.owns(pid):
            return worker
    raise AssertionError(f"no test worker owns pid {pid}")


def freeze_outside_a_write(worker: WorkerProcess, db_url: str, timeout: float = 30.0) -> None:
    """SIGSTOP ``worker`` at a moment it holds no SQLite write lock.

    A process stopped inside a write transaction keeps the one SQLite write lock until it
    is continued, so every other writer of the file waits for it (an SQLite property, the
    README's "SQLite" section says so): a test about fencing a frozen holder needs the other
    workers to write. PostgreSQL has no file lock, so there it freezes at once."""
    if not db_url.startswith("sqlite"):
        worker.freeze()
        return
    import sqlite3

    path = db_url.split(":///", 1)[1]

    def frozen_with_the_file_free() -> bool:
        worker.freeze()
        probe = sqlite3.connect(path, timeout=0.5, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:  # it stopped mid-transaction: let it finish
            worker.thaw()
            return False
        finally:
            probe.close()

    wait_until(frozen_with_the_file_free, timeout, interval=0.05)


def attempts_of(db: WorkflowDB, run_id: str, step: int) -> list[dict[str, Any]]:
    return [a for a in db.get_attempts(run_id) if a["step"] == step]


def checkpoint_steps(db: WorkflowDB, run_id: str) -> list[int]:
    return [row["step"] for row in db.get_checkpoints(run_id)]


# ── Redis ────────────────────────────────────────────────────────────────────


def restart_redis(server: RedisServer, down_s: float = 0.0) -> None:
    """Stop the server (losing every queued message: no persistence) and start it again
    on the same port, optionally after staying down ``down_s`` seconds."""
    server.stop()
    if down_s:
        time.sleep(down_s)  # the outage itself is the fault under test, not a sync point
    server.start()


# ── network partitions ───────────────────────────────────────────────────────


class FaultProxy:
    """A TCP proxy (on 127.0.0.1 unless ``listen_host``) in front of one loopback server
    (Redis, PostgreSQL), for one client: ``partition()`` stops every byte both ways, as a
    cut cable would (the connections stay open, what is sent waits), ``heal()`` lets the
    held bytes through as TCP retransmission would, and ``reset()`` closes every
    connection at once. Its own kernel still acknowledges what the client sends, so a
    client's TCP never sees the cut: ``tests/ledger/test_pg_session_limits.py`` cuts a
    real link for that.

    Its targets are loopback servers only, by construction: it refuses any other.
    Threads are daemons and ``close()`` ends them, so a test cannot leave one behind.
    """

    BUFFER = 65536

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", listen_host: str = "127.0.0.1"
    ) -> None:
        if not ipaddress.ip_address(target_host).is_loopback:
            raise ValueError(f"FaultProxy proxies loopback servers only, not {target_host}")
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[Any] = set()
        self._listener = socket.create_server((listen_host, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._thread.start()

    def url_for(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        from sqlalchemy.engine import make_url

        if url.startswith("redis://"):
            path = url.split("://", 1)[1].partition("/")[2]
            return f"redis://{self.listen_host}:{self.port}/{path}"
        proxied = make_url(url).set(host=self.listen_host, port=self.port)
        return proxied.render_as_string(hide_password=False)

    @property
    def partitioned(self) -> bool:
        return not self._flowing.is_set()

    def partition(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def server_side_addresses(self) -> set[str]:
        """``host:port`` of this proxy's connections to its server, as the server names
        its clients (Redis ``CLIENT LIST`` addr, PostgreSQL ``pg_stat_activity``): which
        of the server's sessions belong to the client behind this proxy."""
        with self._lock:
            sockets = list(self._sockets)
        found = set()
        for sock in sockets:
            try:
                if sock.getpeername()[:2] == self.target:
                    host, port = sock.getsockname()[:2]
                    found.add(f"{host}:{port}")
            except OSError:  # closed meanwhile
                continue
        return found

    def reset(self) -> None:
        """Close every connection now (the server restarted, a NAT forgot them)."""
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        _close(self._listener)
        self.reset()
        self._thread.join(2)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        try:
            while True:
                data = src.recv(self.BUFFER)
                if not data:
                    break
                while not self._flowing.wait(0.2):  # partitioned: hold the bytes
                    if self._closed.is_set():
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                _close(sock)
            with self._lock:
                self._sockets.difference_update((src, dst))


def _close(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
