"""Usage, cost and budgets: what ``Node.report_usage`` records and where it goes.

A report belongs to the attempt that made it, so the attempt is kept in a contextvar set
around each step (``recording``), never on the node: a MapNode runs one node instance's
``exec`` on many threads at once, and each item's reports must carry that item. Every
report goes to its attempt's *sink* the moment it is made (the ledger inserts one row per
report), so an attempt that fails, is retried, or whose worker is then killed keeps what
it billed.

Pure core: stdlib only. The ledger sink calls ``WorkflowDB.add_usage`` duck-typed.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from pocoflow.logging import get_logger

_log = get_logger("usage")

#: Env setting naming a JSON price file ``{"model": {"input": usd, "output": usd}}`` (per
#: token), so worker processes price reports the same way as the submitting process.
PRICES_ENV = "POCOFLOW_PRICES"
#: The ledger event recorded when a run pauses because it spent its budget.
BUDGET_EXCEEDED = "budget_exceeded"


@dataclass(frozen=True)
class UsageReport:
    """One ``report_usage`` call, with the attempt that made it."""

    run_id: str | None
    step: int | None
    attempt: int
    node_name: str
    item: int | None
    model: str | None
    input_tokens: int
    output_tokens: int
    #: Given by the caller, else priced from the table; None = unknown model, no cost.
    cost_usd: float | None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class UsageSink(Protocol):
    """Where an attempt's reports go (the ledger, or memory for a run without one)."""

    def add(self, report: UsageReport) -> None: ...

    def totals(self, run_id: str | None) -> tuple[int, float]:
        """(tokens, cost_usd) the run reported so far: what a budget is checked against."""
        ...


# ── prices ────────────────────────────────────────────────────────────────────

_prices: dict[str, tuple[float, float]] = {}
_file_prices: tuple[str, dict[str, tuple[float, float]]] | None = None
_prices_lock = threading.Lock()


def _price_pair(model: str, price: Any) -> tuple[float, float]:
    if isinstance(price, Mapping):
        pair = (price.get("input", 0.0), price.get("output", 0.0))
    elif isinstance(price, list | tuple) and len(price) == 2:
        pair = (price[0], price[1])
    else:
        raise ValueError(
            f"Price of model {model!r} must be {{'input': usd, 'output': usd}} per token, "
            f"got {price!r}"
        )
    for value in pair:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"Price of model {model!r}: {value!r} is not a price >= 0")
    return float(pair[0]), float(pair[1])


def set_prices(prices: Mapping[str, Any], *, replace: bool = False) -> None:
    """Price per token by model: ``{"gpt-x": {"input": 2.5e-6, "output": 1e-5}}``.

    Merged over the table (``replace=True`` starts afresh); takes precedence over the
    ``POCOFLOW_PRICES`` file. Set it in the module workers import (or use the file) so
    they price reports too: the cost is computed where ``report_usage`` runs.
    """
    parsed = {str(model): _price_pair(str(model), price) for model, price in prices.items()}
    with _prices_lock:
        if replace:
            _prices.clear()
        _prices.update(parsed)


def _prices_from_file() -> dict[str, tuple[float, float]]:
    global _file_prices
    path = os.environ.get(PRICES_ENV, "").strip()
    if not path:
        return {}
    cached = _file_prices
    if cached is not None and cached[0] == path:
        return cached[1]
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
        if not isinstance(raw, Mapping):
            raise ValueError("the price table must be a JSON object")
        parsed = {str(m): _price_pair(str(m), p) for m, p in raw.items()}
    except (OSError, ValueError) as exc:
        # Logged once, not raised: the call was made and billed, and its tokens must still
        # be recorded; only its cost stays unknown (NULL) until the file is fixed.
        _log.error(
            "%s=%r: cannot read the price table, costs stay unknown: %s", PRICES_ENV, path, exc
        )
        parsed = {}
    _file_prices = (path, parsed)
    return parsed


def price_of(model: str | None) -> tuple[float, float] | None:
    """(input, output) USD per token for ``model``, or None if nobody priced it."""
    if model is None:
        return None
    found = _prices.get(model)
    return found if found is not None else _prices_from_file().get(model)


#: Models reported without a price in this process, each warned about once.
_unpriced: set[str] = set()


def cost_of(model: str | None, input_tokens: int, output_tokens: int) -> float | None:
    price = price_of(model)
    if price is None:
        if model is not None and model not in _unpriced:
            # Its calls count $0: a run's max_cost_usd would never pause on them.
            _unpriced.add(model)
            _log.warning(
                "Model %r has no price: its calls are recorded with an unknown cost, which "
                "counts $0 in cost totals and max_cost_usd budgets; price it with "
                "pocoflow.set_prices(...) or the %s file (or pass cost_usd=)",
                model,
                PRICES_ENV,
            )
        return None
    return input_tokens * price[0] + output_tokens * price[1]


