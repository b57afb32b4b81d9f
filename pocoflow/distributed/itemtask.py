"""One map item on a worker: what the ``pocoflow.item`` Celery task does.

    decode -> claim (guard in the same statement) -> exec once as try N -> commit

The item's claim and commit are fenced like a step's (attempt + holder token, G1): a
duplicate delivery claims nothing, a worker that lost its item commits nothing. The
claim re-checks the run row, so cancel and pause take effect between items (G4); no
``pf_runs`` write happens on an item's way unless its run ends. A retryable failure with
tries left becomes a new attempt sent with a Celery countdown (no worker sleeps); a spent
item is collected into ``results`` or fails the run naming its index. The commit that
completes the join publishes the map step again, for its join (``mapstep``). A run with
a budget is checked right after the claim: once it has spent more, the item goes back
unstarted and the run pauses. A parallel BatchFlow's pass (its map's item) first loads
the Store its batch's ``prep`` left (``_enter_batch``).

``execute_item`` never raises, for the reason ``execute_step`` does not.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from pocoflow import codec, usage
from pocoflow.batchflow import BatchPasses, map_node_of
from pocoflow.codec import CodecError
from pocoflow.distributed import lifecycle
from pocoflow.distributed.control import FlagReader
from pocoflow.distributed.executor import (
    CANCELLED,
    COMMITTED,
    CRASHED,
    DUPLICATE,
    FAILED,
    LEDGER_UNREACHABLE,
    LIMITED,
    LOST,
    MALFORMED,
    PAUSED,
    RETRY,
    UNKNOWN_RUN,
    WorkerContext,
    _claims,
    _record_malformed,
    _Refused,
    _unreachable,
    default_context,
    default_worker_id,
    limit_delay,
    run_store,
    step_queue,
)
from pocoflow.distributed.graphs import mismatch_message
from pocoflow.distributed.itemcrash import item_crashed
from pocoflow.distributed.mapstep import apply_prep_writes
from pocoflow.distributed.message import ItemMessage, MalformedMessage, StepMessage
from pocoflow.hooks import NODE_ERROR, NODE_RETRY, RUN_PAUSED
from pocoflow.ledger.items import ItemClaim
from pocoflow.limits import LimitGate, LimitWait, limits_of
from pocoflow.logging import get_logger
from pocoflow.mapnode import ItemFailed, MapNode, error_record, running_item
from pocoflow.registry import UnknownFlowError
from pocoflow.step import NODE_FAILURES, RunCancelled, utc_now
from pocoflow.usage import BUDGET_EXCEEDED, Budget, budget_message

_log = get_logger("distributed.items")

#: What an item's exec may raise that fails the item (its retry policy, then collect or
#: fail the run): ``asyncio.CancelledError`` is a BaseException since Python 3.8, and a
#: call cancelled inside a library must not escape the task, leaving the item running
#: until its lease ran out and the sweeper sent it again, for ever.
ITEM_FAILURES = NODE_FAILURES


def execute_item(
    message: Any,
    *,
    worker_id: str | None = None,
    task_id: str | None = None,
    context: WorkerContext | None = None,
) -> str:
    """Run the map item ``message`` names; returns the outcome (never raises)."""
    worker = worker_id or default_worker_id()
    try:
        msg = ItemMessage.from_dict(message)
    except MalformedMessage as error:
        _record_malformed((context or default_context()).db, error)
        return MALFORMED
    item: _ItemRun | None = None
    try:
        item = _ItemRun(context or default_context(), msg, worker, task_id)
        outcome = item.run()
    except Exception as exc:
        if (item is None or not item.claimed) and _unreachable(exc):
            _log.warning(
                "Item %d of step %d of run %s: the ledger is unreachable before the claim "
                "(%s); the message will be delivered again",
                msg.idx,
                msg.step,
                msg.run_id,
                exc,
            )
            return LEDGER_UNREACHABLE
        if item is None or not item.claimed or _unreachable(exc):
            _log.exception(
                "Item %d of step %d of run %s (attempt %d) crashed in the executor; its "
                "lease will expire and the sweeper will re-run it",
                msg.idx,
                msg.step,
                msg.run_id,
                msg.attempt,
            )
            return CRASHED
        outcome = item_crashed(item, exc)
    # A failed item, a budget pause, or a claim that met a cancel or pause: the run's
    # other items waiting for their limits ask no more.
    item.ctx.forget_waiters(msg.run_id, outcome)
    return outcome


class _ItemRun:
    """One delivery of one item message."""

    def __init__(
        self, ctx: WorkerContext, msg: ItemMessage, worker: str, task_id: str | None = None
    ) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.msg = msg
        self.worker = worker
        self.holder = f"{worker}#{next(_claims)}"
        self.claim = ItemClaim(msg.run_id, msg.step, msg.idx, msg.attempt, self.holder, task_id)
        self.claimed = False
        self.node_name = msg.node_id  # the node's name once the graph is loaded
        self.node: MapNode | None = None
        self.run_row: dict[str, Any] = {}  # the run's guard columns, once claimed
        self.try_number = msg.try_number  # the ledger's, once claimed
        self._claimed_again = False  # _guard's one claim after a withdrawn pause

    def run(self) -> str:
        msg, db = self.msg, self.db
        self.ctx.leases.beating(self.worker)
        claimed, run, item = db.claim_item(self.claim, msg.node_id, self.ctx.lease_s)
        self.claimed = claimed
        if run is None:
            _log.error("Item message for unknown run %r dropped", msg.run_id)
            return UNKNOWN_RUN
        if not claimed:
            return self._guard(run)
        assert item is not None
        self.run_row = run
        if run.get("max_tokens") is not None or run.get("max_cost_usd") is not None:
            stop = self._over_budget(run)  # only runs with a budget pay for this read
            if stop is not None:
                return stop
        value_text, try_number = item
        self.try_number = try_number
        node = self._node(run)
        if isinstance(node, str):
            return self._fail(node, refused=True)
        self.node_name, self.node = node.name, node
        node.run_id, node.step, node.attempt = msg.run_id, msg.step, msg.attempt
        node._cancel_probe = FlagReader(msg.run_id, self.ctx.redis, db)
        with self.ctx.leases.hold(msg.run_id, msg.step, msg.attempt, self.holder, idx=msg.idx):
            try:
                if isinstance(node, BatchPasses):
                    refused = self._enter_batch(node)
                    if refused is not None:
                        return self._fail(refused, refused=True)
                value = codec.decode(value_text, key=f"item {msg.idx}")
                return self._exec(run, node, value, try_number)
            except RunCancelled:
                # exec stopped itself: the item goes back to the queue for a resume.
                db.take_over_item(msg.run_id, msg.step, msg.idx, msg.attempt, self.holder)
                return CANCELLED

    def _enter_batch(self, passes: BatchPasses) -> str | None:
        """A parallel BatchFlow's pass: it starts from the Store its batch's ``prep``
        left (the Store of step-1 and what prep wrote, one read per item) and runs its
        inner nodes in this run, under its cancel, waiting in place for their limits.
        A refusal's text if that Store does not fit the flow's schema."""
        msg = self.msg
        flow, _graph = self.ctx.graphs.get(msg.flow)
        store = self.db.load_store(msg.run_id, msg.step - 1)[0]
        # As the step's own delivery has it: a pass's wrong write fails in the pass.
        try:
            store = run_store(store, flow, self.run_row.get("store_name"), msg)
        except _Refused as refusal:  # as the step's own delivery says, not a crash
            return str(refusal)
        apply_prep_writes(self.db, msg.run_id, msg.step, store)
        passes.bind(store)
        passes.run_in(self._no_waits, LimitGate(self.ctx.limiter, msg.flow))
        return None

    def _over_budget(self, run: dict[str, Any]) -> str | None:
        """Between items as before a node: once the run has reported more than its
        budget, the item goes back unstarted and the run pauses (the step's ``resume``,
        with a higher budget, sends the items not done). None: within budget, or a resume
        withdrew the pause meanwhile (this claimed item runs)."""
        msg, db = self.msg, self.db
        spent = db.usage_totals(msg.run_id)
        if Budget(run.get("max_tokens"), run.get("max_cost_usd")).exceeded(*spent) is None:
            return None
        # Over the budget the claim read: judge by the run's budget now (a resume may
        # have raised it since), off the hot path.
        now = db.get_run(msg.run_id) or {"status": "cancelled"}
        reason = Budget(now.get("max_tokens"), now.get("max_cost_usd")).exceeded(*spent)
        if reason is None:
            return None
        message = budget_message(msg.run_id, reason, msg.step)
        # The request, the pause and why, in one write: an item whose claim meets a
        # request left alone would park the run itself, and the reason be lost.
        said = [
            {"event": BUDGET_EXCEEDED, "step": msg.step, "error_msg": message},
            {"event": RUN_PAUSED, "step": msg.step},
        ]
        parked = db.update_run_if(
            msg.run_id, status_in=lifecycle.LIVE, with_events=said, control="pause", status="paused"
        )
        if parked:
            _log.warning("%s (between items)", message)
        else:
            now = db.get_run(msg.run_id) or {"status": "cancelled"}
            if now["status"] in lifecycle.LIVE and now.get("control") is None:
                return None  # resumed meanwhile (a higher budget): this item runs
        db.take_over_item(msg.run_id, msg.step, msg.idx, msg.attempt, self.holder)
        return PAUSED

    def _guard(self, run: dict[str, Any]) -> str:
        """The claim missed: the run stopped (G4), or this delivery is a duplicate."""
        msg = self.msg
        stop = lifecycle.stopped(self.db, run, msg.step)
        if stop is not None:
            return stop
        if run.get("control") == "pause":
            if self.db.update_run_if(
                msg.run_id,
                status_in=lifecycle.LIVE,
                control_in=("pause",),
                with_events=[{"event": RUN_PAUSED, "step": msg.step}],
                status="paused",
            ):
                _log.info("Run %s paused between items of step %d", msg.run_id, msg.step)
                return PAUSED
            # Not parked here: another item parked it, a cancel landed, or a resume
            # withdrew the request (the run goes on: it did not stop).
            now = self.db.get_run(msg.run_id) or {"status": "cancelled"}
            stop = lifecycle.stopped(self.db, now, msg.step)
            if stop is not None:
                return stop
            if now.get("control") is None and not self._claimed_again:
                # The request was withdrawn: the claim missed only for it, so claim again
                # (once) rather than drop a live item until the sweeper's backstop.
                self._claimed_again = True
                return self.run()
        return DUPLICATE

    def _node(self, run: dict[str, Any]) -> MapNode | str:
        """The MapNode from the registry, checked against the run's graph (G6, G7); a
        refusal's text otherwise."""
        msg = self.msg
        try:
            _flow, graph = self.ctx.graphs.get(msg.flow)
        except UnknownFlowError as exc:
            return f"Worker {self.worker} refused run {msg.run_id!r}: {exc}"
        recorded = run.get("fingerprint")
        if recorded and recorded != graph.fingerprint:
            full = self.db.get_run(msg.run_id) or run
            return mismatch_message(full, graph, run_id=msg.run_id, worker=self.worker)
        try:
            node = graph.node(msg.node_id)
        except KeyError as exc:
            return f"Run {msg.run_id!r}, flow {msg.flow!r}: {exc.args[0]}"
        passes = map_node_of(node)
        if passes is None:
            return f"Run {msg.run_id!r}: node {msg.node_id!r} is not a MapNode"
        return passes

    def _exec(self, run: dict[str, Any], node: MapNode, value: Any, try_number: int) -> str:
        msg = self.msg
        # The node's limits hold each item's exec (keyed by ``limit_key(item)``); a call
        # that must wait gives its slot back and comes again later, spending no try.
        node._limit_gate = (
            LimitGate(self.ctx.limiter, msg.flow, blocking=False) if limits_of(node) else None
        )
        node._signals = self._no_waits
        try:
            # Usage reported by this item's exec is kept under its attempt and index.
            with (
                usage.recording(
                    msg.run_id, msg.step, msg.attempt, node.name, msg.idx, self.ctx.usage
                ) as scope,
                running_item(node, msg.idx),
            ):
                node._usage_scope = scope
                try:
                    result = node._exec_once(value)
                finally:
                    node._usage_scope = None
        except RunCancelled:
            raise
        except LimitWait as wait:
            return self._wait_for_limit(run, node, wait, try_number)
        except ITEM_FAILURES as exc:
            tries = max(1, int(node.max_retries))
            if try_number < tries and node.is_retryable(exc):
                return self._retry(run, node, exc, try_number)
            try:
                with running_item(node, msg.idx):
                    result = node.exec_fallback(value, exc)
            except ITEM_FAILURES as final:
                try:
                    collected = node.item_outcome(msg.idx, final)
                except ItemFailed as failed:
                    outcome = self._fail(str(failed), cause=final)
                    if outcome == FAILED:
                        self._node_error_hook(failed)
                    return outcome
                return self._commit(run, None, json.dumps(error_record(collected)))
        try:
            text = codec.encode(result, key=f"item {msg.idx} result")
        except CodecError as exc:  # G7: a result that would not round-trip, named
            if isinstance(node, BatchPasses):
                return self._fail(
                    f"BatchFlow {node.name!r} step {msg.step}, pass {msg.idx}: what a "
                    f"parallel pass writes goes back to the join as a Store value: {exc}",
                    cause=exc,
                )
            return self._fail(f"MapNode {node.name!r} step {msg.step}: {exc}", cause=exc)
        return self._commit(run, text, None)

    def _node_error_hook(self, failed: ItemFailed) -> None:
        """The flow's ``node_error`` hook, as a local run fires it when the item's
        ``ItemFailed`` leaves the node: with the Store the map step started from (one
        read, on this failure path only). A hook's error is logged, never raised."""
        msg = self.msg
        try:
            flow, _graph = self.ctx.graphs.get(msg.flow)
            store = self.db.load_store(msg.run_id, msg.step - 1)[0]
        except Exception as exc:  # the run failed already: the hook is all we miss
            _log.warning("Run %s: node_error hook of item %d skipped: %s", msg.run_id, msg.idx, exc)
            return
        flow._hooks.fire(NODE_ERROR, self.node_name, failed, store)

    def _no_waits(self, key: str) -> NoReturn:
        """``wait_for`` in an item's exec, or in a node of a parallel pass: an item is not
        a step and cannot park its run (its siblings run on), so it fails as the item's
        error, saying what to do."""
        msg = self.msg
        if isinstance(self.node, BatchPasses):
            raise RuntimeError(
                f"BatchFlow {self.node_name!r} pass {msg.idx} of run {msg.run_id}: "
                f"wait_for({key!r}) cannot be called in a parallel pass on workers (each "
                "pass is a map item, which cannot park its run); call it in a node before "
                "the batch, or set parallel = False"
            )
        raise RuntimeError(
            f"MapNode {self.node_name!r} item {msg.idx} of run {msg.run_id}: wait_for({key!r}) "
            "cannot be called in a map item's exec on workers (an item cannot park the run); "
            "call it in prep or post, or in a node before the map"
        )

    def _commit(self, run: dict[str, Any], result: str | None, error: str | None) -> str:
        msg = self.msg
        committed, state = self.db.commit_item(
            self.claim, result_json=result, error_json=error, lease_s=self.ctx.lease_s
        )
        if not committed:
            _log.warning(
                "Item %d of step %d of run %s: attempt %d lost its claim; result discarded",
                msg.idx,
                msg.step,
                msg.run_id,
                msg.attempt,
            )
            return LOST
        # The commit that completed the count re-queued the step: publish it, for its join
        # (a step a resumer holds instead is joined by that resumer).
        if (
            state is not None
            and state["done"] == state["total"]
            and state["step_status"] == "queued"
            and state["lease_owner"] is None
        ):
            join = StepMessage(
                msg.run_id, msg.flow, msg.step, state["node_id"], state["step_attempt"]
            )
            self.ctx.publisher.send(join, queue=step_queue(run, self.node))
        return COMMITTED

    def _wait_for_limit(
        self, run: dict[str, Any], node: MapNode, wait: LimitWait, try_number: int
    ) -> str:
        """The node's limits refused this item's call: hold no worker slot, send the item
        again for when it may start, under a new attempt with the same try."""
        msg = self.msg
        delay = limit_delay(wait.wait_s)
        attempt = self.db.retry_item(self.claim, next_try=try_number, due_in=delay)
        if attempt is None:
            return LOST
        self.ctx.publisher.send(
            msg.retry(try_number, attempt), queue=step_queue(run, node), countdown=delay
        )
        return LIMITED

    def _retry(
        self, run: dict[str, Any], node: MapNode, exc: BaseException, try_number: int
    ) -> str:
        msg = self.msg
        delay = node.delay_after(try_number)
        error = f"{type(exc).__name__}: {exc}"
        self.db.save_event(
            msg.run_id,
            NODE_RETRY,
            step=msg.step,
            node_name=node.name,
            error_msg=f"item {msg.idx}: {error}",
            attempt=msg.attempt,
            ts=utc_now(),
        )
        attempt = self.db.retry_item(self.claim, next_try=try_number + 1, due_in=delay)
        if attempt is None:
            return LOST
        _log.info(
            "Item %d of step %d of run %s: try %d failed (%s); try %d in %.2fs",
            msg.idx,
            msg.step,
            msg.run_id,
            try_number,
            error,
            try_number + 1,
            delay,
        )
        self.ctx.publisher.send(
            msg.retry(try_number + 1, attempt), queue=step_queue(run, node), countdown=delay
        )
        return RETRY

    def _fail(
        self,
        error_msg: str,
        *,
        cause: BaseException | None = None,
        refused: bool = False,
        crashed: bool = False,
    ) -> str:
        """The item fails its run, naming the item (``crashed``: its last crash, counted);
        the run stays resumable."""
        msg = self.msg
        record = (
            error_record(cause) if cause is not None else {"type": "Refused", "message": error_msg}
        )
        event = {
            "event": NODE_ERROR,
            "step": msg.step,
            "node_name": self.node_name,
            "error_msg": error_msg,
            "attempt": msg.attempt,
            "ts": utc_now(),
        }
        if not self.db.fail_item(
            self.claim,
            error_json=json.dumps(record),
            error_msg=error_msg,
            events=[event],
            crashed=crashed,
        ):
            return LOST
        _log.error("Run %s failed at step %d item %d: %s", msg.run_id, msg.step, msg.idx, error_msg)
        return "refused" if refused else FAILED
