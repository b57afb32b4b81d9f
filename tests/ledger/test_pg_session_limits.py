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


def _client_parameters(url: str) -> dict[str, str]:
    db = WorkflowDB(url)
    try:
        with db._ledger.engine.connect() as conn:
            return conn.connection.driver_connection.info.get_parameters()
    finally:
        db.close()


def test_the_client_side_limits_are_set_and_a_url_setting_wins(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fresh_postgres_database(database_url) as url:
        params = _client_parameters(url)
        assert (params["keepalives"], params["keepalives_idle"]) == ("1", "5")
        assert (params["tcp_user_timeout"], params["connect_timeout"]) == ("30000", "10")
        assert _client_parameters(url + "?keepalives_idle=30")["keepalives_idle"] == "30"
        monkeypatch.setenv("PGCONNECT_TIMEOUT", "42")
        assert _client_parameters(url)["connect_timeout"] == "42"


#: The socket ends 30 s after the peer last answered (``tcp_user_timeout``); room for a
#: loaded box.
HALF_OPEN_FOUND_WITHIN_S = 45.0

_WAIT_ON_THE_LINK = """
import sys, time
from sqlalchemy import text
from pocoflow.db import WorkflowDB

db = WorkflowDB(sys.argv[1])
conn = db._ledger.reader.connect()
print("waiting", flush=True)
started = time.monotonic()
try:
    conn.execute(text("SELECT pg_sleep(120)")).all()
    print("returned", time.monotonic() - started, flush=True)
except Exception as exc:
    print("failed", round(time.monotonic() - started, 1), type(exc).__name__, flush=True)
"""


class CutLink:
    """A network namespace joined to this one by a veth pair: a process run in it reaches
    this namespace's ``host_ip`` over a link ``cut()`` takes down on this side, as a cable
    pulled at the far end would. Nothing is closed, refused or answered: the process's
    socket is left half-open. (A proxy that stops forwarding cannot make one: its kernel
    still acknowledges. An address removed instead makes this namespace answer "host
    unreachable", which ends the socket by itself.)"""

    def __init__(self) -> None:
        import secrets

        tag = secrets.token_hex(4)  # names of this run only: never another's to delete
        self.ns, self.outer, self.inner = f"pfh{tag}", f"pfh{tag}a", f"pfh{tag}b"
        subnet = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(250)}"
        self.host_ip, self.ns_ip = f"{subnet}.1", f"{subnet}.2"
        self.made: list[list[str]] = []  # how to undo what was made, latest first

    def __enter__(self) -> CutLink:
        import os
        import shutil
        import subprocess

        if os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip("cutting a real link needs root and iproute2 (ip netns, veth)")
        ns, outer, inner = self.ns, self.outer, self.inner
        steps = [
            (["ip", "netns", "add", ns], ["ip", "netns", "del", ns]),
            (
                ["ip", "link", "add", outer, "type", "veth", "peer", "name", inner],
                ["ip", "link", "del", outer],  # either end deletes both
            ),
            (["ip", "link", "set", inner, "netns", ns], None),
            (["ip", "addr", "add", f"{self.host_ip}/30", "dev", outer], None),
            (["ip", "link", "set", outer, "up"], None),
            (["ip", "-n", ns, "addr", "add", f"{self.ns_ip}/30", "dev", inner], None),
            (["ip", "-n", ns, "link", "set", inner, "up"], None),
            (["ip", "-n", ns, "link", "set", "lo", "up"], None),
        ]
        for step, undo in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                self.__exit__()
                pytest.skip(f"cannot build a link to cut ({' '.join(step)}): {done.stderr}")
            if undo is not None:
                self.made.insert(0, undo)
        return self

    def popen(self, argv: list[str]) -> Any:
        import subprocess

        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *argv], stdout=subprocess.PIPE, text=True
        )

    def settled(self) -> bool:
        """Every byte the process sent was acknowledged (no TCP socket of its namespace
        has data in flight): a cut from now on leaves a call that only waits."""
        import subprocess

        shown = subprocess.run(
            ["ip", "netns", "exec", self.ns, "ss", "-tni", "state", "established"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return "bytes_acked" in shown and " unacked:" not in shown

    def cut(self) -> None:
        import subprocess

        subprocess.run(["ip", "link", "set", self.outer, "down"], check=True)

    def __exit__(self, *exc: object) -> None:
        import subprocess

        for undo in self.made:
            subprocess.run(undo, capture_output=True)
        self.made = []


def test_a_call_waiting_on_a_half_open_link_fails_instead_of_hanging(database_url: str) -> None:
    """A worker's ledger call waits for a reply (its query acknowledged) when its link
    dies without a word: the client's keepalive probes start after 5 s of silence and
    ``tcp_user_timeout`` ends the socket 30 s after the last answer, so the call fails (the
    ledger's retry, the lease and the sweeper take it from there). Without them the first
    probe would go out after the system's 2 hours, and an item-commit group leader would
    hold every commit of its process behind it until then."""
    import sys

    from sqlalchemy.engine import make_url

    from tests.distributed.faults import FaultProxy
    from tests.helpers import wait_until

    with fresh_postgres_database(database_url) as url, CutLink() as link:
        WorkflowDB(url).close()  # migrated here, not through the link
        port = make_url(url).port or 5432
        proxy = FaultProxy(port, listen_host=link.host_ip)
        waiter = link.popen([sys.executable, "-c", _WAIT_ON_THE_LINK, proxy.url_for(url)])
        try:
            if waiter.stdout.readline().strip() != "waiting":  # a firewall on the veth?
                pytest.skip("the server cannot be reached through the link to cut")
            admin = WorkflowDB(url)
            try:
                wait_until(lambda: _sleeping(admin, make_url(url).database), 30)
                wait_until(link.settled, 30)
            finally:
                admin.close()
            link.cut()
            started = time.monotonic()
            try:
                out = waiter.communicate(timeout=HALF_OPEN_FOUND_WITHIN_S)[0]
            except Exception:
                pytest.fail(f"the call still waits {HALF_OPEN_FOUND_WITHIN_S}s after the cut")
            assert out.startswith("failed"), out
            assert time.monotonic() - started >= 20.0  # the timeout found it, not luck
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.wait()
            proxy.close()


def _sleeping(db: WorkflowDB, database: str | None) -> bool:
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = :db AND query LIKE 'SELECT pg_sleep(120)%'"
    )
    with db._ledger.engine.connect() as conn:
        return bool(conn.execute(query, {"db": database}).scalar_one())
