"""A process forked while another of its threads is inside an SQLite transaction (Celery's
prefork pool replacing a dead child while the worker's heartbeat or sweeper thread
writes) gets a ledger it can write to.

SQLite keeps the locks of a process's connections in process memory; a child forked in
the middle of a transaction inherits that bookkeeping without the locks, and every
connection it opens to the file then waits for a lock no live process holds ("database is
locked" for ever: seen as a step never claimed in CI). SQLite-only by nature.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from sqlalchemy import text

from pocoflow.db import WorkflowDB
from pocoflow.flow import Flow
from pocoflow.node import Node

HOLD_S = 0.3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is a POSIX call")
@pytest.mark.parametrize("kind", ["write", "read"])
def test_a_child_forked_during_a_transaction_can_write(tmp_path, kind: str) -> None:
    db = WorkflowDB(tmp_path / "fork.db", busy_timeout=1.0)
    db.create_run("r-1", "f")
    engine = db._ledger.engine  # the pooled engine every WorkflowDB on the file shares
    inside = threading.Event()

    def hold_a_transaction() -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if kind == "write" else "BEGIN")
            conn.execute(text("SELECT count(*) FROM pf_runs")).scalar()
            if kind == "write":
                conn.execute(text("UPDATE pf_runs SET total_steps = 1"))
            inside.set()
            threading.Event().wait(HOLD_S)  # the transaction's own length: the fault
            conn.exec_driver_sql("COMMIT")

    holder = threading.Thread(target=hold_a_transaction)
    holder.start()
    assert inside.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: write through the inherited WorkflowDB, exit 0 if it can
        code = 1
        try:
            db.update_run("r-1", total_steps=2)
            code = 0 if db.get_run("r-1")["total_steps"] == 2 else 3
        except BaseException:
            code = 2
        os._exit(code)
    holder.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child could not write"
    assert db.get_run("r-1")["total_steps"] == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is a POSIX call")
def test_a_child_forked_while_a_writer_queues_in_this_process_can_write(tmp_path) -> None:
    # A thread of the parent holds the process's writer queue (``txn``) at the fork: the
    # child, where that thread does not exist, must not find it held.
    db = WorkflowDB(tmp_path / "queue.db", busy_timeout=1.0)
    db.create_run("r-1", "f")
    writers = db._ledger.writers
    assert writers.acquire(timeout=5)
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                db.update_run("r-1", total_steps=7)
                code = 0
            except BaseException:
                code = 2
            os._exit(code)
        deadline = time.monotonic() + 20
        while True:  # the child either writes (exit 0) or hangs on the inherited lock
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            threading.Event().wait(0.02)
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    finally:
        writers.release()
    assert done and os.waitstatus_to_exitcode(status) == 0, "the forked child hung on the lock"
    assert db.get_run("r-1")["total_steps"] == 7


class Tick(Node):
    """One step that changes one key: a run of these writes the ledger back to back."""

    def post(self, store, prep_result, result):
        store["n"] += 1
        return "next" if store["n"] < store["until"] else "done"


def tick_flow(url: str) -> Flow:
    node = Tick()
    node.then("next", node)
    return Flow(start=node, db_path=url, flow_name="tick", max_steps=10**9)


FORKS = 10
CHILD_TIMEOUT_S = 30.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is a POSIX call")
def test_children_forked_during_a_run_writing_back_to_back_all_finish_a_flow(tmp_path) -> None:
    """A background run commits step after step on one thread; the main thread forks
    ``FORKS`` times. A run writing back to back must not starve the fork gate (its next
    transaction waits while a fork is pending), else after ``FORK_WAIT_S`` the fork goes on
    mid-transaction and the child can hang for ever inside sqlite3 (its mutexes held by a
    thread the child does not have). Every child must run a small flow to its end."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db = WorkflowDB(url)
    handle = tick_flow(url).run_background({"n": 0, "until": 10**9})
    children: list[int] = []

    def steps() -> int:
        run = db.get_run(handle.run_id)  # None until the run's first transaction
        return 0 if run is None else int(run["total_steps"] or 0)

    try:
        for _ in range(FORKS):
            before = steps()
            deadline = time.monotonic() + 20
            while steps() < before + 3:  # writing now
                assert time.monotonic() < deadline, "the background run stopped writing"
                time.sleep(0.005)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = 0 if tick_flow(url).run({"n": 0, "until": 3})["n"] == 3 else 3
                except BaseException:
                    code = 2
                os._exit(code)
            children.append(pid)
    finally:
        handle.cancel()
        codes = _reap(children, CHILD_TIMEOUT_S)
    assert codes == [0] * FORKS, "children that hung (None) or could not run a flow"
    handle.wait(30)


def _reap(pids: list[int], timeout_s: float) -> list[int | None]:
    """Each child's exit code, or None for one still running after ``timeout_s`` (then
    killed)."""
    codes: dict[int, int | None] = {}
    deadline = time.monotonic() + timeout_s
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            codes[pid] = None
    return [codes[pid] for pid in pids]
