"""The sweeper's pass over map items (G3), called by ``sweeper.sweep``.

* an item whose message was never published (the fan-out's or a retry's publisher died,
  the broker was down) is sent after the grace period, with what is left of its backoff;
* an item running under a lease that expired, or held by a process that stopped beating,
  is taken over under a new attempt (fencing the holder out, G1) and sent again: after a
  kill -9 only the items that were in flight on the dead worker run again; an item lost
  with its process ``max_crashes`` times (a poison item) fails its run instead;
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

import json
from typing import TYPE_CHECKING, Any

from pocoflow.distributed.message import ItemMessage, StepMessage
from pocoflow.hooks import NODE_ERROR
from pocoflow.ledger.items import ItemClaim, crashed_on
from pocoflow.ledger.liveness import last_beats
from pocoflow.logging import get_logger
from pocoflow.step import utc_now

if TYPE_CHECKING:
    from collections.abc import Callable

    from pocoflow.db import WorkflowDB

_log = get_logger("distributed.itemsweep")

#: Rows per page of the bulk re-send after a broker loss.
PAGE = 1000
#: Sent items looked at per sweep for the unclaimed-item backstop.
STALE_PAGE = 100


def item_message(row: dict[str, Any], attempt: int) -> ItemMessage:
    """The message of the item ``row`` (joined with its run and step) under ``attempt``."""
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
    max_crashes: int,
) -> list[tuple[str, int, int]]:
    """One pass over items (module docstring, in that order); returns the ``(run_id,
    step, idx)`` sent again. ``judge_holders=False`` (right after a ledger outage) leaves
    alone every item a worker holds, as for steps. ``stale_after_s()`` is asked only when
    some sent item waits unclaimed (it may look at the broker's queues)."""
    if not db.any_live_fan_out():
        return []
    sent = _resend_unsent(db, publish, db.unsent_items(grace_s, dead_after_s, now=now), now)
    if judge_holders:
        orphans = db.orphaned_items(dead_after_s, now=injected)
        sent += _recover(db, publish, orphans, now, dead_after_s, max_crashes)
        # Oldest first, a page per sweep: a deep queue of sent items costs one short read.
        waiting = db.stale_queued_items(lease_s, now=injected, limit=STALE_PAGE)
        if waiting:
            sent += _resend_stale(db, publish, waiting, now, stale_after_s())
    _requeue_stranded_joins(db, publish, lease_s)
    return sent


Key = tuple[str, int, int]


def _key(row: dict[str, Any]) -> Key:
    return (row["run_id"], row["step"], row["idx"])


def _resend_unsent(
    db: WorkflowDB, publish: Callable[..., bool], rows: list[dict[str, Any]], now: float
) -> list[Key]:
    if rows:
        _log.info("Sending %d unsent items again", len(rows))
    return [
        _key(row)
        for row in rows
        if publish(item_message(row, row["attempt"]), queue=row["queue"], **_later(row, now))
    ]


def _recover(
    db: WorkflowDB,
    publish: Callable[..., bool],
    rows: list[dict[str, Any]],
    now: float,
    dead_after_s: float,
    max_crashes: int,
) -> list[Key]:
    """Take over the running orphans (or fail a poison item's run), release the queued
    ones a dead process held, and send them again."""
    sent: list[Key] = []
    beats: dict[str, float] | None = None
    for row in rows:
        key = _key(row)
        if row["status"] == "running":
            beats = last_beats(db) if beats is None else beats
            owner = row["lease_owner"] or ""
            beat = beats.get(owner.rpartition("#")[0] or owner)
            # A crash only if its process stopped beating too (as for steps).
            crashed = beat is not None and beat < now - dead_after_s / 2
            if crashed and row["crashes"] + 1 >= max_crashes:
                _poison(db, row, max_crashes)
                continue
            attempt = db.take_over_item(*key, row["attempt"], owner, crashed=crashed)
            if attempt is None:  # another sweeper, or the item moved on
                continue
            _log.warning(
                "Item %d of step %d of run %s: its holder %s is gone; re-running as attempt %d",
                row["idx"],
                row["step"],
                row["run_id"],
                owner,
                attempt,
            )
            later: dict[str, float] = {}  # taken over: due now
        elif db.release_received_item(*key, row["attempt"], row["received_by"]):
            # A retry or limit wait the dead process held keeps the rest of its wait.
            attempt, later = row["attempt"], _later(row, now)
        else:
            continue
        if publish(item_message(row, attempt), queue=row["queue"], **later):
            sent.append(key)
    return sent


def _resend_stale(
    db: WorkflowDB,
    publish: Callable[..., bool],
    rows: list[dict[str, Any]],
    now: float,
    after_s: float,
) -> list[Key]:
    _log.debug("%d sent items wait unclaimed; sent again after %.0fs", len(rows), after_s)
    sent: list[Key] = []
    for row in rows:
        # A retry counts from when it is due, not from its (early) send.
        if now - max(row["sent_at"], row["queued_at"]) < after_s:
            continue
        key = _key(row)
        if db.touch_queued_item(*key, row["attempt"], row["sent_at"]) and publish(
            item_message(row, row["attempt"]), queue=row["queue"]
        ):
            sent.append(key)
    return sent


def _requeue_stranded_joins(db: WorkflowDB, publish: Callable[..., bool], lease_s: float) -> None:
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
        step = db.get_step(stranded["run_id"], stranded["step"]) or {}
        publish(join, queue=step.get("queue") or run.get("queue"))


def _poison(db: WorkflowDB, row: dict[str, Any], max_crashes: int) -> None:
    """An item lost with its worker ``max_crashes`` times (its exec kills the process):
    its run fails naming it, fenced on the dead holder's claim, instead of crashing
    workers forever. Fix the node or raise ``POCOFLOW_MAX_CRASHES``, then resume."""
    crashes = row["crashes"] + 1
    in_executor = len(crashed_on(row))
    what = f"was lost with its worker {crashes} times in a row"
    if in_executor:  # a mix: say so, rather than blame the exec for every crash
        what = (
            f"crashed {crashes} times in a row ({crashes - in_executor} with its worker "
            f"process dying, {in_executor} in the executor)"
        )
    error = (
        f"MapNode {row['node_id']!r}: item {row['idx']} of step {row['step']} of run "
        f"{row['run_id']} {what} (last on {row['lease_owner']}): a poison item, whose exec "
        "likely kills its process. Fix the node or raise POCOFLOW_MAX_CRASHES, then resume "
        "the run."
    )
    claim = ItemClaim(row["run_id"], row["step"], row["idx"], row["attempt"], row["lease_owner"])
    record = {"type": "WorkerLost", "message": error}
    event = {"event": NODE_ERROR, "step": row["step"], "node_name": row["node_id"]}
    event.update(error_msg=error, attempt=row["attempt"], ts=utc_now())
    if db.fail_item(
        claim, error_json=json.dumps(record), error_msg=error, events=[event], crashed=True
    ):
        _log.error("%s", error)


def resend_all(db: WorkflowDB, publish: Callable[..., bool], now: float) -> int:
    """The broker lost its messages: every queued, already-sent item of a live run is sent
    again under its attempt, page by page."""
    count = 0
    after: tuple[str, int, int] | None = None
    while True:
        page = db.queued_items(after, PAGE)
        for row in page:
            count += bool(
                publish(item_message(row, row["attempt"]), queue=row["queue"], **_later(row, now))
            )
        if len(page) < PAGE:
            if count:
                _log.warning("The broker lost its messages: sent %d queued items again", count)
            return count
        after = (page[-1]["run_id"], page[-1]["step"], page[-1]["idx"])
