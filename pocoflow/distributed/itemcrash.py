"""A map item whose delivery crashed in the executor after its claim (issue 7).

Not an exception of the item's ``exec`` (those follow the node's retry policy) but of
running it on a worker: its value cannot be decoded, the graph cannot be built. Such a
crash comes back on every worker, so, as for a step (``_StepRun.crashed``), it is
bounded by the crash budget (``POCOFLOW_MAX_CRASHES``), counted on the item's row
together with the crashes of worker processes that died holding it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pocoflow.distributed.executor import CRASHED, crash_queue, crash_verdict, redelivery_delay
from pocoflow.ledger.items import crashed_on
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from pocoflow.distributed.itemtask import _ItemRun

_log = get_logger("distributed.items")


def item_crashed(item: _ItemRun, exc: Exception) -> str:
    """Below the budget: send the item again as a new attempt of the same try after a
    short backoff, one crash counted on its row; at it, fail its run naming run, step,
    node and item. Never raises: if the ledger cannot say even this, the item's lease
    runs out and the sweeper sends it again, as before."""
    msg, db = item.msg, item.db
    error = f"{type(exc).__name__}: {exc}"
    _log.error(
        "Item %d of step %d of run %s (attempt %d) crashed in the executor",
        msg.idx,
        msg.step,
        msg.run_id,
        msg.attempt,
        exc_info=exc,
    )
    try:
        row = db.get_item(msg.run_id, msg.step, msg.idx) or {}
        crashes = int(row.get("crashes") or 0) + 1
        workers = [*crashed_on(row), item.worker]
        if item.ctx.crash_verdict_due(crashes, set(workers)):
            what = (
                f"MapNode {item.node_name!r}: item {msg.idx} of step {msg.step} of run {msg.run_id}"
            )
            verdict = crash_verdict(what, crashes, set(workers), error)
            return item._fail(verdict, cause=exc, crashed=True)
        delay = redelivery_delay(crashes - 1)
        attempt = db.retry_item(
            item.claim, next_try=item.try_number, due_in=delay, crashed_on=workers
        )
        if attempt is not None:
            item.ctx.publisher.send(
                msg.retry(item.try_number, attempt),
                queue=crash_queue(db, item.run_row, msg.run_id, msg.step, item.node),
                countdown=delay,
            )
    except Exception as failure:
        _log.warning(
            "Item %d of step %d of run %s: could not record its crash (%s); its lease will "
            "expire and the sweeper will re-run it",
            msg.idx,
            msg.step,
            msg.run_id,
            failure,
        )
    return CRASHED
