"""Run-level transitions of a distributed run, shared by the client, RemoteControl and the
executor: cancel, pause, park, resume, fail, re-enqueue.

Each transition is one conditional ledger update (``update_run_if``), so two processes
racing on the same run (a worker parking a run while a user resumes it) leave it in one
consistent state: the row, not anybody's earlier read, decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pocoflow.commit import StepFailure
from pocoflow.distributed.message import StepMessage
from pocoflow.hooks import NODE_ERROR, RUN_CANCELLED, RUN_RESUMED
from pocoflow.logging import get_logger
from pocoflow.step import utc_now

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from pocoflow.distributed.publish import Publisher
    from pocoflow.ledger.signals import Wake

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


def stopped(db: WorkflowDB, run: dict[str, Any], step: int) -> str | None:
    """Why a run (its guard columns) may not go on: ``"cancelled"`` (a standing cancel
    request becomes its status here), ``"stopped"`` (finished), ``"paused"`` or
    ``"waiting"`` (``wait_for``); None
    when it may, a pause request included (the caller parks the run its own way)."""
    status, control = run["status"], run.get("control")
    if status == "cancelled" or control == "cancel":
        if status != "cancelled":
            request_cancel(db, run["run_id"], step=step)
        return "cancelled"
    if status in FINISHED:
        return "stopped"
    if status == "paused":
        return "paused"
    if status == "waiting":  # a copy of a parked step's message (a broker re-send)
        return "waiting"
    return None


def request_pause(db: WorkflowDB, run_id: str) -> bool:
    """Leave a pause request; the next guard parks the run. False if it is not live.

    A ``waiting`` run takes it too: it stands while the run waits (a park needs no request
    standing, so none is lost), and the step a send or a timeout wakes meets it in its
    guard, so the run pauses before its node instead of going on."""
    return db.update_run_if(run_id, status_in=(*LIVE, "waiting"), control="pause")


def park(
    db: WorkflowDB,
    run_id: str,
    step: int,
    attempt: int,
    holder: str,
    reason: list[dict[str, Any]] | None = None,
) -> bool:
    """The guard of ``attempt`` of step ``step`` met a pause request: mark the run paused,
    leaving the step queued for ``resume``. False, and nothing changes, if the request was
    withdrawn meanwhile (go on with the step) or if this delivery is not the one that
    would run the step (it is committed, another attempt holds it, or another worker's
    live lease does): that worker commits the step, and the guard of its successor parks
    the run, so a pause never strands a step that is running."""
    return db.park_run(run_id, step, attempt, holder, reason=reason)


def resume_paused(
    db: WorkflowDB, run_id: str, publisher: Publisher, *, lease_s: float, queue: str | None = None
) -> bool:
    """Withdraw a pause request and, if a worker parked the run, send its step again (or
    complete the run, if its last step committed while it was parked).

    The request is cleared *before* the parked status is read back, so a worker parking
    the run at the same moment either parks first (and we re-enqueue) or finds the
    request gone (and carries on): never a run parked with nobody to wake it.
    """
    db.update_run_if(run_id, control_in=("pause",), control=None)
    if not db.update_run_if(run_id, status_in=("paused",), status="running"):
        return False
    db.save_event(run_id, RUN_RESUMED, ts=utc_now())
    continue_run(db, run_id, publisher, lease_s=lease_s, queue=queue)
    return True


def restart(
    db: WorkflowDB,
    run_id: str,
    publisher: Publisher,
    *,
    lease_s: float,
    status_in: tuple[str, ...] = ("failed", "cancelled", "paused"),
) -> bool:
    """Set a run that stopped (failed, cancelled, paused) running again and send its
    outstanding step under a new attempt, or complete it if its last step committed.
    False, nothing done, if the run's status is not one of ``status_in`` (a compare-and-
    set: of two racing resumers one restarts the run)."""
    if not db.update_run_if(
        run_id,
        status_in=status_in,
        status="running",
        control=None,
        error_msg=None,
        completed_at=None,
    ):
        return False
    db.save_event(run_id, RUN_RESUMED, ts=utc_now())
    continue_run(db, run_id, publisher, lease_s=lease_s)
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


@dataclass(frozen=True)
class Outstanding:
    """What ``requeue_outstanding`` found. ``message``: the step it sent under a fresh
    attempt. ``ended``: the run's last step committed, nothing is left to run. Neither:
    another process (a second resumer, the sweeper, a worker) took the step over first
    and sends it; this caller must not touch the run's status."""

    message: StepMessage | None = None
    ended: bool = False


#: Because each round starts again only when a step committed under the caller, a run
#: whose steps keep committing is plainly in someone's hands after a few.
REQUEUE_ROUNDS = 5


