"""Per-process liveness heartbeat, and which step messages a worker holds unstarted (G3).

Why a heartbeat rather than only shorter leases: a lease is renewed per held step and
says nothing about the messages a worker has received but not started (its prefetch
buffer, countdown retries). One row per worker process in ``pf_workers`` (``beat_at`` on
the database's clock), written by one daemon thread every ``heartbeat`` seconds, lets the
sweeper recover both the step a dead, frozen or cut-off process was running and the ones
it was only holding, ``dead_after`` (3 beats) after its last beat instead of after a
10 s lease: kill -9 -> re-run start <= dead_after + sweep interval (about 4 s by default).

Hot path cost: none per step. The heartbeat is one small write per process per second.
What a Celery worker holds unstarted is read from Celery's own in-memory state
(``reserved_requests`` minus ``active_requests``, plus ``scheduled_requests``) by the
same thread, and written only for messages held across two looks (0.2 s apart): a
message taken straight into the pool, which is every step of a busy chain, costs nothing.
What this does not cover, by design: a message received less than ~0.4 s before its
worker died is not known to the ledger; on a Redis broker its unacknowledged entry finds
it (``distributed.orphans``), elsewhere the broker gives it back (RabbitMQ) or the
queued-step backstop does (``sweeper.REQUEUE_AFTER_S`` once the broker's queues are
empty, ``REQUEUE_CAP_S`` at the latest). One in flight between the worker's main process
and its pool child, or acknowledged by a child that died before its claim, is found by
the step's lease or that backstop: a message that leaves the process's hands is unmarked
at the next look (one its claim started is unmarked by the claim already), so a lost one
is not taken for held by a live process.
A process starved of the GIL for ``dead_after`` (a C call that never releases it) is
taken for dead; its step is re-run and its own late commit refused (G1), never doubled.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB

_log = get_logger("distributed.liveness")

StepKey = tuple[Any, ...]
"""(run_id, step, attempt) of a step message, (run_id, step, idx, attempt) of an item's."""
Held = Callable[[], set[StepKey]]

#: How often the thread looks at what the process holds (not a write: see module doc).
LOOK_S = 0.2
#: Missed beats after which a process is taken for dead.
DEAD_AFTER_BEATS = 3
#: How long a stop waits for a beat under way (a write that may wait out a lock).
STOP_JOIN_S = 5.0


def dead_after(heartbeat_s: float) -> float:
    """Silence after which a worker process is taken for dead: three missed beats, so one
    slow ledger write does not cost a live worker its step."""
    return DEAD_AFTER_BEATS * heartbeat_s


class Heartbeat:
    """The heartbeat thread of one process; ``ensure`` starts at most one per pid."""

    def __init__(self, db: WorkflowDB, worker: str, heartbeat_s: float) -> None:
        self.db = db
        self.worker = worker
        self.heartbeat_s = heartbeat_s
        self.held: Held | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pocoflow-heartbeat", daemon=True)

    def beat(
        self, received: list[StepKey] | None = None, released: list[StepKey] | None = None
    ) -> bool:
        from pocoflow.ledger.liveness import record_beat

        try:
            record_beat(
                self.db,
                self.worker,
                socket.gethostname(),
                os.getpid(),
                received or [],
                released=released or [],
            )
        except Exception as exc:  # the ledger blinked: the next beat tries again
            _log.warning("Heartbeat of worker %s failed: %s", self.worker, exc)
            return False
        return True

    def _run(self) -> None:
        last = time.monotonic()
        seen: set[StepKey] = set()
        recorded: set[StepKey] = set()
        released: set[StepKey] = set()
        while not self._stop.wait(LOOK_S if self.held is not None else self.heartbeat_s):
            held = _safely(self.held) if self.held is not None else set()
            if held is None:  # this look failed: judge nothing from it, but beat on
                if time.monotonic() - last >= self.heartbeat_s and self.beat():
                    last = time.monotonic()
                continue
            # Written only when held across two looks: a message the pool took at once
            # (every step of a busy chain) never costs a write.
            new = [key for key in held if key in seen and key not in recorded]
            # Recorded, no longer held: started (its claim cleared the mark already) or
            # lost inside this process (handed to a pool child that died): unmarked, so
            # the sweeper does not take it for held by this live process. With the next
            # beat due anyway, in one statement: a busy process's stream of started
            # messages costs no write of its own.
            released = (released | (recorded - held)) - held
            recorded &= held
            seen = held
            due = new or time.monotonic() - last >= self.heartbeat_s
            if due and self.beat(new, list(released)):
                last = time.monotonic()
                recorded |= set(new)
                released = set()

    def stop(self) -> None:
        """A clean stop: no more beats, and the ledger told this process is gone, so what
        it held unstarted is sent again at the next sweep. A beat under way is waited
        for first: landing after the stop, it would make the process look alive again
        (and write to a ledger its owner is about to close)."""
        from pocoflow.ledger.liveness import record_stop

        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STOP_JOIN_S)
        try:
            record_stop(self.db, self.worker)
        except Exception as exc:
            _log.warning("Could not record worker %s stopped: %s", self.worker, exc)


