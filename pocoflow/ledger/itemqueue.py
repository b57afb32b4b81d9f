"""The map half of the ledger API: fan-out, item claims, commits and the join for the
distributed executor and the sweeper. The queries are in ``pocoflow.ledger.items``."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from pocoflow.ledger import combine, itemrecovery, items, localitems, pipeline, steps, txn
from pocoflow.ledger.client import LedgerClient
from pocoflow.ledger.items import ItemClaim

#: ``pf_attempts.outcome`` of the step attempt that ran ``prep`` and fanned its items out.
FANNED_OUT_OUTCOME = "fanned_out"


class ItemQueue(LedgerClient):
    """Ledger calls for the items of map steps. Every call is one transaction; the
    claims and commits are fenced as the step calls are (G1)."""

    def fan_out(
        self,
        run_id: str,
        step: int,
        attempt: int,
        holder: str,
        worker: str,
        item_texts: Sequence[str],
        events: list[dict[str, Any]],
        now: float | None = None,
        prep_store: str | None = None,
    ) -> bool:
        """Write the items (codec texts, in order), the join row (``prep_store``: what
        prep wrote to the Store, for the join), the step's events and park the step, iff
        ``holder``'s claim of ``attempt`` still holds it. After this commit ``prep``
        never runs again for the step: its items come from the ledger."""
        end = steps.end_attempt_op(
            run_id, step, attempt, worker, FANNED_OUT_OUTCOME, now, holder=holder
        )
        ops = items.fan_out_ops(
            run_id, step, attempt, holder, worker, item_texts, events, end, now, prep_store
        )

        def body(conn: Any) -> bool:
            if not pipeline.run(conn, ops):
                raise txn.Abort(False)
            return True

        def own(conn: Any, done: bool) -> bool:  # a COMMIT whose outcome was lost
            if done:
                return True
            row = steps.get(conn, run_id, step)
            return (
                row is not None
                and row["attempt"] == attempt
                and bool(items.join_state(conn, run_id, step))
            )

        return self._write(body, f"fanning out step {step}", run_id, confirm=own, batched=True)

    def claim_item(
        self, c: ItemClaim, node_id: str, lease_s: float, now: float | None = None
    ) -> tuple[bool, dict[str, Any] | None, tuple[str, int] | None]:
        """Claim the item for ``c`` while its run goes on (G1, G4): returns ``(claimed,
        run guard columns, (item codec text, try number))``."""

        def body(conn: Any) -> tuple[bool, dict[str, Any] | None, tuple[str, int] | None]:
            got = items.claim(conn, c, node_id, lease_s, now)
            if not got[0]:
                raise txn.Abort(got)  # roll back: PostgreSQL sent the whole batch
            return got

        what = f"claiming item {c.idx} of step {c.step}"
        return self._write(body, what, c.run_id, batched=True, grouped=True)

    def renew_item_lease(self, c: ItemClaim, lease_s: float, now: float | None = None) -> bool:
        """Extend ``c``'s lease; False = the item was taken over: its commit will fail."""
        return self._write(
            lambda conn: items.renew(conn, c, lease_s, now),
            f"renewing the lease of item {c.idx} of step {c.step}",
            c.run_id,
        )

    def commit_item(
        self,
        c: ItemClaim,
        *,
        result_json: str | None,
        error_json: str | None = None,
        lease_s: float,
        now: float | None = None,
    ) -> tuple[bool, dict[str, Any] | None]:
        """The item's result and its count on the join, in one transaction (see
        ``items.commit``). ``(False, None)``, nothing written, if the claim was lost.

        On PostgreSQL the commits of this process's threads that come at the same moment
        share one transaction (``items.commit_many``, ``combine.Combiner``)."""
        if self._ledger.dialect == "postgresql":
            work = items.ItemCommit(c, result_json, error_json, lease_s, now)
            ledger = self._ledger
            aborted = False
            while True:
                try:
                    unit = combine.Unit(work)
                    got = ledger.grouped.run(unit, self._commit_items, ledger.writers)
                except combine.GroupAborted:
                    aborted = True  # another call's interrupt ended the group: again
                    continue
                if aborted and not got[0]:
                    # The aborted group's COMMIT may have gone out and landed first. Then
                    # each such call reads the join as complete, and more than one may
                    # publish it: a copy the step's claim refuses (G1).
                    got = self._read(partial(self._own_commit, c=c, got=got), c.run_id)
                return got  # type: ignore[no-any-return]

        def body(conn: Any) -> tuple[bool, dict[str, Any] | None]:
            got = items.commit(conn, c, result_json, error_json, lease_s, now)
            if not got[0]:
                raise txn.Abort((False, None))
            return got

        def own(conn: Any, got: tuple[bool, dict[str, Any] | None]) -> Any:
            return self._own_commit(conn, c, got)

        return self._finish_item(body, own, "committing", c, grouped=True)

    def _commit_items(self, units: list[combine.Unit]) -> None:
        """One group of item commits (``commit_item``): one transaction, each unit's
        outcome its own. A COMMIT whose outcome was lost is confirmed item by item."""
        commits: list[items.ItemCommit] = [unit.work for unit in units]

        def body(conn: Any) -> list[tuple[bool, dict[str, Any] | None]]:
            return items.commit_many(conn, commits)

        def own(conn: Any, got: list[tuple[bool, dict[str, Any] | None]]) -> Any:
            # The COMMIT was lost: each miss may be this group's own landed write. Only
            # one item per join may hear that it completed the count (it publishes the
            # join), though none can tell which one did.
            told: set[tuple[str, int]] = set()
            out = []
            for w, outcome in zip(commits, got, strict=True):
                outcome = self._own_commit(conn, w.claim, outcome)
                key = (w.claim.run_id, w.claim.step)
                state = outcome[1]
                if outcome[0] and state is not None and state["done"] >= state["total"]:
                    if key in told:
                        outcome = (True, {**state, "done": state["total"] - 1})
                    told.add(key)
                out.append(outcome)
            return out

        first = commits[0].claim
        what = f"committing item {first.idx} of step {first.step}"
        if len(commits) > 1:
            what += f" and {len(commits) - 1} more item(s)"
        outcomes = self._write(body, what, first.run_id, confirm=own, batched=True)
        for unit, outcome in zip(units, outcomes, strict=True):
            unit.result = outcome

    @staticmethod
    def _own_commit(
        conn: Any, c: ItemClaim, got: tuple[bool, dict[str, Any] | None]
    ) -> tuple[bool, dict[str, Any] | None]:
        """``got`` (a commit's answer), or committed when it missed but the item is
        finished under ``c`` (only its commit writes that)."""
        if got[0] or not items.committed_by(conn, c):
            return got
        return True, items.join_state(conn, c.run_id, c.step)

    def fail_item(
        self,
        c: ItemClaim,
        *,
        error_json: str,
        error_msg: str,
        events: list[dict[str, Any]],
        crashed: bool = False,
    ) -> bool:
        """The item out of tries (``crashed``: at its crash budget) fails its run, naming
        it (see ``items.fail_ops``)."""
        ops = items.fail_ops(c, error_json, error_msg, events, crashed)

        def body(conn: Any) -> bool:
            if not pipeline.run(conn, ops):
                raise txn.Abort(False)
            return True

        def own(conn: Any, done: bool) -> bool:
            return done or items.committed_by(conn, c)

        return self._finish_item(body, own, "failing", c)

    def _finish_item(
        self, body: Any, own: Any, what: str, c: ItemClaim, *, grouped: bool = False
    ) -> Any:
        what = f"{what} item {c.idx} of step {c.step}"
        return self._write(body, what, c.run_id, confirm=own, batched=True, grouped=grouped)

    def retry_item(
        self,
        c: ItemClaim,
        *,
        next_try: int,
        due_in: float,
        now: float | None = None,
        crashed_on: list[str] | None = None,
    ) -> int | None:
        """Hand the item to a new attempt (returned) for try ``next_try``, due in
        ``due_in`` seconds (``crashed_on``: after a crash of the executor, counted toward
        the item's crash budget, with the workers of its crashes in a row); None if ``c``
        no longer holds it."""
        return self._write(
            lambda conn: items.retry(conn, c, next_try, due_in, now, crashed_on),
            f"retrying item {c.idx} of step {c.step}",
            c.run_id,
        )

    def mark_items_sent(
        self, sent: Sequence[tuple[str, int, int, int]], now: float | None = None
    ) -> None:
        """The messages of ``(run_id, step, idx, attempt)`` are with the broker."""
        if not sent:
            return
        op = items.mark_sent_op(sent, now)
        self._write(
            lambda conn: pipeline.run(conn, [op]), f"marking {len(sent)} items sent", sent[0][0]
        )

    def running_items(self, run_id: str, step: int) -> list[dict[str, Any]]:
        """Items of the step a worker runs now: ``idx``, ``attempt``, ``lease_owner``,
        ``task_id`` (what ``cancel(terminate=True)`` revokes)."""
        return self._read(lambda conn: items.running(conn, run_id, step), run_id)

    def get_item(self, run_id: str, step: int, idx: int) -> dict[str, Any] | None:
        return self._read(lambda conn: items.get(conn, run_id, step, idx), run_id)

    def get_items(
        self, run_id: str, step: int, *, values_only: bool = False
    ) -> list[dict[str, Any]]:
        """Every item row of a map step, in item order (``values_only``: what the join
        needs: ``idx``, ``item_json``, ``result_json``, ``error_json``)."""
        return self._read(
            lambda conn: items.all_items(conn, run_id, step, values_only=values_only), run_id
        )

    def get_prep_store(self, run_id: str, step: int) -> str | None:
        """What the map step's ``prep`` wrote to the Store at its fan-out (JSON), or None."""
        return self._read(lambda conn: items.prep_store(conn, run_id, step), run_id)

    def get_join(self, run_id: str, step: int) -> dict[str, Any] | None:
        """``done``, ``total`` and the step row's state, or None: not fanned out."""
        return self._read(lambda conn: items.join_state(conn, run_id, step), run_id)

    def reopen_items(
        self,
        run_id: str,
        step: int,
        attempt: int,
        holder: str,
        worker: str,
        now: float | None = None,
    ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """See ``items.reopen``: what a claim of an already fanned-out step does."""
        return self._write(
            lambda conn: items.reopen(conn, run_id, step, attempt, holder, worker, now),
            f"re-opening the items of step {step}",
            run_id,
        )

    # ── a local run's map steps (``localitems``) ─────────────────────────────

    def keep_items(self, run_id: str, step: int, rows: Sequence[tuple[int, str, str]]) -> None:
        """Finished items of a local map step, ``(idx, item digest, result codec text)``,
        in one transaction; a row of another item at the same index is replaced."""
        if not rows:
            return
        op = localitems.keep_op(self._dialect, run_id, step, rows)
        self._write(
            lambda conn: pipeline.run(conn, [op]),
            f"keeping {len(rows)} finished items of step {step}",
            run_id,
            batched=True,
        )

    def kept_items(self, run_id: str, step: int) -> list[dict[str, Any]]:
        """A local map step's kept items, in item order: ``idx``, ``item_json`` and
        ``result_json`` of each row that has a result."""
        rows = self.get_items(run_id, step, values_only=True)
        return [r for r in rows if r["result_json"] is not None and r["error_json"] is None]

    def drop_items_from(self, run_id: str, step: int, first_idx: int) -> int:
        """Forget the kept items of a local map step from ``first_idx`` on (its list got
        shorter); how many went."""
        return self._write(
            lambda conn: localitems.drop_from(conn, run_id, step, first_idx),
            f"dropping kept items of step {step} from index {first_idx}",
            run_id,
        )

    # ── sweeper ──────────────────────────────────────────────────────────────

    def items_published(self, run_id: str, step: int, worker: str) -> bool:
        """``worker`` published all the step's item messages (see ``items.sent_all``)."""
        return self._write(
            lambda conn: items.sent_all(conn, run_id, step, worker),
            f"marking the items of step {step} published",
            run_id,
        )

    def unsent_items(
        self,
        older_than_s: float,
        dead_after_s: float,
        now: float | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        return self._read(
            lambda conn: itemrecovery.unsent(conn, older_than_s, dead_after_s, now, limit)
        )

    def orphaned_items(
        self, dead_after_s: float, now: float | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        return self._read(lambda conn: itemrecovery.orphaned(conn, dead_after_s, now, limit))

    def take_over_item(
        self,
        run_id: str,
        step: int,
        idx: int,
        attempt: int,
        owner: str | None,
        *,
        crashed: bool = False,
    ) -> int | None:
        """Re-queue a running item whose holder is gone (new attempt, returned); with
        ``crashed`` its process died, which counts toward the poison limit."""
        return self._write(
            lambda conn: itemrecovery.take_over(conn, run_id, step, idx, attempt, owner, crashed),
            f"taking over item {idx} of step {step}",
            run_id,
        )

    def release_received_item(
        self, run_id: str, step: int, idx: int, attempt: int, receiver: str
    ) -> bool:
        return self._write(
            lambda conn: itemrecovery.release_received(conn, run_id, step, idx, attempt, receiver),
            f"releasing item {idx} of step {step}",
            run_id,
        )

    def any_live_fan_out(self) -> bool:
        return self._read(itemrecovery.any_live_fan_out)

    def stranded_joins(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._read(lambda conn: itemrecovery.stranded_joins(conn, limit))

    def requeue_join(
        self, run_id: str, step: int, lease_s: float, now: float | None = None
    ) -> dict[str, Any] | None:
        return self._write(
            lambda conn: itemrecovery.requeue_join(conn, run_id, step, lease_s, now),
            f"re-queueing the join of step {step}",
            run_id,
        )

    def queued_items(
        self, after: tuple[str, int, int] | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """A page of sent, queued items of live runs (the re-send after a broker loss)."""
        return self._read(lambda conn: itemrecovery.queued_page(conn, after, limit))

    def stale_queued_items(
        self, older_than_s: float, now: float | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        return self._read(lambda conn: itemrecovery.stale_queued(conn, older_than_s, now, limit))

    def unsend_item(
        self, run_id: str, step: int, idx: int, attempt: int, sent_at: float, settled_s: float
    ) -> bool:
        return self._write(
            lambda conn: itemrecovery.unsend(conn, run_id, step, idx, attempt, sent_at, settled_s),
            f"releasing item {idx} of step {step}, taken by a gone worker",
            run_id,
        )

    def keep_item_sent(
        self, run_id: str, step: int, idx: int, attempt: int, sent_at: float
    ) -> bool:
        return self._write(
            lambda conn: itemrecovery.resend(conn, run_id, step, idx, attempt, sent_at),
            f"marking item {idx} of step {step} sent again",
            run_id,
        )

    def touch_queued_item(
        self, run_id: str, step: int, idx: int, attempt: int, sent_at: float
    ) -> bool:
        return self._write(
            lambda conn: itemrecovery.touch_queued(conn, run_id, step, idx, attempt, sent_at),
            f"re-sending item {idx} of step {step}",
            run_id,
        )
