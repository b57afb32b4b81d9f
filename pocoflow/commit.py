"""What one node step hands to the ledger: everything that must land in one transaction.

Pure data, so the core can build it without knowing SQL and the ledger can write it
without knowing nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class NextStep:
    """The outbox row for the successor: leased from the moment it is written (G3)."""

    step: int
    node_id: str
    attempt: int = 1
    lease_expires_at: float | None = None


@dataclass(frozen=True)
class StepCommit:
    """One node step, written atomically by ``WorkflowDB.commit_step``.

    ``attempt`` is the fencing token: when set, the commit only lands if the
    ``pf_steps`` row for ``(run_id, step)`` still carries this attempt and is not
    committed yet, so a worker that lost its lease commits nothing (G1).
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
