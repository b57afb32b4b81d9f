"""Node: the nano-ETL unit of every pipeline step.

    prep(store)               read what the node needs
    exec(prep_result)         do the work (an LLM call): pure, so it can be retried
    post(store, prep, result) write back and return the action that picks the successor

Retries wrap ``exec`` only (one seam, ``_exec``), as in PocketFlow: prep and post run once.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pocoflow.backoff import retry_delay
from pocoflow.logging import get_logger
from pocoflow.waiting import SignalReader, WaitingFor, check_key, check_timeout

if TYPE_CHECKING:
    from pocoflow.limits import LimitGate

_log = get_logger("node")

DEFAULT_ACTION = "default"
WILDCARD_ACTION = "*"
#: The ``timeout`` of every node that sets none (seconds; unset or empty = no limit).
STEP_TIMEOUT_ENV = "POCOFLOW_STEP_TIMEOUT"


class Node:
    """Base class for synchronous nodes; override ``exec`` (and usually prep/post).

    Retry settings are class attributes so a subclass states its policy once:
    ``max_retries`` tries in all (1 = no retry), waiting ``retry_delay`` seconds,
    multiplied by ``backoff_factor`` after each failure (capped at ``max_retry_delay``,
    minus up to ``retry_jitter`` of it at random). Only exceptions in ``retry_on`` are
    retried; when tries run out (or the error is not retryable) ``exec_fallback`` decides:
    by default it re-raises.

    While a step runs, the executor sets ``run_id``, ``step`` and ``attempt`` (1 on the
    first delivery, higher after a crash or retry) so side effects can be made idempotent.

    ``params`` is the parameter dict of the ``BatchFlow`` pass the node runs in (empty
    outside a batch). A pass runs a shallow copy of each node with its own ``params``, so
    passes that run side by side never see each other's.
    """

    max_retries: int = 1
    retry_delay: float = 0.0
    backoff_factor: float = 1.0
    max_retry_delay: float = 300.0
    retry_jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    #: Seconds one ``exec`` try may take; past it the try fails with ``TimeoutError`` and
    #: the retry policy decides (None = ``POCOFLOW_STEP_TIMEOUT``, unset = no limit).
    timeout: float | None = None
    #: Limits shared by every caller of this node (``pocoflow.limits``): ``"10/s"``
    #: (``/m``, ``/h``) exec starts per sliding window, calls in flight, and tokens
    #: recorded per window; all None = unlimited.
    rate_limit: str | None = None
    max_concurrency: int | None = None
    token_limit: str | None = None
    #: Routes this node's steps to workers started with ``--queues <queue>`` (None: the
    #: run's queue).
    queue: str | None = None

    run_id: str | None = None
    step: int | None = None
    attempt: int = 1
    #: Read-only and empty by default; a BatchFlow pass sets it on its copy of the node.
    params: Mapping[str, Any] = MappingProxyType({})
    _is_flow = False
    #: A step whose node may run map items (a MapNode, a sub-flow): the local loop hands
    #: it the between-items pause gate and, where ``_keeps_items``, its item log.
    _runs_items = False
    #: A step whose finished items a local run with a ledger keeps (``itemlog``), so a
    #: resume runs only the others: a MapNode, a parallel BatchFlow (its passes).
    _keeps_items = False
    #: True on the copy of a node that runs inside a BatchFlow pass (see ``Flow._run``).
    _in_pass = False
    #: The step attempt this node runs, for ``report_usage`` from threads ``exec`` starts
    #: itself (they do not inherit the contextvar that normally says it).
    _usage_scope: Any = None
    #: Reads the run's signals for ``wait_for``; set by the executor (None: no ledger).
    _signals: SignalReader | None = None
    #: Set by ``run_step`` for a node with limits: every exec try passes through it.
    _limit_gate: LimitGate | None = None

    def __init__(self, *, name: str | None = None) -> None:
        self._successors: dict[str, Node] = {}
        self.name = name or type(self).__name__
        self._cancel_probe: Callable[[], bool] | None = None

    def __getattr__(self, attr: str) -> Any:
        # Subclasses written for 0.2 sometimes skip super().__init__(); give them the
        # defaults instead of an AttributeError deep inside the run loop.
        if attr == "_successors":
            self._successors = {}
            return self._successors
        if attr == "name":
            return type(self).__name__
        if attr == "_cancel_probe":
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    # ── wiring ────────────────────────────────────────────────────────────────

    def then(self, action: str, node: Node) -> Node:
        """Wire ``node`` as the successor for ``action`` (``"*"`` matches any). Returns self."""
        if not isinstance(action, str):
            raise TypeError(
                f"Node {self.name!r}: action must be a str, got {type(action).__name__}"
            )
        if not isinstance(node, Node):
            raise TypeError(
                f"Node {self.name!r}: successor for {action!r} must be a Node, "
                f"got {type(node).__name__}"
            )
        if action in self._successors:
            _log.warning("Node %r: overwriting existing edge for action %r", self.name, action)
        self._successors[action] = node
        return self

    def next_node(self, action: str | None) -> Node | None:
        """The successor for ``action``, the wildcard's, or None (the flow ends here).

        A ``post`` that returns None follows only the wildcard edge, as in 0.2.
        """
        successors = self._successors
        node = successors.get(action)  # type: ignore[arg-type]  # None matches no edge, as in 0.2
        if node is None:
            node = successors.get(WILDCARD_ACTION)
            if node is None and successors:
                _log.info(
                    "Node %r: action %r has no successor, the flow ends here (edges: %s)",
                    self.name,
                    action,
                    ", ".join(successors),
                )
        return node

    @property
    def successors(self) -> dict[str, Node]:
        return dict(self._successors)

    # ── lifecycle: override these ─────────────────────────────────────────────

    def prep(self, store: Any) -> Any:
        return None

    def exec(self, prep_result: Any) -> Any:
        return None

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str | None:
        return DEFAULT_ACTION

    def exec_fallback(self, prep_result: Any, exc: BaseException) -> Any:
        """Called when ``exec`` failed for good; return a result or raise (the default)."""
        raise exc

    def report_usage(
        self,
        *,
        model: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost_usd: float | None = None,
    ) -> Any:
        """Record what one LLM call used, from inside ``exec``: kept for the attempt
        running now (failed and retried attempts too: they were billed), written at once.
        ``cost_usd`` wins over the price table (``pocoflow.usage.set_prices``); an
        unpriced model without a cost records ``cost_usd=None``. Returns the report."""
        from pocoflow.usage import report

        entry = report(
            self.name,
            model=model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=cost_usd,
            fallback=getattr(self, "_usage_scope", None),
        )
        if self.token_limit is not None:  # the tokens count against the window at once
            from pocoflow.limits import record_tokens

            record_tokens(self, None, entry.tokens)
        return entry

    def limit_key(self, prep_result_or_item: Any) -> str:
        """The resource this call's limits count against (a tenant, an API key): calls
        under one key share the limits, across nodes and flows. The default, ``""``,
        means one key per flow and node name."""
        return ""

    def cancelled(self) -> bool:
        """True once the run was cancelled: a long ``exec`` may poll this to stop early."""
        probe = self._cancel_probe
        return bool(probe and probe())

    def wait_for(self, key: str, timeout: float | None = None) -> Any:
        """The value sent to this run for ``key`` (``RunHandle.send``, ``pocoflow send``).

        Until one is sent, the step stops here uncommitted and the run shows ``waiting``,
        holding no worker; once it arrives the node runs again from ``prep`` (on any
        worker, or in ``flow.resume`` for a local run), and this call returns it. Call it
        before side effects that must not happen twice. ``timeout`` (seconds, counted
        from the first wait) makes it raise ``TimeoutError`` once no value came in time:
        a distributed run is woken for that by the sweeper; the error then follows the
        node's retry and ``exec_fallback`` policy if raised in ``exec``. Needs a ledger
        (``Flow(db_path=...)`` or ``submit``). In a MapNode's ``post``, the items that
        finished before the wait are kept: when the node runs again they do not run
        ``exec`` again (locally and on workers alike).
        """
        key = check_key(key)
        timeout = check_timeout(timeout)
        reader = self._signals
        if reader is None:
            raise RuntimeError(
                f"Node {self.name!r}: wait_for({key!r}) needs a run recorded in a ledger, "
                "where the value can be sent: create the Flow with db_path=... or submit it"
            )
        signal = reader(key)
        if signal.sent:
            return signal.value
        if signal.expired:
            raise TimeoutError(
                f"Node {self.name!r} (run {self.run_id}): no value was sent for {key!r} "
                "before its wait timed out"
            )
        raise WaitingFor(self.name, key, timeout)

    # ── the retry seam ────────────────────────────────────────────────────────

    def exec_timeout(self) -> float | None:
        """This node's ``timeout``, else ``POCOFLOW_STEP_TIMEOUT``, else None (no limit)."""
        limit = self.timeout
        return default_step_timeout() if limit is None else limit

    def _exec_once(self, prep_result: Any) -> Any:
        """One ``exec`` try, bounded by ``exec_timeout()`` (see ``call_with_timeout``),
        started only when the node's limits allow it (the gate waits or raises
        ``LimitWait``; the slot is given back when the try ends)."""
        gate = self._limit_gate
        if gate is not None:
            with gate.entered(self, prep_result):
                return self._exec_bounded(prep_result)
        # The common case inline (no gate, no timeout set): a call less per node step.
        if self.timeout is None and _ENV_DATA is not None and _ENV_KEY not in _ENV_DATA:
            return self.exec(prep_result)
        return self._exec_bounded(prep_result)

    def _exec_bounded(self, prep_result: Any) -> Any:
        limit = self.timeout
        if limit is None:
            if _ENV_DATA is not None and _ENV_KEY not in _ENV_DATA:  # the common case
                return self.exec(prep_result)
            limit = default_step_timeout()
            if limit is None:
                return self.exec(prep_result)
        return call_with_timeout(self.exec, prep_result, limit, f"Node {self.name!r} exec")

    def is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on)

    def delay_after(self, failed_tries: int) -> float:
        return retry_delay(
            failed_tries,
            base=self.retry_delay,
            factor=self.backoff_factor,
            maximum=self.max_retry_delay,
            jitter=self.retry_jitter,
        )

    def _exec(self, prep_result: Any) -> Any:
        """Run ``exec`` with this node's retry policy, sleeping between tries.

        Used by in-process runs; the Celery executor calls ``exec`` once per task and lets
        Celery schedule the retry instead, so no worker sleeps.
        """
        tries = self.max_retries
        if tries <= 1:  # the common case, kept lean: it runs once per node step
            try:
                return self._exec_once(prep_result)
            except Exception as exc:
                return self.exec_fallback(prep_result, exc)
        for failed in range(1, tries + 1):
            try:
                return self._exec_once(prep_result)
            except Exception as exc:
                if failed >= tries or not self.is_retryable(exc):
                    if tries > 1:
                        _log.error("Node %r exec failed after %d tries: %s", self.name, failed, exc)
                    return self.exec_fallback(prep_result, exc)
                delay = self.delay_after(failed)
                _log.warning(
                    "Node %r exec try %d/%d failed: %s; retrying in %.2fs",
                    self.name,
                    failed,
                    tries,
                    exc,
                    delay,
                )
                if delay > 0:
                    time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _run(self, store: Any) -> str | None:
        """prep -> exec (with retries) -> post; returns the action (0.2 internal API)."""
        prep_result = self.prep(store)
        exec_result = self._exec(prep_result)
        return self.post(store, prep_result, exec_result)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class AsyncNode(Node):
    """A node whose work is a coroutine: implement ``async exec_async(prep_result)``.

    The framework drives it on its own event loop, so flows stay synchronous to call; use
    ``asyncio.gather`` inside ``exec_async`` for parallel sub-calls.
    """

    async def exec_async(self, prep_result: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement exec_async()")

    def exec(self, prep_result: Any) -> Any:
        return run_coroutine(self.exec_async(prep_result))


# Because every exec reads the setting and ``os.environ.get`` of an unset variable costs
# a raised KeyError (about a microsecond, ten times the rest of the check): the mapping
# behind ``os.environ`` (kept in step by every ``os.environ[...] = ...``) is read
# directly where the platform has one.
_ENV_DATA: dict[Any, Any] | None = getattr(os.environ, "_data", None)
_ENV_KEY: Any = os.environ.encodekey(STEP_TIMEOUT_ENV) if _ENV_DATA is not None else None  # type: ignore[attr-defined]
_parsed: tuple[Any, float | None] = (None, None)


def default_step_timeout(env: Any = None) -> float | None:
    """``POCOFLOW_STEP_TIMEOUT`` in seconds, or None when unset or empty. Read at each
    ``exec``, so a worker and a test see the environment they run in."""
    global _parsed
    if env is None and _ENV_DATA is not None:
        raw = _ENV_DATA.get(_ENV_KEY)
        if raw is None:
            return None
        if raw == _parsed[0]:
            return _parsed[1]
        value = _parse_timeout(os.environ.decodevalue(raw))  # type: ignore[attr-defined]
        _parsed = (raw, value)
        return value
    return _parse_timeout((os.environ if env is None else env).get(STEP_TIMEOUT_ENV, ""))


def _parse_timeout(raw: str) -> float | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STEP_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{STEP_TIMEOUT_ENV} must be > 0 seconds, got {raw!r}")
    return value


#: Set on the ``TimeoutError`` of an abandoned exec try: a ``threading.Event`` set once
#: the call really returns. Until then it is still in flight, so what it holds (its
#: ``max_concurrency`` slot) stays held. (An attribute, not a subclass: the error keeps
#: the name ``TimeoutError`` that events and users read.)
STILL_RUNNING = "pocoflow_still_running"


def call_with_timeout(fn: Callable[[Any], Any], arg: Any, limit: float, what: str) -> Any:
    """``fn(arg)`` on a helper thread; past ``limit`` seconds raise ``TimeoutError``
    (carrying ``STILL_RUNNING``).

    Why a thread that is abandoned, rather than killing the work: Python cannot stop a
    thread, and a signal (``SIGALRM``) only reaches the main thread and cannot break a
    blocking C call either. So the caller stops waiting: the try fails with
    ``TimeoutError`` at once and the retry policy takes over, while the hung call runs on
    in a daemon thread whose result is dropped, never returned, so a late result is
    never committed (G1; on workers the attempt that ran it is ended too, and a later
    commit under it would be refused by fencing). What the abandoned call still does
    (a late side effect) is the same as any at-least-once ``exec``: make it idempotent
    with ``run_id``/``step``/``attempt``. A process left with many hung threads is best
    recycled; on workers Celery's ``--max-tasks-per-child`` does that. Only nodes with a
    timeout pay for the thread (about 0.1 ms).
    """
    box: list[tuple[bool, Any]] = []
    done = threading.Event()

    def target() -> None:
        try:
            box.append((True, fn(arg)))
        except BaseException as exc:  # handed to the waiting caller
            box.append((False, exc))
        done.set()

    # The caller's context (the usage attempt of ``report_usage``, the limit key
    # ``record_tokens`` reads) goes with the call.
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(target,), name="pocoflow-exec", daemon=True)
    thread.start()
    if not done.wait(limit):
        late = TimeoutError(f"{what} took longer than its timeout of {limit:g}s; abandoned")
        setattr(late, STILL_RUNNING, done)
        raise late
    ok, value = box[0]
    if ok:
        return value
    raise value


def run_coroutine(coro: Any) -> Any:
    """Run ``coro`` to completion, also when the caller already sits in an event loop
    (a notebook, an async web handler): then it runs on a helper thread's own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, asyncio.run(coro)))
        except BaseException as exc:
            box.append((False, exc))

    context = contextvars.copy_context()  # asyncio.run copies it into its task
    thread = threading.Thread(target=context.run, args=(target,), name="pocoflow-async-exec")
    thread.start()
    thread.join()
    ok, value = box[0]
    if ok:
        return value
    raise value