_lock = threading.Lock()
# (pid, ledger url, worker id) -> its heartbeat: one per process in a worker; tests that
# build several in-process contexts on several ledgers get one each.
_running: dict[tuple[int, str, str], Heartbeat] = {}


def ensure(
    db: WorkflowDB, worker: str, heartbeat_s: float, *, held: Held | None = None
) -> Heartbeat:
    """This process's heartbeat, started on first call (the first beat is written before
    returning, so the process is known before it claims anything). A ``held`` source
    (the Celery main process's prefetch view) is added to a running heartbeat too."""
    key = (os.getpid(), db.url, worker)
    with _lock:
        heartbeat = _running.get(key)
        if heartbeat is None:
            heartbeat = Heartbeat(db, worker, heartbeat_s)
            heartbeat.beat()
            heartbeat._thread.start()
            _running[key] = heartbeat
        if held is not None:
            heartbeat.held = held
        return heartbeat


def stop(only: Heartbeat | None = None) -> None:
    """Stop this process's heartbeats (or ``only`` that one) cleanly: worker shutdown."""
    with _lock:
        for key in [k for k in _running if k[0] == os.getpid()]:
            if only is None or _running[key] is only:
                _running.pop(key).stop()


def _safely(held: Held) -> set[StepKey] | None:
    """What the process holds, or None when the look failed: an empty set would read as
    "everything went" and unmark messages still held."""
    try:
        return held()
    except Exception as exc:  # a look that failed is retried at the next one
        _log.debug("Could not list held messages: %s", exc)
        return None


def celery_held(task_name: str, item_task_name: str | None = None) -> Held:
    """What this Celery worker process received and has not started: reserved (prefetched)
    but not active, or waiting for a countdown. Read from Celery's in-memory state. Step
    messages give ``(run_id, step, attempt)``, map item messages (``item_task_name``)
    ``(run_id, step, idx, attempt)``."""

    def held() -> set[StepKey]:
        from celery.worker import state

        for _ in range(3):  # the consumer thread may change the sets while we copy them
            try:
                waiting = [*state.reserved_requests, *state.scheduled_requests]
                active = set(state.active_requests)
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError("Celery's request sets kept changing while being copied")
        keys: set[StepKey] = set()
        for request in waiting:
            # request.name is the display name (the publisher's shadow, FLOW.NODE); the
            # task that will run is request.task.
            task = getattr(request.task, "name", None)
            if request in active or task not in (task_name, item_task_name):
                continue
            args = request.args
            body = args[0] if args else None
            if isinstance(body, dict):
                try:
                    run_step = (str(body["run_id"]), int(body["step"]))
                    if task == task_name:
                        keys.add((*run_step, int(body["attempt"])))
                    else:
                        keys.add((*run_step, int(body["idx"]), int(body["attempt"])))
                except (KeyError, TypeError, ValueError):
                    continue  # malformed: the executor records it when it runs
        return keys

    return held
