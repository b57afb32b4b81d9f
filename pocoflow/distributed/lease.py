"""Lease renewal for the steps a worker process is running (G3).

One daemon thread per process renews every held lease each ``lease/3``: a live worker
keeps its step however long ``exec`` takes, a dead or frozen one stops renewing and the
sweeper takes the step over. One long-lived thread rather than one per step, because
starting a thread costs about a millisecond on a busy interpreter, which on a fast node
is most of the step. A renewal that finds the lease gone marks the holding lost; the
commit would be refused anyway (fencing), this only lets the step log it early.

The first hold in a process also starts the process's liveness heartbeat (``liveness``):
the sweeper recovers a dead process's step when its heartbeat stops (about 3 s), well
before its lease runs out; the lease stays as the backstop.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pocoflow.distributed import liveness
from pocoflow.ledger.items import ItemClaim
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB

_log = get_logger("distributed.lease")


@dataclass
class Holding:
    run_id: str
    step: int
    attempt: int
    holder: str
    lost: bool = False
    #: The item of a map step this holding is of (None: the step itself).
    idx: int | None = None


class LeaseKeeper:
    def __init__(self, db: WorkflowDB, lease_s: float, heartbeat_s: float | None = None) -> None:
        self.db = db
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.interval_s = lease_s / 3
        self._held: dict[int, Holding] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._beating: tuple[int, str] | None = None

    def _heartbeat_s(self) -> float:
        if self.heartbeat_s is None:
            from pocoflow.settings import Settings

            self.heartbeat_s = Settings.from_env().heartbeat_seconds
        return self.heartbeat_s

    @contextmanager
    def hold(
        self, run_id: str, step: int, attempt: int, holder: str, idx: int | None = None
    ) -> Iterator[Holding]:
        """Keep the lease of ``holder``'s claim of this attempt (of the step, or of its
        item ``idx``) renewed while the block runs. The holder token is
        ``<worker id>#<n>``; the heartbeat is the worker's."""
        holding = Holding(run_id, step, attempt, holder, idx=idx)
        with self._lock:
            self._ensure_thread()
            self._beat_as(holder.rpartition("#")[0] or holder)
            self._held[id(holding)] = holding
        try:
            yield holding
        finally:
            with self._lock:
                self._held.pop(id(holding), None)

    def beating(self, worker: str) -> None:
        """Have this process beat as ``worker`` before it claims anything: a process that
        dies right after its first claim is then known, and found dead in seconds (G3),
        instead of its step waiting out the lease backstop."""
        with self._lock:
            self._beat_as(worker)

    def _beat_as(self, worker: str) -> None:
        if self._beating != (os.getpid(), worker):
            liveness.ensure(self.db, worker, self._heartbeat_s())
            self._beating = (os.getpid(), worker)

    def release(self, holding: Holding) -> None:
        """Stop renewing ``holding`` before its block ends: a map step whose fan-out
        committed holds no lease any more (its items do), so renewing it would only
        report it lost."""
        with self._lock:
            self._held.pop(id(holding), None)

    def _ensure_thread(self) -> None:
        # After a fork the parent's thread is gone: the child starts its own.
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="pocoflow-lease", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        wake = threading.Event()
        while True:
            wake.wait(self.interval_s)
            with self._lock:
                held = list(self._held.values())
            for holding in held:
                self.renew(holding)

    def renew(self, holding: Holding) -> None:
        if holding.lost:
            return
        h = holding
        try:
            if h.idx is None:
                renewed = self.db.renew_lease(h.run_id, h.step, h.attempt, h.holder, self.lease_s)
            else:
                claim = ItemClaim(h.run_id, h.step, h.idx, h.attempt, h.holder)
                renewed = self.db.renew_item_lease(claim, self.lease_s)
        except Exception as exc:  # the ledger blinked: try again next beat
            _log.warning(
                "Lease renewal of step %d of run %s failed: %s", holding.step, holding.run_id, exc
            )
            return
        if not renewed:
            holding.lost = True
            with self._lock:
                if id(holding) not in self._held:  # it ended (committed) meanwhile
                    return
            what = "" if h.idx is None else f" item {h.idx}"
            _log.warning(
                "Step %d%s of run %s: attempt %d lost its lease; its commit will be refused",
                h.step,
                what,
                h.run_id,
                h.attempt,
            )
