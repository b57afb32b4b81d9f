"""The step-protocol half of the ledger API: outbox rows, leases, fencing and attempts
for the distributed executor (G1, G3). The queries are in ``pocoflow.ledger.steps``."""

from __future__ import annotations

from typing import Any

from pocoflow.commit import StepFailure
from pocoflow.ledger import pipeline, steps, txn
from pocoflow.ledger.client import LedgerClient
from pocoflow.ledger.pipeline import Op


class StepQueue(LedgerClient):
    """Ledger calls a worker, publisher and sweeper make. Times come from the database's
    clock; ``now`` (epoch seconds) replaces it, for tests."""

    # ── steps: outbox, leases, fencing (distributed executor) ────────────────

    def insert_step(
        self,
        run_id: str,
        step: int,
        node_id: str,
        *,
        attempt: int = 1,
        lease_s: float | None = None,
        now: float | None = None,
    ) -> bool:
        """The outbox row of a run's first step (later steps get theirs from
        ``commit_step``), leased for ``lease_s`` from now (G3). False if it exists."""
        dialect = self._dialect
        return self._write(
            lambda conn: steps.insert_step(
                conn, dialect, run_id, step, node_id, attempt, lease_s, now
            ),
            f"queueing step {step}",
            run_id,
        )

    def mark_sent(
        self,
        run_id: str,
        step: int,
        attempt: int,
        *,
        task_id: str | None = None,
        now: float | None = None,
    ) -> bool:
        """The message of ``attempt`` is with the broker (under ``task_id``): the outbox
        sweep skips the row from now on. False if the attempt is stale or already sent."""
        op = steps.mark_sent_one_op(run_id, step, attempt, task_id, now)
        # One statement, its own transaction (a miss wrote nothing): one round trip on
        # PostgreSQL, what a submit pays after publishing its first step.
        return self._write(
            lambda conn: pipeline.run_reading(conn, [op], autocommit=True)[0],
            f"marking step {step} sent",
            run_id,
            batched=True,
        )

    def mark_sent_many(self, sent: list[tuple[str, int, int, str | None, float]]) -> None:
        """``mark_sent`` for a batch of ``(run_id, step, attempt, task_id, now)`` in one
        transaction: a worker marks what it published in the background, off the step's
        critical path."""
        if not sent:
            return

        op = steps.mark_sent_op(sent)
        self._write(
            lambda conn: pipeline.run(conn, [op]), f"marking {len(sent)} steps sent", sent[0][0]
        )

    def claim_step(
        self,
        run_id: str,
        step: int,
        attempt: int,
        worker: str,
        lease_s: float,
        now: float | None = None,
        *,
        task_id: str | None = None,
        holder: str | None = None,
        node_id: str | None = None,
    ) -> bool:
        """Take the lease on ``(run_id, step)`` for ``attempt`` and record the attempt's
        start (``worker``, broker ``task_id``) in ``pf_attempts``, whatever the run's
        status. ``holder`` (default ``worker``) is the claim's token: renewing, committing
        and failing the step must name it, so give every delivery its own. With
        ``node_id``, only if the ledger recorded that node for the step. False: the step
        is committed, failed, held by a live lease of another holder, another node's, or
        ``attempt`` is stale — do nothing (G1)."""
        return self._claim(
            run_id, step, attempt, worker, holder, lease_s, now, task_id, node_id, False
        )[0]

    def claim_if_runnable(
        self,
        run_id: str,
        step: int,
        attempt: int,
        worker: str,
        lease_s: float,
        *,
        task_id: str | None = None,
        now: float | None = None,
        holder: str | None = None,
        node_id: str | None = None,
    ) -> tuple[bool, dict[str, Any] | None]:
        """Read the run's guard columns (``steps.GUARD_COLUMNS``, not ``graph_shape``)
        and, if the run may go on (queued or running, no cancel or pause requested), claim
        the step: one transaction, one round trip on PostgreSQL (what a worker does before
        every step, G1 and G4). The claim's own statement decides, so a cancel committed
        after the read (PostgreSQL runs READ COMMITTED) stops it too. Returns
        ``(claimed, run)``; a run that may not go on is returned unclaimed for the
        caller's guard to handle (run None: no such run)."""
        return self._claim(
            run_id, step, attempt, worker, holder, lease_s, now, task_id, node_id, True
        )[:2]

    def _claim(
        self,
        run_id: str,
        step: int,
        attempt: int,
        worker: str,
        holder: str | None,
        lease_s: float,
        now: float | None,
        task_id: str | None,
        node_id: str | None,
        runnable_only: bool,
        *,
        flow: str | None = None,
        then_read: Op | None = None,
    ) -> tuple[bool, dict[str, Any] | None, list[tuple[Any, ...]]]:
        token = holder or worker
        tries = 0

        def body(conn: Any) -> tuple[bool, dict[str, Any] | None, list[tuple[Any, ...]]]:
            nonlocal tries
            tries += 1
            # The run's guard columns, the claim and the attempt row in one batch: the
            # claim's own statement decides whether the run may go on (G4), so the read
            # need not come first, and PostgreSQL gets all three in one round trip.
            claimed, run, read = steps.claim_reading_run(
                conn,
                run_id,
                step,
                attempt,
                worker,
                token,
                lease_s,
                now,
                task_id,
                node_id=node_id,
                flow=flow,
                if_runnable=runnable_only,
                read_run=runnable_only,
                retried=tries > 1,  # only a lost COMMIT can have left its row (txn.run)
                then_read=then_read,
            )
            if not claimed:
                raise txn.Abort((False, run, []))  # roll back: PostgreSQL sent the whole batch
            return True, run, read

        return self._write(body, f"claiming step {step}", run_id, batched=True)

    def renew_queued(
        self, run_id: str, step: int, attempt: int, lease_s: float, now: float | None = None
    ) -> bool:
        """An expired step nobody claimed gets a fresh lease for its resend, keeping its
        attempt (G3 without inflating attempts when a queue runs long). False if another
        sweeper or a claim got there first."""
        return self._write(
            lambda conn: steps.renew_queued(conn, run_id, step, attempt, lease_s, now),
            f"re-leasing step {step}",
            run_id,
        )

    def renew_lease(
        self,
        run_id: str,
        step: int,
        attempt: int,
        holder: str,
        lease_s: float,
        now: float | None = None,
    ) -> bool:
        """Extend the lease ``holder``'s claim holds; False = it was taken over or claimed
        again by another delivery: stop working on the step."""
        return self._write(
            lambda conn: steps.renew(conn, run_id, step, attempt, holder, lease_s, now),
            f"renewing the lease of step {step}",
            run_id,
        )

    def end_attempt(
        self,
        run_id: str,
        step: int,
        attempt: int,
        worker: str | None,
        outcome: str,
        error_msg: str | None = None,
        now: float | None = None,
        *,
        holder: str | None = None,
    ) -> bool:
        """Close the attempt's ``pf_attempts`` row with ``outcome`` (committed, duplicate,
        retry, failed...): the row of ``holder``'s claim, else every open row of
        ``worker`` (of anyone, if None: a take-over). False if no open row matched."""
        return self._write(
            lambda conn: steps.end_attempt(
                conn, run_id, step, attempt, worker, outcome, error_msg, now, holder
            ),
            f"ending attempt {attempt} of step {step}",
            run_id,
        )

    def fail_step(self, f: StepFailure, *, now: float | None = None) -> bool:
        """Fail the step and its run in one transaction (see ``StepFailure``): the node
        is out of retries or the step was refused. False, nothing written, if ``f.holder``
        no longer holds the step (G1)."""

        def body(conn: Any) -> bool:
            if not steps.fail(conn, f, now):
                raise txn.Abort(False)
            return True

        def own_failure(conn: Any, done: bool) -> bool:  # a COMMIT whose outcome was lost
            return done or steps.failed_by(conn, f)

        return self._write(
            body, f"failing step {f.step}", f.run_id, confirm=own_failure, batched=True
        )

    def take_over(
        self,
        run_id: str,
        step: int,
        old_attempt: int,
        lease_s: float,
        now: float | None = None,
        *,
        force: bool = False,
        holder: str | None = None,
        due_in: float = 0.0,
        note: str | None = None,
        fresh_start: bool = False,
    ) -> int | None:
        """Re-queue a step whose lease expired under a new attempt (returned), fencing out
        the old holder (G1, G3); the caller then sends the new attempt's message. None if
        the step moved on (committed, renewed, already taken over). ``force`` skips the
        expiry check (resume of a paused or failed run); ``holder`` takes it over only
        while that claim holds it (the holder's own retry, due after its backoff
        ``due_in``, which its lease must cover too). ``note``: the old attempt's
        ``error_msg`` (why it was lost). ``fresh_start``: a resume, after which the step's
        crash and try counts start again (``steps.RESUMED_OUTCOME``)."""
        return self._write(
            lambda conn: steps.take_over(
                conn,
                run_id,
                step,
                old_attempt,
                lease_s,
                now,
                force,
                holder,
                due_in,
                note,
                fresh_start,
            ),
            f"taking over step {step}",
            run_id,
        )

    def get_step(self, run_id: str, step: int) -> dict[str, Any] | None:
        return self._read(lambda conn: steps.get(conn, run_id, step), run_id)

    def get_attempts(self, run_id: str) -> list[dict[str, Any]]:
        return self._read(lambda conn: steps.attempts(conn, run_id), run_id)

    def running_task_ids(self, run_id: str) -> list[str]:
        """Broker task ids of the run's queued or running steps (for revoke)."""
        return self._read(lambda conn: steps.task_ids(conn, run_id), run_id)

    def clock(self) -> float:
        """The database's clock (epoch seconds), the clock every lease is written and
        compared on: a caller that computes with times outside SQL (the sweeper's
        countdowns, its ``now``) reads it here, never from its own host, whose clock may
        run ahead and take over live steps (G3)."""
        return self._read(steps.clock)

    def expired_steps(self, now: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Steps whose lease ran out (worker died, message lost) of runs still going, oldest
        lease first: the sweeper takes them over (G3)."""
        return self._read(lambda conn: steps.expired(conn, now, limit))

    def unsent_steps(
        self, older_than_s: float, now: float | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Outbox rows queued more than ``older_than_s`` ago and never marked sent (the
        publisher died between commit and send): the sweeper sends them."""
        return self._read(lambda conn: steps.unsent(conn, older_than_s, now, limit))
