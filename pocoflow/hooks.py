"""Hook event names and the one forgiving dispatcher every executor uses.

A hook is observability, not control flow: a failing hook is logged and the run goes on
(0.2 behaviour). The ledger commit is part of the step, never a hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pocoflow.logging import get_logger

NODE_START = "node_start"
NODE_END = "node_end"
NODE_ERROR = "node_error"
FLOW_END = "flow_end"
HOOK_EVENTS = (NODE_START, NODE_END, NODE_ERROR, FLOW_END)

# Ledger-only events (not hookable): recorded so every run tells its whole story.
FLOW_START = "flow_start"
NODE_RETRY = "node_retry"
RUN_CANCELLED = "run_cancelled"
RUN_PAUSED = "run_paused"
RUN_RESUMED = "run_resumed"
# A step message a worker could not decode (recorded when its run id was readable).
MESSAGE_MALFORMED = "message_malformed"
# An attempt that finished after its lease was taken over: its commit was refused (G1).
COMMIT_REFUSED = "commit_refused"
# Human in the loop: a node waits for a value (the run is ``waiting``), a value was sent,
# a wait passed its timeout with no value (the node runs again and gets TimeoutError).
RUN_WAITING = "run_waiting"
SIGNAL_SENT = "signal_sent"
WAIT_TIMED_OUT = "wait_timed_out"

_log = get_logger("hooks")


class Hooks:
    """Callbacks per event; ``fire`` never raises."""

    __slots__ = ("_callbacks",)

    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callable[..., Any]]] = {e: [] for e in HOOK_EVENTS}

    def add(self, event: str, callback: Callable[..., Any]) -> None:
        if event not in self._callbacks:
            raise ValueError(
                f"Unknown hook event {event!r}. Valid events: {', '.join(HOOK_EVENTS)}"
            )
        if not callable(callback):
            raise TypeError(f"Hook for {event!r} must be callable, got {type(callback).__name__}")
        self._callbacks[event].append(callback)

    def fire(self, event: str, *args: Any) -> None:
        callbacks = self._callbacks[event]
        if not callbacks:
            return
        for callback in callbacks:
            try:
                callback(*args)
            except Exception as exc:  # a hook must never break the run
                _log.warning("Hook %r raised %s: %s", event, type(exc).__name__, exc)

    def has(self, event: str) -> bool:
        return bool(self._callbacks[event])