# ── the current attempt ───────────────────────────────────────────────────────


class Attempt(NamedTuple):
    """The attempt reports are recorded for, in this thread / task (``recording``). A
    tuple because one is made for every step: it must cost next to nothing."""

    run_id: str | None
    step: int | None
    attempt: int
    node_name: str
    item: int | None
    sink: UsageSink


_current: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "pocoflow_usage_attempt", default=None
)

#: Called with every report after it is recorded (the token limiter subscribes). Keep
#: listeners fast; one that raises is logged and skipped.
listeners: list[Callable[[UsageReport], None]] = []


def current() -> Attempt | None:
    """The attempt of this context, or None outside a step."""
    return _current.get()


def enter_step(
    run_id: str | None, step: int | None, attempt: int, node_name: str, sink: UsageSink | None
) -> tuple[Attempt | None, contextvars.Token[Attempt | None] | None]:
    """``recording`` of a whole step, without its object: every step enters one, and the
    class's calls cost a third of a node step's overhead. Returns (scope, token for
    ``_current.reset``); (None, None) when there is no sink, as ``recording``."""
    # ``_scope_of`` written out: a call fewer on every step (0.05 of the core ratio).
    if sink is None:
        outer = _current.get()
        if outer is None:
            return None, None
        sink = outer.sink
    scope = Attempt(run_id, step, attempt, node_name, None, sink)
    return scope, _current.set(scope)


def _scope_of(
    run_id: str | None,
    step: int | None,
    attempt: int,
    node_name: str,
    item: int | None,
    sink: UsageSink | None,
) -> Attempt | None:
    """The attempt to record under: with ``sink`` None, the enclosing attempt's sink, and
    None when there is none either."""
    if sink is None:
        outer = _current.get()
        if outer is None:
            return None
        sink = outer.sink
    return Attempt(run_id, step, attempt, node_name, item, sink)


def leave_step(token: contextvars.Token[Attempt | None] | None) -> None:
    if token is not None:
        _current.reset(token)


class recording:
    """Record this context's ``report_usage`` calls for the given attempt (and map item).

    ``sink`` None: the enclosing attempt's sink (a sub-flow's inner node, a map item);
    with neither, nothing is set and reports are dropped with a warning. Threads do not
    inherit contextvars: a thread running items enters its own ``recording`` (pass
    ``current().sink``) or runs under ``contextvars.copy_context()``. A class, not a
    generator, because every map item enters one (a step uses ``enter_step``).
    """

    __slots__ = ("_token", "scope")

    def __init__(
        self,
        run_id: str | None,
        step: int | None,
        attempt: int,
        node_name: str,
        item: int | None = None,
        sink: UsageSink | None = None,
    ) -> None:
        self._token: contextvars.Token[Attempt | None] | None = None
        self.scope = _scope_of(run_id, step, attempt, node_name, item, sink)

    def __enter__(self) -> Attempt | None:
        if self.scope is not None:
            self._token = _current.set(self.scope)
        return self.scope

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


def for_item(node: Any, index: int) -> recording:
    """The ``recording`` of map item ``index`` of the step ``node`` is running, usable on
    any thread (a pool thread has no contextvar: the node's running step is found through
    it). What a MapNode wraps around each item's ``exec``: ``with for_item(self, i): ...``.
    Outside a step it records nothing."""
    outer = _current.get() or getattr(node, "_usage_scope", None)
    if outer is None:
        return recording(None, None, 1, node.name)
    return recording(outer.run_id, outer.step, outer.attempt, node.name, index, outer.sink)


def _count(name: str, value: Any, node: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"Node {node!r}: report_usage({name}=...) needs an int >= 0, got {value!r}"
        )
    return value


def report(
    node_name: str,
    *,
    model: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cost_usd: float | None = None,
    fallback: Attempt | None = None,
) -> UsageReport:
    """Record one LLM call for the current attempt (``Node.report_usage``).

    ``fallback``: the attempt to use when this context has none, e.g. a thread that
    ``exec`` started itself (threads do not inherit contextvars): the step that node is
    running, without a map item's index."""
    input_tokens = _count("input_tokens", input_tokens, node_name)
    output_tokens = _count("output_tokens", output_tokens, node_name)
    if cost_usd is not None:
        if (
            isinstance(cost_usd, bool)
            or not isinstance(cost_usd, int | float)
            or not math.isfinite(cost_usd)
            or cost_usd < 0
        ):
            raise ValueError(
                f"Node {node_name!r}: report_usage(cost_usd=...) needs a number >= 0, "
                f"got {cost_usd!r}"
            )
        cost_usd = float(cost_usd)
    else:
        cost_usd = cost_of(model, input_tokens, output_tokens)
    scope = _current.get() or fallback
    entry = UsageReport(
        run_id=scope.run_id if scope else None,
        step=scope.step if scope else None,
        attempt=scope.attempt if scope else 1,
        node_name=scope.node_name if scope else node_name,
        item=scope.item if scope else None,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=cost_usd,
    )
    if scope is None:
        _log.warning("Node %r reported usage outside a run step; it is not recorded", node_name)
    else:
        scope.sink.add(entry)
    for listener in list(listeners):
        try:
            listener(entry)
        except Exception as exc:  # a listener must never break the exec that reported
            _log.warning("Usage listener %r raised %s: %s", listener, type(exc).__name__, exc)
    return entry


