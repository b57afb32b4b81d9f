"""Fork only between SQLite transactions.

Why: SQLite keeps the locks of a process's connections in that process's memory (per
file: who holds SHARED/RESERVED). A child forked while another thread of the parent is
inside a transaction inherits that bookkeeping but not the locks, so every connection it
opens to the same file waits for a lock no live process holds, and the child can never
write the ledger ("database is locked" for ever). Celery's prefork pool forks a new child
whenever one dies, at any moment, while the worker's heartbeat and sweeper threads write
the ledger several times a second; without this gate a replaced child is, now and then, a
worker that claims nothing.

So the SQLite engines report every connection checkout and checkin here, and a fork (of
any kind: ``os.register_at_fork``) first holds new checkouts of other threads back (until
the fork is done), then waits until no other thread holds a connection. A transaction lasts milliseconds; a
thread that keeps a connection longer than ``FORK_WAIT_S`` is not waited for (the fork
goes on, as it would without the gate, and says so in the log).

PostgreSQL needs none of this: its locks live in the server, and the pools are dropped
in the child (see ``engine._after_fork_in_child``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pocoflow.logging import get_logger

_log = get_logger("ledger.fork")

#: Longest a fork waits for the other threads' SQLite connections to come back.
FORK_WAIT_S = 5.0


class ForkGate:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        # The condition's own lock, taken directly on the checkout and checkin paths (every
        # ledger transaction passes both): cheaper than the condition's ``with``. Reentrant:
        # a garbage collection run while this thread holds it may close a dropped ledger's
        # kept connection, which passes the gate too (``engine.close_loan``).
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        #: Checked-out connections (their pool records) -> the thread holding each.
        self._held: dict[int, int] = {}
        #: The thread that is forking, from the moment it asks (``before_fork``) until the
        #: fork is done: other threads wait before a checkout meanwhile.
        self._forking: int | None = None

    def checkout(self, _dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        me = threading.get_ident()
        with self._lock:
            # A pending fork holds new checkouts back, or a thread writing back to back
            # would check out again before the forking thread runs, and the fork would
            # wait out FORK_WAIT_S and go on mid-transaction. Not the forking thread's, nor
            # those of a thread already holding a connection (which the fork waits for:
            # holding it back would deadlock both until FORK_WAIT_S).
            while (
                self._forking is not None and self._forking != me and me not in self._held.values()
            ):
                self._cond.wait()
            self._held[id(record)] = me

    def checkin(self, _dbapi_conn: Any, record: Any) -> None:
        with self._lock:
            if self._held.pop(id(record), None) is not None and self._forking is not None:
                self._cond.notify_all()

    def before_fork(self) -> None:
        me = threading.get_ident()
        with self._lock:
            while self._forking is not None and self._forking != me:  # another thread forks
                self._cond.wait()
            self._forking = me  # from now on no other thread starts a transaction
            deadline = time.monotonic() + FORK_WAIT_S
            while any(thread != me for thread in self._held.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning(
                        "forking while another thread holds an SQLite ledger connection "
                        "(%d held): the child may find the ledger locked",
                        len(self._held),
                    )
                    break
                self._cond.wait(left)

    def after_fork_in_parent(self) -> None:
        with self._lock:
            self._forking = None
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        # One thread in the child, and the parent's connections are not the child's.
        self._reset()


gate = ForkGate()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=gate.before_fork,
        after_in_parent=gate.after_fork_in_parent,
        after_in_child=gate.after_fork_in_child,
    )
