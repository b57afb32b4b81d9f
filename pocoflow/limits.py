"""Node limits shared by every caller: ``rate_limit``, ``max_concurrency``, ``token_limit``.

A node states its limits as class attributes; ``limit_key(prep_result_or_item)`` names
the resource they protect (a tenant, an API key). Before each ``exec`` try the executor
asks a ``Limiter`` for a ``Decision``: go (with a concurrency ``Slot`` to release after
the call) or the number of seconds to wait before asking again. The semantics:

- ``rate_limit = "10/s"`` (``/m``, ``/h``, or ``"5/2s"``): at most 10 calls START in any
  sliding window of that length (an exact log of start times, no fixed buckets).
- ``max_concurrency = 3``: at most 3 calls in flight; a slot is leased, so a slot of a
  caller that died is freed when its lease runs out.
- ``token_limit = "100000/m"``: a call may start only while the tokens recorded
  (``record_tokens``) in the last window are below the limit.

Calls with the same key share one concurrency pool; rate and token logs are shared by
calls with the same key AND the same window length. This module is pure core (no Redis):
the in-process ``LocalLimiter`` serves local runs, ``pocoflow.distributed.limiter``
holds the Redis one that every worker shares.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pocoflow.logging import get_logger
from pocoflow.node import STILL_RUNNING

if TYPE_CHECKING:
    from pocoflow.node import Node

__all__ = [
    "Decision",
    "LimitGate",
    "LimitWait",
    "Limiter",
    "Limits",
    "LocalLimiter",
    "Rate",
    "Slot",
    "acquire",
    "current_limiter",
    "limit_key_of",
    "limits_of",
    "parse_rate",
    "record_tokens",
    "release",
    "use_limiter",
]

_log = get_logger("limits")

#: How long a caller refused for want of a concurrency slot waits before asking again
#: (nobody can know when a slot frees; a slot whose lease ends sooner shortens it).
CONCURRENCY_POLL_S = 0.2
#: A blocking gate (local runs, sub-flows) sleeps at most this long before it asks again,
#: so a cancelled run stops waiting within it even when its limit said "an hour".
WAIT_SLICE_S = 0.5

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([smh])\s*$")


@dataclass(frozen=True)
class Rate:
    """``count`` per ``window_s`` seconds, parsed from ``"10/s"``, ``"100/m"``, ``"5/2s"``."""

    count: int
    window_s: float

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window_s * 1000))


def parse_rate(text: str, what: str = "rate_limit") -> Rate:
    """Parse ``"N/s"``, ``"N/m"``, ``"N/h"`` or ``"N/<number><unit>"``; a bad text raises
    ``ValueError`` naming ``what`` and the accepted forms."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"{what} must look like '10/s', '100/m', '5/h' or '5/2s' (count per window), "
            f"got {text!r}"
        )
    count, length, unit = match.groups()
    window = (float(length) if length else 1.0) * _UNITS[unit]
    if int(count) < 1 or window <= 0:
        raise ValueError(f"{what} needs a count >= 1 and a window > 0, got {text!r}")
    return Rate(int(count), window)


@dataclass(frozen=True)
class Limits:
    """A node's parsed limits (None = that limit is off)."""

    rate: Rate | None = None
    concurrency: int | None = None
    tokens: Rate | None = None


_NO_LIMITS = (None, None, None)


def _raw_limits(node: Node) -> tuple[Any, Any, Any]:
    return (
        getattr(node, "rate_limit", None),
        getattr(node, "max_concurrency", None),
        getattr(node, "token_limit", None),
    )


def declares_limits(node: Node) -> bool:
    """Whether the node sets a limit, judged without parsing it (a bad value is the
    node's own gate's error to raise, when a call of it asks)."""
    return _raw_limits(node) != _NO_LIMITS


