"""The sweeper: finds steps nobody is working on and sends them again (G3).

Two kinds of orphans:

* an outbox row never published (the committing worker died between commit and send,
  or the broker was down): sent again with its current attempt;
* a step whose lease expired (its worker was killed, frozen or partitioned, or its
  message was lost in a dead worker's prefetch buffer or a Redis restart): taken over
  under a new attempt, which fences the old holder out (G1), and sent.

Several workers sweep at once safely: ``take_over`` is a fenced update, so for one
expired lease exactly one sweeper gets the new attempt and the others get ``None``; a
duplicate resend of an unsent row carries the same attempt, and only one delivery can
claim it. The sweep itself is pure of timing: ``now`` is injected, the thread only
decides how often to call it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pocoflow.distributed.message import StepMessage
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from pocoflow.ledger.prune import Pruner

_log = get_logger("distributed.sweeper")

#: An outbox row younger than this is probably being published right now by the worker
#: that committed it; resending it would only make a duplicate.
UNSENT_GRACE_S = 1.0

Publish = Callable[..., bool]
"""``publish(message, queue=...) -> bool``: a ``Publisher`` or a test double."""


@dataclass
class SweepReport:
    resent: list[tuple[str, int]] = field(default_factory=list)
    taken_over: list[tuple[str, int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.resent or self.taken_over)


def sweep(
    db: WorkflowDB,
    publish: Publish,
    *,
    lease_s: float,
    now: float | None = None,
    grace_s: float = UNSENT_GRACE_S,
) -> SweepReport:
    """One pass: resend unsent outbox rows older than ``grace_s``; then, for runs still
    live (not paused or finished), resend under the same attempt the expired steps nobody
    claimed, and take over (new attempt, fencing the old holder) the expired ones that a
    worker had claimed.

    ``now`` defaults to the database's clock, read once: the leases were written on it,
    and a sweeper on a host whose clock runs ahead must not take over live steps (G3)."""
    now = db.clock() if now is None else now
    report = SweepReport()
    runs: dict[str, dict[str, Any] | None] = {}

    def run_of(run_id: str) -> dict[str, Any] | None:
        if run_id not in runs:
            runs[run_id] = db.get_run(run_id)
        return runs[run_id]

    for row in db.unsent_steps(older_than_s=grace_s, now=now):
        run = run_of(row["run_id"])
        if run is None:
            continue
        message = _message(db, run, row, row["attempt"])
        _log.info("Resending unsent step %d of run %s", row["step"], row["run_id"])
        # A retry's row is leased for its backoff too (executor._retry): what is left of
        # that wait is its countdown, so a resend does not skip the backoff.
        wait = (row["lease_expires_at"] or now) - lease_s - now
        later = {"countdown": wait} if wait > 0 else {}
        if publish(message, queue=run.get("queue"), **later):
            report.resent.append((row["run_id"], row["step"]))

    for row in db.expired_steps(now=now):
        run = run_of(row["run_id"])
        if run is None:
            continue
        if row["status"] == "queued":  # sent, never claimed: same attempt, sent again
            if db.renew_queued(row["run_id"], row["step"], row["attempt"], lease_s, now=now):
                _log.warning(
                    "Step %d of run %s: attempt %d was never claimed; sending it again",
                    row["step"],
                    row["run_id"],
                    row["attempt"],
                )
                if publish(_message(db, run, row, row["attempt"]), queue=run.get("queue")):
                    report.resent.append((row["run_id"], row["step"]))
            continue
        new_attempt = db.take_over(row["run_id"], row["step"], row["attempt"], lease_s, now=now)
        if new_attempt is None:  # another sweeper (or the holder's renewal) won
            continue
        _log.warning(
            "Step %d of run %s: lease of attempt %d expired; re-running as attempt %d",
            row["step"],
            row["run_id"],
            row["attempt"],
            new_attempt,
        )
        report.taken_over.append((row["run_id"], row["step"], new_attempt))
        publish(_message(db, run, row, new_attempt), queue=run.get("queue"))
    return report


#: Outcomes after which the step can only go on through a resume, which starts tries at 1.
_FRESH_START_AFTER = frozenset({"failed", "refused", "cancelled", "terminated"})


def _message(db: WorkflowDB, run: dict[str, Any], row: dict[str, Any], attempt: int) -> StepMessage:
    """The step message for ``row``; ``try_number`` continues after the retries recorded
    since the step last ended for good (failed, refused, cancelled: a resume starts its
    tries afresh), so a lost retry message does not reset the ``max_retries`` budget."""
    retries = 0
    attempts = [a for a in db.get_attempts(row["run_id"]) if a["step"] == row["step"]]
    for previous in reversed(attempts):
        if previous["outcome"] in _FRESH_START_AFTER:
            break
        retries += previous["outcome"] == "retry"
    return StepMessage(
        run_id=row["run_id"],
        flow=run["flow_name"],
        step=row["step"],
        node_id=row["node_id"],
        attempt=attempt,
        try_number=retries + 1,
    )


class SweeperThread(threading.Thread):
    """Calls ``sweep`` every ``interval_s`` on a daemon thread until ``stop()``.

    A failing sweep (ledger unreachable) is logged and tried again next interval: the
    sweeper must outlive the outages it exists to repair.
    """

    def __init__(
        self,
        db_factory: Callable[[], WorkflowDB],
        publish_factory: Callable[[], Publish],
        *,
        lease_s: float,
        interval_s: float,
        pruner: Pruner | None = None,
    ) -> None:
        super().__init__(name="pocoflow-sweeper", daemon=True)
        self.pruner = pruner
        self._db_factory = db_factory
        self._publish_factory = publish_factory
        self.lease_s = lease_s
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        db = publish = None
        while not self._stop_event.wait(self.interval_s):
            try:
                if db is None or publish is None:
                    db, publish = self._db_factory(), self._publish_factory()
                sweep(db, publish, lease_s=self.lease_s)
                if self.pruner is not None:  # retention (POCOFLOW_PRUNE_OLDER_THAN)
                    self.pruner.tick(db, time.monotonic())
            except Exception:
                _log.exception("Sweep failed; trying again in %.1fs", self.interval_s)

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
