"""The sweeper's pass over map items (G3), called by ``sweeper.sweep``.

* an item whose message was never published (the fan-out's or a retry's publisher died,
  the broker was down) is sent after the grace period, with what is left of its backoff;
* an item running under a lease that expired, or held by a process that stopped beating,
  is taken over under a new attempt (fencing the holder out, G1) and sent again: after a
  kill -9 only the items that were in flight on the dead worker run again;
* an item a dead process held unstarted (prefetched) is sent again under its attempt;
* a sent, queued item no live process reported holding is sent again under its attempt
  once it waited ``stale_after_s`` (a lease while the broker's queues are empty: its
  message went down with a process killed within a beat of receiving it; the queue cap
  while messages still wait there, since it is most likely among them);
* a map step whose count is complete but which is still parked (a backstop: the commit
  that completes a count re-queues its step) is re-queued for its join;
* after a broker loss (``resend_all``) every sent, queued item of a live run.

Every transition is a compare-and-set on the item's attempt (and holder or receiver),
so of several sweepers one acts, and a duplicate message is refused by the item's claim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pocoflow.distributed.message import ItemMessage, StepMessage
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable

    from pocoflow.db import WorkflowDB

_log = get_logger("distributed.itemsweep")

#: Rows per page of the bulk re-send after a broker loss.
PAGE = 1000


def _message(row: dict[str, Any], attempt: int) -> ItemMessage:
    return ItemMessage(
        row["run_id"],
        row["flow_name"],
        row["step"],
        row["node_id"],
        row["idx"],
        attempt,
        row["try_number"],
    )


def _later(row: dict[str, Any], now: float) -> dict[str, float]:
    wait = row["queued_at"] - now
    return {"countdown": wait} if wait > 0 else {}


def sweep_items(
    db: WorkflowDB,
    publish: Callable[..., bool],
    *,
    lease_s: float,
    now: float,
    injected: float | None,
    grace_s: float,
    dead_after_s: float,
    judge_holders: bool,
    stale_after_s: Callable[[], float],
) -> list[tuple[str, int, int]]:
    """One pass over items; returns the ``(run_id, step, idx)`` sent again.
    ``stale_after_s()`` is asked only when some sent item waits unclaimed (it may look
    at the broker's queues)."""
    sent: list[tuple[str, int, int]] = []
    for row in db.unsent_items(grace_s, now=now):
        if publish(_message(row, row["attempt"]), queue=row["queue"], **_later(row, now)):
            sent.append((row["run_id"], row["step"], row["idx"]))
    if judge_holders:
        for row in db.orphaned_items(dead_after_s, now=injected):
            key = (row["run_id"], row["step"], row["idx"])
            if row["status"] == "running":
                attempt = db.take_over_item(*key, row["attempt"], row["lease_owner"])
                if attempt is None:
                    continue
                why = "its holder %s is gone; re-running as attempt %d"
                _log.warning(
                    "Item %d of step %d of run %s: " + why,
                    row["idx"],
                    row["step"],
                    row["run_id"],
                    row["lease_owner"],
                    attempt,
                )
            else:
                if not db.release_received_item(*key, row["attempt"], row["received_by"]):
                    continue
                attempt = row["attempt"]
            if publish(_message(row, attempt), queue=row["queue"]):
                sent.append(key)
        waiting = db.stale_queued_items(lease_s, now=injected)
        if waiting:
            limit = stale_after_s()
            for row in waiting:
                key = (row["run_id"], row["step"], row["idx"])
                # A retry counts from when it is due, not from its (early) send.
                if now - max(row["sent_at"], row["queued_at"]) < limit:
                    continue
                if db.touch_queued_item(*key, row["attempt"], row["sent_at"]) and publish(
                    _message(row, row["attempt"]), queue=row["queue"]
                ):
                    sent.append(key)
    for stranded in db.stranded_joins():
        state = db.requeue_join(stranded["run_id"], stranded["step"], lease_s)
        run = db.get_run(stranded["run_id"])
        if state is None or run is None:
            continue
        join = StepMessage(
            stranded["run_id"],
            run["flow_name"],
            stranded["step"],
            state["node_id"],
            state["step_attempt"],
        )
        publish(join, queue=run.get("queue"))
    return sent


def resend_all(db: WorkflowDB, publish: Callable[..., bool], now: float) -> int:
    """The broker lost its messages: every queued, already-sent item of a live run is sent
    again under its attempt, page by page."""
    count = 0
    after: tuple[str, int, int] | None = None
    while True:
        page = db.queued_items(after, PAGE)
        for row in page:
            count += bool(
                publish(_message(row, row["attempt"]), queue=row["queue"], **_later(row, now))
            )
        if len(page) < PAGE:
            return count
        after = (page[-1]["run_id"], page[-1]["step"], page[-1]["idx"])
