"""Sending step messages: the only place a message leaves a PocoFlow process.

A send that fails (Redis down, a network blip) is logged and reported, never raised:
the step's outbox row stays unsent and the sweeper sends it later (G3). A sent message
is marked in the ledger under the attempt it carries, so a stale send never marks a
newer attempt's row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pocoflow.distributed.celery_app import DEFAULT_QUEUE, PUBLISH_RETRY_POLICY, TASK_NAME
from pocoflow.distributed.message import StepMessage
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from celery import Celery

    from pocoflow.db import WorkflowDB

_log = get_logger("distributed.publish")


class Publisher:
    """Publishes step messages on ``app``'s broker and marks their outbox rows sent."""

    def __init__(self, app: Celery, db: WorkflowDB) -> None:
        self.app = app
        self.db = db

    def send(
        self,
        message: StepMessage,
        *,
        queue: str | None = None,
        countdown: float | None = None,
        now: float | None = None,
    ) -> bool:
        """Publish ``message`` (on ``queue``, after ``countdown`` seconds); True if the
        broker took it. The outbox row is marked sent only then."""
        try:
            result = self.app.send_task(
                TASK_NAME,
                args=[message.to_dict()],
                queue=queue or DEFAULT_QUEUE,
                countdown=countdown if countdown and countdown > 0 else None,
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
            )
        except Exception as exc:  # broker down: the sweeper resends the unsent row
            _log.warning(
                "Could not publish step %d of run %s (attempt %d): %s; the sweeper will resend it",
                message.step,
                message.run_id,
                message.attempt,
                exc,
            )
            return False
        try:
            self.db.mark_sent(
                message.run_id, message.step, message.attempt, task_id=result.id, now=now
            )
        except Exception as exc:  # the message is out; a resend would only be a duplicate
            _log.warning(
                "Could not mark step %d of run %s sent: %s", message.step, message.run_id, exc
            )
        return True

    def revoke(self, task_id: str, *, terminate: bool = False, signal: str = "SIGTERM") -> None:
        """Revoke a task on every worker; with ``terminate`` its process is signalled."""
        try:
            self.app.control.revoke(task_id, terminate=terminate, signal=signal)
        except Exception as exc:
            _log.warning("Could not revoke task %s: %s", task_id, exc)

    def __call__(self, message: StepMessage, queue: str | None = None, **kwargs: Any) -> bool:
        return self.send(message, queue=queue, **kwargs)