def requeue_outstanding(
    db: WorkflowDB,
    run_id: str,
    publisher: Publisher,
    *,
    lease_s: float,
    queue: str | None = None,
    now: float | None = None,
) -> Outstanding:
    """Send the run's next step again under a fresh attempt (fencing out any holder).

    The next step follows the latest checkpoint. A take-over that finds the step moved on
    tells why: committed meanwhile (a late worker's commit) -> the step after it;
    taken by another process -> nothing sent; taken by this very call, whose write landed
    although its connection was lost at COMMIT (the row shows this call's ``now``, the
    database's clock read once, as ``queued_at``) -> sent. Only a checkpoint that ends the run says ``ended``. ``exec``
    tries start again at 1: a resume is a new start.
    """
    run = db.get_run(run_id)
    if run is None:
        raise KeyError(f"Unknown run id {run_id!r}")
    # The database's clock, as every lease: a resumer whose host runs ahead must not
    # lease the step far into the future (a lost message would wait that long, G3). Read
    # once, it is also this call's write token in ``queued_at`` (two resumers reading the
    # same instant both send the step: one message too many, which the claim absorbs).
    t = db.clock() if now is None else now
    for _ in range(REQUEUE_ROUNDS):
        latest = db.latest_checkpoint(run_id)
        if latest is None:
            raise KeyError(f"Run {run_id!r} has no checkpoint, not even its initial Store")
        if latest.get("next_node") is None:
            return Outstanding(ended=True)
        step, node_id = latest["step"] + 1, latest["next_node"]
        row = db.get_step(run_id, step)
        if row is None:  # a run stranded before its outbox row was written
            db.insert_step(run_id, step, node_id, attempt=1, lease_s=lease_s, now=t)
            row = db.get_step(run_id, step)
            assert row is not None
            attempt = row["attempt"]  # ours or a racing resumer's: the claim lets one run
        elif row["status"] == "committed":
            continue
        else:
            taken = db.take_over(
                run_id, step, row["attempt"], lease_s, now=t, force=True, fresh_start=True
            )
            if taken is None:
                seen = db.get_step(run_id, step)
                if seen is None or seen["status"] == "committed":
                    continue
                if not (seen["attempt"] == row["attempt"] + 1 and seen["queued_at"] == t):
                    _log.info(
                        "Run %s: step %d was taken over by another process (attempt %d); "
                        "it sends it",
                        run_id,
                        step,
                        seen["attempt"],
                    )
                    return Outstanding()
                taken = seen["attempt"]
            attempt = taken
        message = StepMessage(run_id, run["flow_name"], step, node_id, attempt)
        publisher.send(message, queue=queue or row.get("queue") or run.get("queue"))
        _log.info("Run %s: step %d (%s) re-enqueued as attempt %d", run_id, step, node_id, attempt)
        return Outstanding(message)
    return Outstanding()


def continue_run(
    db: WorkflowDB,
    run_id: str,
    publisher: Publisher,
    *,
    lease_s: float,
    queue: str | None = None,
) -> Outstanding:
    """Go on with a run just set ``running`` again (resume): send its outstanding step, or,
    if its last step committed (while it was paused, cancelled or failed), complete it.
    A run is completed only on the evidence of that commit, never because a take-over
    came back empty."""
    found = requeue_outstanding(db, run_id, publisher, lease_s=lease_s, queue=queue)
    if found.ended:
        # No flow_end event: the last step's commit recorded it, in its own transaction;
        # only the status change was held back (by the cancel or failure standing then).
        db.update_run_if(run_id, status_in=LIVE, status="completed", completed_at=utc_now())
    return found


def send_value(
    db: WorkflowDB, run_id: str, key: str, value: Any, publisher: Publisher, *, lease_s: float
) -> bool:
    """Record ``value`` for ``key`` of a distributed run and, if the run waits on that
    key, send its parked step again (``wake``). True if the run was woken. Raises as
    ``WorkflowDB.send_signal`` (unknown run, finished run, key sent twice)."""
    found = db.send_signal(run_id, key, value, lease_s=lease_s)
    if found is None:
        return False
    wake(db, found, publisher.send, lease_s=lease_s)
    return True


def wake(db: WorkflowDB, found: Wake, publish: Callable[..., bool], *, lease_s: float) -> None:
    """Publish the step of a run just woken from ``waiting`` (``publish(message,
    queue=...)``: a Publisher's ``send`` or the sweeper's publish). Its outbox row is in
    the ledger already, written with the wake, so a publish that fails is repaired by the
    sweeper's unsent pass (G3); a parked row that was not found is sent afresh."""
    if not found.outboxed:
        continue_run(db, found.run_id, _Sender(publish), lease_s=lease_s, queue=found.queue)  # type: ignore[arg-type]
        return
    message = StepMessage(found.run_id, found.flow, found.step, found.node_id, found.attempt)
    publish(message, queue=found.queue)
    _log.info("Run %s woken: step %d sent as attempt %d", found.run_id, found.step, found.attempt)


class _Sender:
    """A bare publish callable where ``requeue_outstanding`` wants a ``.send``."""

    def __init__(self, publish: Callable[..., bool]) -> None:
        self.send = publish