def limits_of(node: Node) -> Limits | None:
    """The node's limits, or None when it sets none (the common case, kept cheap: the
    parse is cached per distinct attribute values). A bad value raises ``ValueError``
    naming the node."""
    raw = _raw_limits(node)
    if raw == _NO_LIMITS:
        return None
    try:
        return _parse_limits(*raw)
    except ValueError as exc:
        raise ValueError(f"Node {node.name!r}: {exc}") from None


@functools.lru_cache(maxsize=256)
def _parse_limits(rate: Any, concurrency: Any, tokens: Any) -> Limits:
    if concurrency is not None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
    ):
        raise ValueError(f"max_concurrency must be an int >= 1, got {concurrency!r}")
    return Limits(
        rate=parse_rate(rate, "rate_limit") if rate is not None else None,
        concurrency=concurrency,
        tokens=parse_rate(tokens, "token_limit") if tokens is not None else None,
    )


def limit_key_of(node: Node, prep_result_or_item: Any, flow_name: str | None) -> str:
    """The key the node's limits are counted under: ``node.limit_key(...)``, or, when it
    returns an empty string (the default), one key per flow and node name."""
    key = node.limit_key(prep_result_or_item)
    if not isinstance(key, str):
        raise TypeError(f"Node {node.name!r}: limit_key() must return a str, got {key!r}")
    return key or f"{flow_name or ''}/{node.name}"


@dataclass(frozen=True)
class Slot:
    """A concurrency slot held under ``holder`` for ``key``; give it back with
    ``release(slot)``. ``limiter`` is who granted it (and renews it meanwhile)."""

    key: str
    holder: str
    limiter: Limiter = field(repr=False, compare=False)


@dataclass(frozen=True)
class Decision:
    """``wait_s == 0``: the call may start now (holding ``slot`` when the node has a
    ``max_concurrency``); otherwise ask again in ``wait_s`` seconds."""

    wait_s: float = 0.0
    slot: Slot | None = None

    @property
    def go(self) -> bool:
        return self.wait_s <= 0


class Limiter(Protocol):
    """Decides whether a call may start; each decision is atomic across its callers."""

    def acquire(
        self,
        limits: Limits,
        key: str,
        holder: str,
        waiter: str | None = None,
        run_id: str | None = None,
    ) -> Decision:
        """``holder`` names this call's slot (unique per call); ``waiter`` names who asks
        again after a refusal (a step, a map item: stable across its re-sends), so a
        limiter can spread the asks of many waiters; ``run_id``, the run it belongs to,
        so that a run that stops can leave every queue its waiters joined."""
        ...

    def release(self, slot: Slot) -> None: ...

    def record_tokens(self, window: Rate, key: str, tokens: int) -> None: ...


class LimitWait(Exception):
    """The call may not start yet: ask again in ``wait_s`` seconds. Raised only by a
    non-blocking gate (workers), so the step is sent again for later instead of holding
    a worker; never treated as a failure of ``exec`` (no retry is spent on it)."""

    def __init__(self, node_name: str, key: str, wait_s: float) -> None:
        super().__init__(f"node {node_name!r} is limited (key {key!r}): wait {wait_s:.3f}s")
        self.node_name = node_name
        self.key = key
        self.wait_s = wait_s


# ── the in-process backend ───────────────────────────────────────────────────


