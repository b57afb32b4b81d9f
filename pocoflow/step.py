"""The node step every executor runs: hooks around prep -> exec -> post, plus its events.

The in-process loop and the Celery task both call ``run_step``; they differ only in where
the Store comes from and how the result is committed, so a node behaves the same
wherever it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pocoflow.hooks import NODE_END, NODE_ERROR, NODE_START, Hooks
from pocoflow.limits import LimitGate, LimitWait
from pocoflow.node import Node
from pocoflow.usage import UsageSink, enter_step, leave_step
from pocoflow.waiting import SignalReader

#: What a node's prep/exec/post may raise that fails its step: its exceptions, and
#: ``asyncio.CancelledError`` (a ``BaseException`` an async exec raises when its own
#: task is cancelled), which would otherwise escape the executor and have the step
#: re-sent after every lease, for ever. ``KeyboardInterrupt``, ``SystemExit`` and
#: ``WaitingFor`` still pass through.
NODE_FAILURES: tuple[type[BaseException], ...] = (Exception, asyncio.CancelledError)


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(slots=True)
class StepRun:
    """What one step did: the action it returned and the ledger events it produced."""

    action: str | None
    elapsed_s: float
    events: list[dict[str, Any]] = field(default_factory=list)


class RunCancelled(Exception):
    """Raised inside a step to stop it because its run was cancelled (a sub-flow between
    its inner nodes, or a long ``exec`` that polled ``self.cancelled()``): the step is not
    committed and the run ends as ``cancelled``, not ``failed``."""


class RetryLater(Exception):
    """``exec`` failed with tries left: the executor schedules try ``next_try`` after
    ``delay`` seconds instead of sleeping (the distributed path)."""

    def __init__(
        self, node_name: str, step: int, cause: BaseException, next_try: int, delay: float
    ):
        super().__init__(f"node {node_name!r} (step {step}) try {next_try - 1} failed: {cause}")
        self.cause = cause
        self.next_try = next_try
        self.delay = delay


class StepError(Exception):
    """A node raised; carries the events (node_start, node_error) to record with it."""

    def __init__(self, node_name: str, step: int, cause: BaseException, events: list[dict]):
        super().__init__(f"node {node_name!r} (step {step}) failed: {cause}")
        self.node_name = node_name
        self.step = step
        self.cause = cause
        self.events = events


def run_step(
    node: Node,
    store: Any,
    *,
    step: int,
    hooks: Hooks,
    run_id: str | None = None,
    attempt: int = 1,
    cancel_probe: Callable[[], bool] | None = None,
    record: bool = False,
    try_number: int | None = None,
    usage_sink: UsageSink | None = None,
    signals: SignalReader | None = None,
    limit_gate: LimitGate | None = None,
) -> StepRun:
    """Run ``node`` once against ``store``; hooks fire here, in whatever process runs it.

    ``report_usage`` calls of the step go to ``usage_sink`` (None: the enclosing step's,
    as for the inner nodes of a sub-flow), tagged with this run, step and attempt.
    With ``try_number`` set, ``exec`` runs once as that try and a retryable failure with
    tries left raises ``RetryLater`` (the distributed executor lets Celery schedule the
    retry, so no worker sleeps); otherwise the node's own retry loop runs. A sub-flow
    (a Flow or BatchFlow used as a node) always runs whole through ``_run``: its work is
    its inner graph, not an ``exec``, and its inner nodes keep their own retry loops.
    ``record`` builds the ledger events; ``signals`` is what ``Node.wait_for`` reads. Raises
    ``StepError`` wrapping the node's exception; ``WaitingFor`` (a node waits for a value
    not sent yet) passes through untouched, for the executor to park the run.

    ``limit_gate`` enforces the node's limits before each exec try; a non-blocking gate
    raises ``LimitWait`` out of here (nothing ran, no try was spent). The inner nodes of
    a sub-flow wait in place instead: sending the outer step again would re-run the
    inner nodes before them.
    """
    if node._is_flow:
        # A sub-flow keeps its own configured run_id; its inner steps get the outer run's.
        node._outer_context = (run_id, step, attempt, cancel_probe, signals)  # type: ignore[attr-defined]
        node._limit_gate = limit_gate.waiting() if limit_gate is not None else None
    else:
        node.run_id, node.step, node.attempt = run_id, step, attempt
        node._cancel_probe = cancel_probe
        node._signals = signals
        if limit_gate is not None or node._limit_gate is not None:
            node._limit_gate = (
                limit_gate if limit_gate is not None and limit_gate.applies(node) else None
            )
    name = node.name
    events: list[dict[str, Any]] = []
    if record:
        events.append({"event": NODE_START, "step": step, "node_name": name, "ts": utc_now()})
    hooks.fire(NODE_START, name, store)
    started = time.perf_counter()
    try:
        token = None
        try:
            node._usage_scope, token = enter_step(run_id, step, attempt, name, usage_sink)
            action = _prep_exec_post(node, store, step, try_number)
        finally:
            node._usage_scope = None
            leave_step(token)
        if action is not None and not isinstance(action, str):
            raise TypeError(
                f"Node {name!r} (step {step}): post() must return an action str or None, "
                f"got {type(action).__name__}"
            )
    except (RetryLater, RunCancelled, LimitWait):
        raise
    except NODE_FAILURES as exc:
        elapsed = time.perf_counter() - started
        if record:
            events.append(
                {
                    "event": NODE_ERROR,
                    "step": step,
                    "node_name": name,
                    "elapsed_ms": elapsed * 1000,
                    "error_msg": f"{type(exc).__name__}: {exc}",
                    "ts": utc_now(),
                }
            )
        hooks.fire(NODE_ERROR, name, exc, store)
        raise StepError(name, step, exc, events) from exc
    elapsed = time.perf_counter() - started
    if record:
        events.append(
            {
                "event": NODE_END,
                "step": step,
                "node_name": name,
                "action": action,
                "elapsed_ms": elapsed * 1000,
                "ts": utc_now(),
            }
        )
    hooks.fire(NODE_END, name, action, elapsed, store)
    return StepRun(action, elapsed, events)


def _prep_exec_post(node: Node, store: Any, step: int, try_number: int | None) -> Any:
    if try_number is not None and not node._is_flow:
        prep_result = node.prep(store)
        return node.post(store, prep_result, _exec_try(node, prep_result, try_number, step))
    return node._run(store)


def _exec_try(node: Node, prep_result: Any, try_number: int, step: int) -> Any:
    try:
        return node._exec_once(prep_result)
    except LimitWait:
        raise
    except NODE_FAILURES as exc:
        tries = max(1, int(node.max_retries))
        if try_number < tries and node.is_retryable(exc):
            raise RetryLater(
                node.name, step, exc, try_number + 1, node.delay_after(try_number)
            ) from exc
        return node.exec_fallback(prep_result, exc)
