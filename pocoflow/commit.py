"""What one node step hands to the ledger: everything that must land in one transaction.

Pure data, so the core can build it without knowing SQL and the ledger can write it
without knowing nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PARKED_OWNER = "fanout"
"""``pf_steps.lease_owner`` of a map step whose items run: no worker holds it and it has
no lease, so no step sweep takes it over and no step claim runs its ``prep`` again; the
item commit that completes its join re-queues it."""


@dataclass(frozen=True)
class NextStep:
    """The outbox row for the successor: leased from the moment it is written (G3), until
    ``lease_expires_at`` or, when that is None, for ``lease_s`` on the database's clock."""

    step: int
    node_id: str
    attempt: int = 1
    lease_expires_at: float | None = None
    lease_s: float | None = None
    #: The node's own broker queue (None: the run's), kept with the step for re-sends.
    queue: str | None = None


@dataclass(frozen=True)
class StepCommit:
    """One node step, written atomically by ``WorkflowDB.commit_step``.

    ``attempt`` and ``holder`` are the fencing tokens: when ``attempt`` is set, the
    commit only lands if the ``pf_steps`` row for ``(run_id, step)`` is still running
    under this attempt and the claim of ``holder`` (``worker`` when None), so a worker
    that lost its lease commits nothing (G1).
    """

    run_id: str
    step: int
    node_name: str
    action: str | None
    next_node: str | None
    manifest: dict[str, int]
    changed: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    run_fields: dict[str, Any] = field(default_factory=dict)
    attempt: int | None = None
    next_step: NextStep | None = None
    #: With ``attempt``: this worker's ``pf_attempts`` row is closed as committed in the
    #: same transaction (one round trip fewer per distributed step).
    worker: str | None = None
    #: The holder token the claim wrote (``claim_step(..., holder=)``).
    holder: str | None = None

    @property
    def lease_holder(self) -> str:
        holder = self.holder or self.worker
        if holder is None:
            raise ValueError(
                f"Run {self.run_id!r} step {self.step}: a fenced commit (attempt="
                f"{self.attempt}) must name the claim it holds: pass holder= or worker="
            )
        return holder


@dataclass(frozen=True)
class StepFailure:
    """A step that failed for good (node out of retries, refused), written atomically by
    ``WorkflowDB.fail_step``: the step row, the attempt row, the events and the run's
    status land together or not at all, fenced like a commit (G1)."""

    run_id: str
    step: int
    attempt: int
    #: The holder token of the claim (``worker`` when the claim named none).
    holder: str
    #: Whose ``pf_attempts`` row is closed with ``outcome``.
    worker: str
    error_msg: str
    outcome: str = "failed"
    events: list[dict[str, Any]] = field(default_factory=list)
