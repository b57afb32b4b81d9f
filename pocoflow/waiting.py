"""Human in the loop, the pure half: what ``Node.wait_for`` asks and what it raises.

A node that needs a value from outside the run (an approval, a correction) calls
``self.wait_for(key)``. If the value was sent, it is returned. If not, ``WaitingFor`` stops
the step uncommitted; the executor parks the run (status ``waiting``, no worker holds it)
and, once the value is sent, runs the node again from ``prep``, where ``wait_for`` now
returns it (LangGraph's ``interrupt``). The ledger half lives in ``pocoflow.ledger.signals``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# What parking a waiting run found (``WorkflowDB.park_waiting``).
PARKED = "parked"
SIGNALLED = "signalled"  # the value is there: run the node again now
STOPPED = "stopped"  # the run is not running (cancelled, paused, a pause request)
LOST = "lost"  # the delivery no longer holds its step (G1)


@dataclass(frozen=True)
class Signal:
    """What the ledger holds for one key of a run: the value, if it was sent, and whether
    the deadline of a wait with a timeout has passed (on the database's clock)."""

    sent: bool
    value: Any = None
    expired: bool = False


SignalReader = Callable[[str], Signal]
"""``reader(key) -> Signal``: how a node reads its run's signals (set by the executor)."""


class WaitingFor(BaseException):
    """Raised by ``Node.wait_for`` when no value was sent for ``key`` yet: the step stops
    uncommitted and the run waits.

    A ``BaseException``, not an ``Exception``, because it is control flow, not a failure:
    the retry seam (``except Exception``) must not retry it, ``exec_fallback`` must not
    swallow it, and neither should user code that catches ``Exception`` around a call.
    """

    def __init__(self, node_name: str, key: str, timeout: float | None) -> None:
        super().__init__(f"node {node_name!r} waits for {key!r}")
        self.node_name = node_name
        self.key = key
        self.timeout = timeout


def check_key(key: Any) -> str:
    """A signal key is a non-empty str: it names the value in the ledger and the CLI."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"A signal key must be a non-empty str, got {key!r}")
    return key


def check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"wait_for timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)