class LocalLimiter:
    """The limiter of local runs: one process, any number of threads (background runs,
    map items). The same rules as the Redis limiter, on the injectable ``clock``."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.clock = clock
        #: How a blocking gate waits with this limiter (a test's fake clock advances).
        self.sleep = sleep
        self._lock = threading.Lock()
        self._starts: dict[tuple[str, float], deque[float]] = {}
        self._tokens: dict[tuple[str, float], deque[tuple[float, int]]] = {}
        self._slots: dict[str, set[str]] = {}

    def acquire(
        self,
        limits: Limits,
        key: str,
        holder: str,
        waiter: str | None = None,
        run_id: str | None = None,
    ) -> Decision:
        # Local waiters are threads that sleep: their asks cost no ledger write, so the
        # poll is not spread by waiter here (and no queue is kept for a stop to clear).
        with self._lock:
            now = self.clock()
            wait = 0.0
            if limits.concurrency is not None:
                held = self._slots.get(key, set())
                if holder not in held and len(held) >= limits.concurrency:
                    wait = CONCURRENCY_POLL_S
            if limits.rate is not None:
                starts = self._log(self._starts, key, limits.rate, now)
                if len(starts) >= limits.rate.count:
                    wait = max(wait, starts[-limits.rate.count] + limits.rate.window_s - now)
            if limits.tokens is not None:
                wait = max(wait, self._token_wait(key, limits.tokens, now))
            if wait > 0:
                return Decision(wait_s=wait)
            if limits.rate is not None:
                self._starts[(key, limits.rate.window_s)].append(now)
            if limits.concurrency is None:
                return Decision()
            self._slots.setdefault(key, set()).add(holder)
            return Decision(slot=Slot(key, holder, self))

    def release(self, slot: Slot) -> None:
        with self._lock:
            self._slots.get(slot.key, set()).discard(slot.holder)

    def record_tokens(self, window: Rate, key: str, tokens: int) -> None:
        with self._lock:
            log = self._tokens.setdefault((key, window.window_s), deque())
            log.append((self.clock(), int(tokens)))

    def _log(self, logs: dict, key: str, rate: Rate, now: float) -> deque:
        log = logs.setdefault((key, rate.window_s), deque())
        while log and log[0] <= now - rate.window_s:
            log.popleft()
        return log

    def _token_wait(self, key: str, window: Rate, now: float) -> float:
        log = self._tokens.setdefault((key, window.window_s), deque())
        while log and log[0][0] <= now - window.window_s:
            log.popleft()
        total = sum(tokens for _, tokens in log)
        if total < window.count:
            return 0.0
        for at, tokens in log:  # oldest first: when enough have left the window
            total -= tokens
            if total < window.count:
                return at + window.window_s - now
        return 0.0  # pragma: no cover  (total reaches 0 < count)


# ── the process's limiter and the small API MapNode and usage call ──────────

_LOCAL: Limiter = LocalLimiter()
_limiter: Limiter = _LOCAL
#: Set by ``use_limiter``: then the process asks that one, whatever the environment says.
_chosen = False
#: (URL, limiter) of the shared limiter built from ``POCOFLOW_REDIS_URL`` (see below).
_shared: tuple[str, Limiter] | None = None
#: (limits, key) of the call in progress in this context: ``record_tokens`` defaults to it.
_current: contextvars.ContextVar[tuple[Limits, str] | None] = contextvars.ContextVar(
    "pocoflow_limit_call", default=None
)


def use_limiter(limiter: Limiter | None) -> Limiter | None:
    """Make ``limiter`` the one this process asks (workers install the Redis limiter at
    start-up); None goes back to the default (see ``current_limiter``). Returns the one
    installed before (None: the default), to hand back to ``use_limiter`` later."""
    global _limiter, _chosen
    previous = _limiter if _chosen else None
    _limiter, _chosen = (limiter, True) if limiter is not None else (_LOCAL, False)
    return previous


def current_limiter() -> Limiter:
    """The limiter this process asks: the one ``use_limiter`` installed (workers: their
    Redis limiter); else, when ``POCOFLOW_REDIS_URL`` names a Redis, a limiter on it, so
    a local run counts against the same windows and slots as the workers ("across every
    worker and process"); else the in-process one. Only a node with limits asks, so a
    process without limited nodes never connects."""
    global _shared
    if _chosen:
        return _limiter
    url = os.environ.get("POCOFLOW_REDIS_URL", "")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return _limiter
    if _shared is None or _shared[0] != url:
        from pocoflow.distributed.control import redis_client
        from pocoflow.distributed.limiter import RedisLimiter
        from pocoflow.settings import Settings

        lease_s = Settings.from_env().lease_seconds
        _shared = (url, RedisLimiter(redis_client(url), lease_s=lease_s))
    return _shared[1]


def new_holder() -> str:
    return secrets.token_hex(8)


def acquire(
    node: Node,
    key: str,
    *,
    waiter: str | None = None,
    run_id: str | None = None,
    limiter: Limiter | None = None,
) -> Decision:
    """One decision for one ``exec`` call of ``node`` under ``key`` (a map item's gate;
    ``waiter``: the item, e.g. ``f"{run_id}:{step}:{index}"``, of run ``run_id``). A node
    without limits always goes; ``release(decision.slot)`` after the call."""
    limits = limits_of(node)
    if limits is None:
        return Decision()
    return (limiter or current_limiter()).acquire(limits, key, new_holder(), waiter, run_id)


def release(slot: Slot | None) -> None:
    """Give a concurrency slot back (None: nothing to do)."""
    if slot is not None:
        slot.limiter.release(slot)


def record_tokens(
    node: Node, key: str | None, tokens: int, *, limiter: Limiter | None = None
) -> None:
    """Count ``tokens`` against the node's ``token_limit`` under ``key`` (None: the key of
    the call in progress). A node without a token limit records nothing."""
    limits = limits_of(node)
    if limits is None or limits.tokens is None or tokens <= 0:
        return
    if key is None:
        call = _current.get()
        if call is None:
            return
        key = call[1]
    (limiter or current_limiter()).record_tokens(limits.tokens, key, tokens)


@dataclass
class LimitGate:
    """What ``Node._exec_once`` passes each try through. ``blocking`` (local runs, and
    nodes inside a sub-flow) sleeps until the call may start; otherwise (a worker's step)
    a wait raises ``LimitWait`` and the executor sends the step again for later.
    ``limiter=None`` means no shared limiter is configured: a limited node then fails
    with an error naming the setting rather than run unlimited."""

    limiter: Limiter | None
    flow_name: str | None
    blocking: bool = True
    #: Runs whose calls this gate (or a sub-flow's gate made from it) saw refused: their
    #: waits may be queued in the limiter (a local run's end takes them out).
    refused_runs: set[str] = field(default_factory=set, compare=False, repr=False)

    def applies(self, node: Node) -> bool:
        """Whether ``node``'s exec tries pass through this gate. A node whose limits do
        not parse does: ``entered`` raises their ``ValueError`` inside the try, where it
        fails the step naming the node; raised before the step it would crash a worker's
        executor, and the sweeper would send the step again forever."""
        try:
            if (
                node.rate_limit is None
                and node.max_concurrency is None
                and node.token_limit is None
            ):
                return False  # every step of a local run asks: the common answer, cheaply
            return limits_of(node) is not None
        except ValueError:
            return True

    def waiting(self) -> LimitGate:
        return LimitGate(self.limiter, self.flow_name, True, self.refused_runs)

    def forget_refused(self, run_id: str) -> None:
        """``run_id`` ended: if one of its calls was refused here, take its waiters out
        of the limiter's queues (no round trip for a run that never waited)."""
        if run_id in self.refused_runs:
            self.refused_runs.discard(run_id)
            forget = getattr(self.limiter, "forget_run", None)
            if forget is not None:
                # Off the run's thread: a Redis that hangs must not hold wait() (or run()'s
                # return) for its socket timeout; the purge is best effort anyway.
                threading.Thread(
                    target=forget, args=(run_id,), name="pocoflow-forget-waits", daemon=True
                ).start()

    @contextmanager
    def entered(self, node: Node, prep_result: Any) -> Iterator[None]:
        call = self._call(node, prep_result)
        if call is None:
            yield
            return
        sleep = getattr(self.limiter, "sleep", time.sleep)
        while not (decision := self._ask(node, call)).go:
            sleep(min(decision.wait_s, WAIT_SLICE_S))
        with self._holding(node, call, decision):
            yield

    @asynccontextmanager
    async def entered_async(self, node: Node, item: Any) -> AsyncIterator[None]:
        """``entered`` for a call on an event loop (an async map item): a blocking gate
        waits with ``asyncio.sleep``, so the loop's other items go on meanwhile."""
        call = self._call(node, item)
        if call is None:
            yield
            return
        while not (decision := self._ask(node, call)).go:
            await asyncio.sleep(min(decision.wait_s, WAIT_SLICE_S))
        with self._holding(node, call, decision):
            yield

    def _call(self, node: Node, prep_result: Any) -> _Call | None:
        limits = limits_of(node)
        if limits is None:
            return None
        if self.limiter is None:
            raise RuntimeError(
                f"Node {node.name!r} has limits but this process has no shared limiter: "
                "set POCOFLOW_REDIS_URL (a redis:// URL) for the workers"
            )
        key = limit_key_of(node, prep_result, self.flow_name)
        return _Call(self.limiter, limits, key, new_holder(), _waiter(node), node.run_id)

    def _ask(self, node: Node, call: _Call) -> Decision:
        """One decision; a refusal raises ``LimitWait`` from a non-blocking gate, and
        ``RunCancelled`` once the run was cancelled (a blocking gate waits in slices of
        ``WAIT_SLICE_S``, so a cancel is seen within one however long the wait)."""
        decision = call.limiter.acquire(
            call.limits, call.key, call.holder, call.waiter, call.run_id
        )
        if decision.go:
            return decision
        if call.run_id is not None:
            self.refused_runs.add(call.run_id)
        if not self.blocking:
            raise LimitWait(node.name, call.key, decision.wait_s)
        if node.cancelled():
            from pocoflow.step import RunCancelled

            raise RunCancelled(f"run cancelled while node {node.name!r} waited for its limit")
        return decision

    @contextmanager
    def _holding(self, node: Node, call: _Call, decision: Decision) -> Iterator[None]:
        """The call runs under its key (``record_tokens``' default) and gives its slot
        back when it ends. An exec abandoned at its timeout still runs, so its slot is
        given back once it really returns (``max_concurrency`` counts it), or after one
        more timeout: a call hung for good must not stop the node for good."""
        token = _current.set((call.limits, call.key))
        slot = decision.slot
        try:
            yield
        except TimeoutError as late:
            running = getattr(late, STILL_RUNNING, None)
            if slot is not None and running is not None:
                _release_when(running, slot, node.exec_timeout() or 0.0)
                slot = None
            raise
        finally:
            _current.reset(token)
            release(slot)


def _waiter(node: Node) -> str | None:
    """Who asks again after a refusal: a step is ``run:step``, a map item
    ``run:step:index``. Each item is its own waiter, with its own turn: under one id the
    refused items of a map would all be told turn 0 and come back at once, each return a
    ledger write, a message and a claim (40 items for 1 slot asked 24 times each)."""
    if node.run_id is None:
        return None
    index = getattr(node, "item_index", None)  # a MapNode's, inside an item's exec
    if index is None:
        return f"{node.run_id}:{node.step}"
    return f"{node.run_id}:{node.step}:{index}"


@dataclass(frozen=True)
class _Call:
    """One exec try's ask: under ``key``, as ``holder`` (its slot), for ``waiter`` of
    ``run_id``."""

    limiter: Limiter
    limits: Limits
    key: str
    holder: str
    waiter: str | None
    run_id: str | None


def _release_when(ended: threading.Event, slot: Slot, within: float) -> None:
    """Give ``slot`` back once ``ended`` is set (the abandoned call returned), or after
    ``within`` seconds; meanwhile a Redis slot stays held and renewed, and a process that
    dies lets its lease free it."""

    def wait_then_release() -> None:
        if not ended.wait(within):
            _log.warning(
                "A call under limit key %r still runs %.1fs after its timeout: its "
                "concurrency slot is given back",
                slot.key,
                within,
            )
        release(slot)

    threading.Thread(target=wait_then_release, name="pocoflow-late-slot", daemon=True).start()
