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
