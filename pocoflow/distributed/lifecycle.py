"""Run-level transitions of a distributed run, shared by the client, RemoteControl and the
executor: cancel, pause, park, resume, fail, re-enqueue.

Each transition is one conditional ledger update (``update_run_if``), so two processes
racing on the same run (a worker parking a run while a user resumes it) leave it in one
consistent state: the row, not anybody's earlier read, decides.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pocoflow.commit import StepFailure
from pocoflow.distributed.message import StepMessage
from pocoflow.hooks import NODE_ERROR, RUN_CANCELLED, RUN_PAUSED, RUN_RESUMED
from pocoflow.logging import get_logger
from pocoflow.step import utc_now

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from pocoflow.distributed.publish import Publisher

_log = get_logger("distributed.lifecycle")

FINISHED = ("completed", "failed", "cancelled")
LIVE = ("queued", "running")
NOT_FINISHED = ("queued", "running", "paused", "waiting")


def request_cancel(db: WorkflowDB, run_id: str, *, step: int | None = None) -> bool:
    """Mark the run cancelled (and leave the request on it); False if it had finished.

    The status changes at once, so every later guard stops (G4); a step already running
    may still commit its checkpoint, but its successor is stopped by the guard.
    """
    now = utc_now()
    done = db.update_run_if(
        run_id,
        status_in=NOT_FINISHED,
        status="cancelled",
        control="cancel",
        completed_at=now,
        error_msg="cancelled",
    )
    if done:
        db.save_event(run_id, RUN_CANCELLED, step=step, error_msg="cancelled", ts=now)
    return done


def request_pause(db: WorkflowDB, run_id: str) -> bool:
    """Leave a pause request; the next guard parks the run. False if it is not live."""
    return db.update_run_if(run_id, status_in=LIVE, control="pause")


def park(db: WorkflowDB, run_id: str, step: int) -> bool:
    """The guard met a pause request: mark the run paused, leaving step ``step`` queued
    for ``resume``. False if the request was withdrawn meanwhile (go on with the step)."""
    done = db.update_run_if(run_id, status_in=LIVE, control_in=("pause",), status="paused")
    if done:
        db.save_event(run_id, RUN_PAUSED, step=step, ts=utc_now())
    return done


def resume_paused(
    db: WorkflowDB, run_id: str, publisher: Publisher, *, lease_s: float, queue: str | None = None
) -> bool:
    """Withdraw a pause request and, if a worker parked the run, send its step again.

    The request is cleared *before* the parked status is read back, so a worker parking
    the run at the same moment either parks first (and we re-enqueue) or finds the
    request gone (and carries on): never a run parked with nobody to wake it.
    """
    db.update_run_if(run_id, control_in=("pause",), control=None)
    if not db.update_run_if(run_id, status_in=("paused",), status="running"):
        return False
    db.save_event(run_id, RUN_RESUMED, ts=utc_now())
    requeue_outstanding(db, run_id, publisher, lease_s=lease_s, queue=queue)
    return True


def fail_run(
    db: WorkflowDB,
    run_id: str,
    error_msg: str,
    *,
    step: int,
    attempt: int,
    holder: str,
    worker: str | None = None,
    node_name: str | None = None,
    events: list[dict[str, Any]] | None = None,
    outcome: str = "failed",
) -> bool:
    """Fail step ``step`` (held by ``holder``'s claim of ``attempt``) and its run, with
    why: the step row, the attempt row (``outcome``), the events (a ``node_error`` unless
    given) and the run's status, in one transaction. The run stays resumable; a cancel
    that landed meanwhile stands (G4). False, nothing written, if the claim was lost."""
    given = list(events or ())
    if not any(e.get("event") == NODE_ERROR for e in given):
        error = {"event": NODE_ERROR, "step": step, "node_name": node_name, "error_msg": error_msg}
        given.append(error)
    ts = utc_now()
    rows = [
        {"attempt": attempt, "ts": ts, **{k: v for k, v in e.items() if v is not None}}
        for e in given
    ]
    failure = StepFailure(
        run_id=run_id,
        step=step,
        attempt=attempt,
        holder=holder,
        worker=worker or holder,
        error_msg=error_msg,
        outcome=outcome,
        events=rows,
    )
    return db.fail_step(failure)


def requeue_outstanding(
    db: WorkflowDB,
    run_id: str,
    publisher: Publisher,
    *,
    lease_s: float,
    queue: str | None = None,
    now: float | None = None,
) -> StepMessage | None:
    """Send the run's next step again under a fresh attempt (fencing out any holder).

    The next step follows the latest checkpoint; ``None`` when that checkpoint ends the
    run (nothing left to run). ``exec`` tries start again at 1: a resume is a new start.
    """
    run = db.get_run(run_id)
    if run is None:
        raise KeyError(f"Unknown run id {run_id!r}")
    latest = db.latest_checkpoint(run_id)
    if latest is None or latest.get("next_node") is None:
        return None
    step, node_id = latest["step"] + 1, latest["next_node"]
    now = time.time() if now is None else now
    row = db.get_step(run_id, step)
    if row is None:
        db.insert_step(run_id, step, node_id, attempt=1, lease_s=lease_s, now=now)
        attempt = 1
        row = db.get_step(run_id, step)
        assert row is not None
        attempt = row["attempt"]
    else:
        taken = db.take_over(run_id, step, row["attempt"], lease_s, now=now, force=True)
        if taken is None:  # committed meanwhile or another resume won: it runs already
            return None
        attempt = taken
    message = StepMessage(run_id, run["flow_name"], step, node_id, attempt)
    publisher.send(message, queue=queue or run.get("queue"))
    _log.info("Run %s: step %d (%s) re-enqueued as attempt %d", run_id, step, node_id, attempt)
    return message