# ── totals ────────────────────────────────────────────────────────────────────


def empty_totals() -> dict[str, Any]:
    return {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-node rows ``{node_name, calls, input_tokens, output_tokens, cost_usd}`` -> the
    ``RunHandle.usage()`` dict: totals plus ``by_node``. An unknown cost counts as 0."""
    total = empty_totals()
    by_node: dict[str, dict[str, Any]] = {}
    for row in rows:
        node = by_node.setdefault(row["node_name"], empty_totals())
        for part in (node, total):
            part["calls"] += int(row["calls"] or 0)
            part["input_tokens"] += int(row["input_tokens"] or 0)
            part["output_tokens"] += int(row["output_tokens"] or 0)
            part["cost_usd"] += float(row["cost_usd"] or 0.0)
    return {**total, "by_node": by_node}


class MemorySink:
    """Reports of a run without a ledger, kept on the run (thread-safe: map items)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reports: list[UsageReport] = []

    def add(self, report: UsageReport) -> None:
        with self._lock:
            self.reports.append(report)

    def totals(self, run_id: str | None = None) -> tuple[int, float]:
        with self._lock:
            reports = list(self.reports)
        return sum(r.tokens for r in reports), sum(r.cost_usd or 0.0 for r in reports)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            reports = list(self.reports)
        return summarize(
            [
                {
                    "node_name": r.node_name,
                    "calls": 1,
                    "input_tokens": r.input_tokens,
                    "output_tokens": r.output_tokens,
                    "cost_usd": r.cost_usd,
                }
                for r in reports
            ]
        )


class LedgerSink:
    """One ledger row per report, written as it is made: an LLM call takes seconds, an
    insert milliseconds, and a row written before a crash is a call that was billed."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def add(self, report: UsageReport) -> None:
        self.db.add_usage(report)

    def totals(self, run_id: str | None) -> tuple[int, float]:
        assert run_id is not None
        return self.db.usage_totals(run_id)


# ── budgets ───────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Budget:
    """A run's spending limit; None = no limit on that measure."""

    max_tokens: int | None = None
    max_cost_usd: float | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, int)
            or self.max_tokens < 0
        ):
            raise ValueError(f"max_tokens must be an int >= 0 or None, got {self.max_tokens!r}")
        if self.max_cost_usd is not None and (
            isinstance(self.max_cost_usd, bool)
            or not isinstance(self.max_cost_usd, int | float)
            or self.max_cost_usd < 0
        ):
            raise ValueError(
                f"max_cost_usd must be a number >= 0 or None, got {self.max_cost_usd!r}"
            )

    @property
    def limited(self) -> bool:
        return self.max_tokens is not None or self.max_cost_usd is not None

    def raised(self, max_tokens: int | None, max_cost_usd: float | None) -> Budget:
        """This budget with the limits given replaced (None keeps the current one)."""
        return Budget(
            self.max_tokens if max_tokens is None else max_tokens,
            self.max_cost_usd if max_cost_usd is None else max_cost_usd,
        )

    def exceeded(self, tokens: int, cost_usd: float) -> str | None:
        """Why a run that spent this much must pause, or None while within the budget
        (the run pauses once it has spent *more* than a limit)."""
        if self.max_tokens is not None and tokens > self.max_tokens:
            return f"used {tokens} tokens, over its budget of max_tokens={self.max_tokens}"
        if self.max_cost_usd is not None and cost_usd > self.max_cost_usd:
            return f"spent ${cost_usd:.6g}, over its budget of max_cost_usd={self.max_cost_usd:g}"
        return None


def budget_message(run_id: str, reason: str, step: int) -> str:
    return (
        f"Run {run_id!r} paused before step {step}: it {reason}. Resume it with a higher "
        f"budget: `pocoflow resume {run_id} --max-tokens N --max-cost-usd X` or "
        "handle.resume(max_tokens=..., max_cost_usd=...)"
    )
