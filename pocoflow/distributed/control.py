"""Cancel and pause flags in Redis, and ``RemoteControl``: RunHandle's steering wheel for
distributed runs (G4).

The ledger's ``pf_runs.control`` column is the source of truth: every request is written
there first, so a cancelled run never runs another node even if Redis lost its keys (a
restart without persistence). The Redis flags are the fast path a long ``exec`` polls
through ``Node.cancelled()`` without hitting the database every half second.

Redis being down never fails a request: writes retry with backoff for a bounded time and
then give up with a warning (the ledger has the request); reads report "unknown" and the
caller falls back to the ledger.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pocoflow.commit import PARKED_OWNER
from pocoflow.logging import get_logger
from pocoflow.settings import mask_url

if TYPE_CHECKING:
    import redis

    from pocoflow.db import WorkflowDB
    from pocoflow.distributed.publish import Publisher

_log = get_logger("distributed.control")

T = TypeVar("T")

CANCEL = "cancel"
PAUSE = "pause"
FLAGS = (CANCEL, PAUSE)
KEY_TEMPLATE = "pocoflow:{run_id}:{flag}"
#: Because a paused run may sit for days; when a flag expires the ledger still holds it.
FLAG_TTL_S = 7 * 24 * 3600
#: How long a flag write keeps retrying a Redis that is down before it leaves the
#: request to the ledger alone.
WRITE_BUDGET_S = 3.0
#: Socket timeouts: a flag read sits on the step's hot path, so a dead Redis must cost
#: at most this long before the ledger answers instead.
SOCKET_TIMEOUT_S = 0.5
#: Because Redis saying "no flag" may only mean the flag never landed: a running exec's
#: cancel probe asks the ledger at least this often (G4 within a few seconds regardless).
LEDGER_CONFIRM_S = 5.0


def flag_key(run_id: str, flag: str) -> str:
    if flag not in FLAGS:
        raise ValueError(f"Unknown control flag {flag!r}; known: {', '.join(FLAGS)}")
    return KEY_TEMPLATE.format(run_id=run_id, flag=flag)


@functools.lru_cache(maxsize=8)
def redis_client(url: str) -> redis.Redis:
    """One client (and connection pool) per URL per process; redis-py re-opens its
    connections after a fork, so prefork children can share the cached object."""
    import redis as redis_lib

    return redis_lib.Redis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
    )


def with_retry(
    call: Callable[[], T],
    *,
    budget_s: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T | None:
    """``call()``, retried with doubling backoff while Redis is unreachable, for at most
    ``budget_s`` seconds; ``None`` when it never answered (the caller falls back to the
    ledger)."""
    from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError

    deadline = clock() + budget_s
    delay = 0.05
    while True:
        try:
            return call()
        except (RedisConnectionError, TimeoutError, OSError) as exc:
            if clock() + delay > deadline:
                _log.warning("Redis unreachable while %s (%s); the ledger decides", what, exc)
                return None
            sleep(delay)
            delay = min(delay * 2, 1.0)


def set_flag(
    client: redis.Redis,
    run_id: str,
    flag: str,
    *,
    ttl_s: int = FLAG_TTL_S,
    budget_s: float = WRITE_BUDGET_S,
) -> bool:
    """Raise ``flag`` for ``run_id``; False if Redis stayed unreachable for ``budget_s``."""
    key = flag_key(run_id, flag)
    return bool(
        with_retry(lambda: client.set(key, "1", ex=ttl_s), budget_s=budget_s, what=f"setting {key}")
    )


def clear_flag(
    client: redis.Redis, run_id: str, flag: str, *, budget_s: float = WRITE_BUDGET_S
) -> bool:
    key = flag_key(run_id, flag)
    done = with_retry(lambda: client.delete(key), budget_s=budget_s, what=f"clearing {key}")
    return done is not None


def read_flags(client: redis.Redis, run_id: str, *, budget_s: float = 0.0) -> frozenset[str] | None:
    """The flags raised for ``run_id``, or ``None`` when Redis did not answer."""
    keys = [flag_key(run_id, flag) for flag in FLAGS]
    values = with_retry(
        lambda: client.mget(keys), budget_s=budget_s, what=f"reading flags of {run_id}"
    )
    if values is None:
        return None
    return frozenset(flag for flag, value in zip(FLAGS, values, strict=True) if value is not None)


class FlagReader:
    """A cached cancel probe for a running ``exec`` (G4): Redis at most every
    ``interval_s``, the ledger when Redis does not answer or says cancel, and the ledger
    anyway at most every ``ledger_interval_s``: Redis saying "no flag" is not proof, since
    a cancel's flag can miss Redis (restarted empty, or ``set_flag`` gave up) while the
    ledger holds it. One indexed row read every few seconds of a long exec; none on a
    step that ends sooner."""

    def __init__(
        self,
        run_id: str,
        client: redis.Redis | None,
        db: WorkflowDB,
        *,
        interval_s: float = 0.5,
        ledger_interval_s: float = LEDGER_CONFIRM_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_id = run_id
        self.client = client
        self.db = db
        self.interval_s = interval_s
        self.ledger_interval_s = ledger_interval_s
        self.clock = clock
        self._checked_at: float | None = None
        self._ledger_at: float | None = None
        self._cancelled = False

    def __call__(self) -> bool:
        if self._cancelled:
            return True
        now = self.clock()
        if self._checked_at is not None and now - self._checked_at < self.interval_s:
            return False
        self._checked_at = now
        if self._ledger_at is None:
            self._ledger_at = now  # the guard read the ledger just before exec started
        flags = read_flags(self.client, self.run_id) if self.client is not None else None
        # Redis did not answer, or says cancel (a flag can outlive a resume that could not
        # reach Redis to clear it), or says nothing for a while: the ledger decides.
        if flags is None or CANCEL in flags or now - self._ledger_at >= self.ledger_interval_s:
            self._ledger_at = now
            run = self.db.get_run(self.run_id) or {}
            self._cancelled = run.get("control") == CANCEL or run.get("status") == "cancelled"
        return self._cancelled


class LedgerControl:
    """RunHandle's control for a run executing in some process (``run_background``) rather
    than on the workers: requests land in the ledger's ``control`` column, which that
    process reads before every node (G4), so ``attach(run_id).cancel()`` and
    ``pocoflow cancel`` reach it from anywhere."""

    def __init__(self, run_id: str, db: WorkflowDB) -> None:
        self.run_id = run_id
        self.db = db

    def cancel(self, terminate: bool = False) -> None:
        """``terminate`` cannot interrupt another process's ``exec``; the run stops before
        its next node, and a long ``exec`` that polls ``self.cancelled()`` stops early."""
        from pocoflow.distributed import lifecycle

        if not lifecycle.request_cancel(self.db, self.run_id):
            _log.info("Run %s already finished; cancel ignored", self.run_id)

    def pause(self) -> None:
        from pocoflow.distributed import lifecycle

        lifecycle.request_pause(self.db, self.run_id)

    def resume(self) -> None:
        """Withdraw the pause request; the process holding the run goes on."""
        self.db.update_run_if(self.run_id, control_in=("pause",), control=None)

    @property
    def cancelled(self) -> bool:
        run = self.db.get_run(self.run_id) or {}
        return run.get("status") == "cancelled" or run.get("control") == CANCEL

    @property
    def paused(self) -> bool:
        run = self.db.get_run(self.run_id) or {}
        return run.get("status") == "paused" or run.get("control") == PAUSE

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r})"


class RemoteControl(LedgerControl):
    """RunHandle's control for a run on the workers: ``cancel(terminate)``, ``pause``,
    ``resume``, ``cancelled``, ``paused`` (G4).

    Every request lands in the ledger first (source of truth), then in Redis (fast path).
    """

    def __init__(
        self,
        run_id: str,
        db: WorkflowDB,
        *,
        redis_url: str | None,
        publisher_factory: Callable[[], Publisher],
        lease_s: float,
    ) -> None:
        super().__init__(run_id, db)
        self.redis_url = redis_url
        self._publisher_factory = publisher_factory
        self.lease_s = lease_s

    def _redis(self) -> redis.Redis | None:
        return redis_client(self.redis_url) if self.redis_url else None

    def cancel(self, terminate: bool = False) -> None:
        """Stop the run before its next node; ``terminate`` also kills the running step's
        task (Celery revoke with terminate), whose attempt then commits nothing."""
        super().cancel()
        if not self._raise(CANCEL):
            _log.warning(
                "Cancel of run %s recorded in the ledger only (Redis %s unreachable)",
                self.run_id,
                mask_url(self.redis_url),
            )
        if terminate:
            self._terminate_running_step()

    def _terminate_running_step(self) -> None:
        """Revoke the outstanding step's task (its process is killed) and fence its
        attempt out, so even a process that survives the signal commits nothing (G1)."""
        latest = self.db.latest_checkpoint(self.run_id)
        step = latest["step"] + 1 if latest else 0
        row = self.db.get_step(self.run_id, step)
        if row is None or row["status"] not in ("queued", "running"):
            return
        publisher = self._publisher_factory()
        if row["lease_owner"] == PARKED_OWNER:  # a map step: its items run, not the step
            self._terminate_running_items(step, publisher)
        # The running attempt's own row names the task it runs under (written at claim);
        # the outbox's task id may not be marked yet (marks are batched).
        running = [
            a["task_id"]
            for a in self.db.get_attempts(self.run_id)
            if a["step"] == step and a["ended_at"] is None and a.get("task_id")
        ]
        for task_id in running or ([row["task_id"]] if row.get("task_id") else []):
            _log.info("Run %s: revoking task %s (terminate)", self.run_id, task_id)
            publisher.revoke(task_id, terminate=True)
        self.db.end_attempt(self.run_id, step, row["attempt"], None, "terminated")
        self.db.take_over(self.run_id, step, row["attempt"], self.lease_s, force=True)

    def send(self, key: str, value: Any) -> None:
        """Deliver ``value`` for ``key``; a run waiting on it goes on on the workers."""
        from pocoflow.distributed import lifecycle

        publisher = self._publisher_factory()
        lifecycle.send_value(self.db, self.run_id, key, value, publisher, lease_s=self.lease_s)

    def _terminate_running_items(self, step: int, publisher: Any) -> None:
        """Revoke the tasks of the map step's running items and re-queue each under a
        new attempt (fencing the killed holders out, G1): a resume runs them again."""
        for item in self.db.running_items(self.run_id, step):
            if item["task_id"]:
                _log.info("Run %s: revoking item task %s (terminate)", self.run_id, item["task_id"])
                publisher.revoke(item["task_id"], terminate=True)
            self.db.take_over_item(
                self.run_id, step, item["idx"], item["attempt"], item["lease_owner"]
            )

    def pause(self) -> None:
        """Hold the run before its next node; the worker that meets the request marks the
        run ``paused`` and leaves the step queued for ``resume``."""
        super().pause()
        self._raise(PAUSE)

    def _raise(self, flag: str) -> bool:
        """Raise ``flag`` in Redis and take the run's waiters out of the limits' queues:
        a stopped run asks no more, and a newcomer under the same limit key must not be
        told to come back after it. False if Redis stayed unreachable (then the first of
        the run's waiting messages to come back meets the stop and clears them: see
        ``WorkerContext.forget_waiters``)."""
        from pocoflow.distributed.limiter import forget_waiters

        client = self._redis()
        if client is None:
            return True
        if not set_flag(client, self.run_id, flag):
            return False  # its budget spent already: no second wait for the purge
        if flag == CANCEL:
            # A pause is only a request until a worker parks the run (which purges
            # then): a resume may withdraw it first, and the run's places must stand.
            forget_waiters(client, self.run_id)
        return True

    def resume(self) -> None:
        """Let a paused run go on: clears the request and, if a worker already parked the
        run, re-enqueues its outstanding step. A failed or cancelled run is sent back to
        the workers from its last checkpoint, as ``pocoflow resume RUN`` does."""
        from pocoflow.distributed import lifecycle

        client = self._redis()
        if client is not None:
            clear_flag(client, self.run_id, PAUSE)
        publisher = self._publisher_factory()
        if lifecycle.resume_paused(self.db, self.run_id, publisher, lease_s=self.lease_s):
            return
        run = self.db.get_run(self.run_id) or {}
        if run.get("status") in ("failed", "cancelled"):
            if client is not None:
                clear_flag(client, self.run_id, CANCEL)
            lifecycle.restart(
                self.db,
                self.run_id,
                publisher,
                lease_s=self.lease_s,
                status_in=("failed", "cancelled"),
            )
