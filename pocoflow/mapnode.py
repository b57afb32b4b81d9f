"""MapNode: one node step that fans ``exec`` out over a list of items.

    prep(store)                   -> items (a list)
    exec(item)                    once per item, concurrently, each with the retry policy
    post(store, items, results)   results in item order

Why a node kind and not a loop inside ``exec``: each item is its own unit of retry (and,
on workers, its own task with its own ledger row), so a failure or a crash re-runs only
that item, and the items of one step spread over every worker. This module is the pure
core: in-process concurrency (threads, or one event loop for an async ``exec``); the
distributed executor fans the same items out as tasks.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from pocoflow import itemlog, pausing, usage
from pocoflow.limits import LimitWait
from pocoflow.node import AsyncNode, Node, run_coroutine
from pocoflow.step import RunCancelled

if TYPE_CHECKING:
    from pocoflow.itemlog import ItemLog
    from pocoflow.pausing import ItemGate

#: ``on_item_error`` values: fail the node naming the item, or hand the exception to post.
ITEM_ERROR_POLICIES = ("raise", "collect")


#: The map item whose ``exec`` runs in this thread or task: ``(node, index)``. A context
#: variable, not a node attribute, because one node instance runs many items at once (the
#: threads of a local map, the tasks of an async one), each of which reads its own.
_current_item: ContextVar[tuple[Any, int] | None] = ContextVar("pocoflow_map_item", default=None)


@contextmanager
def running_item(node: MapNode, index: int) -> Iterator[None]:
    """``node.item_index`` reads ``index`` inside this block, on this thread or task (and
    on the threads it hands its context to: a timed exec's, an async exec's loop)."""
    token = _current_item.set((node, index))
    try:
        yield
    finally:
        _current_item.reset(token)


class ItemFailed(Exception):
    """An item's ``exec`` failed for good (its tries spent): the node fails naming it."""

    def __init__(
        self, node_name: str, index: int, cause: BaseException, message: str | None = None
    ) -> None:
        super().__init__(
            message
            or f"MapNode {node_name!r}: item {index} failed: {type(cause).__name__}: {cause}"
        )
        self.node_name = node_name
        self.index = index
        self.cause = cause


class ItemError(Exception):
    """An item's exception that crossed a process boundary (a worker collected it and
    the join runs elsewhere) and whose type is not a built-in: ``type_name`` keeps the
    original type's name, ``str()`` its message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(message)
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"ItemError({self.type_name}: {self.args[0]!r})"


def error_record(exc: BaseException) -> dict[str, Any]:
    """What the ledger keeps of an item's exception: its type name and message, and its
    constructor arguments when they are plain JSON (so a built-in comes back as a local
    run hands it to ``post``: a KeyError's key, an OSError's errno and filename)."""
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    args = list(exc.args)
    if isinstance(exc, OSError) and len(args) == 2 and exc.filename is not None:
        # OSError(errno, strerror, filename, winerror, filename2): args keep only two.
        args += [exc.filename, None, exc.filename2] if exc.filename2 is not None else [exc.filename]
    try:
        if json.loads(json.dumps(args)) == args:
            record["args"] = args
    except (TypeError, ValueError):
        pass  # not plain JSON: the message stands for them
    return record


def revive_error(record: dict[str, Any]) -> Exception:
    """The exception ``error_record`` described: the built-in type again when it is one
    (``ValueError("bad")``), else an ``ItemError`` naming the type. Never imports."""
    import builtins

    cls = getattr(builtins, str(record.get("type")), None)
    message = str(record.get("message", ""))
    if isinstance(cls, type) and issubclass(cls, Exception):
        args = record.get("args")
        for given in ([args] if isinstance(args, list) else []) + [[message]]:
            try:
                return cls(*given)
            except Exception:  # a built-in with another signature (UnicodeDecodeError)
                continue
    return ItemError(str(record.get("type")), message)


class MapNode(Node):
    """Fan-out: ``prep`` returns the items, ``exec(item)`` runs once per item, ``post``
    gets ``(store, items, results)`` with the results in item order.

    ``max_parallel`` items run at once in this process (threads; an ``AsyncNode`` map
    runs its ``exec_async`` calls on one event loop instead). A failing item follows the
    node's retry policy (``max_retries``, ``retry_delay``, ``timeout``...); when its tries
    are spent the node fails with ``ItemFailed`` naming the item index, or, with
    ``on_item_error = "collect"``, the exception takes the item's place in ``results``.
    A cancel stops the map between items: items not started never start (G4). A pause
    of a local run stops it there too: no item starts after it, the running ones end
    (and are kept, with a ledger), and the run holds, ``paused``, until it is resumed
    (then the items not started run) or cancelled (see ``pocoflow.pausing``).
    """

    max_parallel: int = 8
    _runs_items = True
    _keeps_items = True
    on_item_error: str = "raise"

    @property
    def item_index(self) -> int | None:
        """The position, in ``prep``'s list, of the item whose ``exec`` (or
        ``exec_fallback``) is running in this thread or task; None outside one (``prep``,
        ``post``). Items run at once on threads of one node instance, so each reads its
        own. With ``run_id`` and ``step`` it makes the idempotency key of an item's side
        effect, the same on every try: ``f"{self.run_id}/{self.step}/{self.item_index}"``;
        ``attempt`` (on workers the item's own, higher after its retry or crash) tells the
        tries apart, for tracing, not for deduplication."""
        current = _current_item.get()
        return current[1] if current is not None and current[0] is self else None

    @item_index.setter
    def item_index(self, value: Any) -> None:
        raise AttributeError(
            f"MapNode {self.name!r}: item_index is set by PocoFlow for each item's exec "
            f"(its position in prep's list) and cannot be assigned (got {value!r}); keep "
            "a value of your own under another name"
        )

    # ── what executors call ───────────────────────────────────────────────────

    def items_of(self, prep_result: Any) -> list[Any]:
        """``prep``'s result as the list of items, or a ``TypeError`` naming the node."""
        if isinstance(prep_result, list | tuple):
            return list(prep_result)
        raise TypeError(
            f"MapNode {self.name!r}: prep() must return a list of items, "
            f"got {type(prep_result).__name__}"
        )

    def check_policy(self) -> None:
        if self.on_item_error not in ITEM_ERROR_POLICIES:
            raise ValueError(
                f"MapNode {self.name!r}: on_item_error must be one of "
                f"{', '.join(ITEM_ERROR_POLICIES)}, got {self.on_item_error!r}"
            )
        if not isinstance(self.max_parallel, int) or self.max_parallel < 1:
            raise ValueError(
                f"MapNode {self.name!r}: max_parallel must be a positive int, "
                f"got {self.max_parallel!r}"
            )

    def item_outcome(self, index: int, exc: BaseException) -> BaseException:
        """What an item whose tries are spent leaves: its exception in ``results``
        (``collect``), else ``ItemFailed`` raised to fail the node."""
        if self.on_item_error == "collect":
            return exc
        raise ItemFailed(self.name, index, exc) from exc

    # ── in-process run ────────────────────────────────────────────────────────

    def _run(self, store: Any) -> str | None:
        self.check_policy()
        items = self.items_of(self.prep(store))
        return self.post(store, items, self.map_items(items))

    def map_items(self, items: Sequence[Any]) -> list[Any]:
        """Every item's result (or collected exception), in item order. With an item log,
        items it kept from an earlier attempt of the step do not run again."""
        log = itemlog.take(self._log_owner())  # this step's, set by a local run with a ledger
        scope = self._log_scope() if log is not None else None
        if log is None or scope is None:
            return self._map(items, None)
        log.open(items, scope)
        try:
            return self._map(items, log)
        finally:
            log.close()  # what finished is kept, also when the map fails

    def _log_owner(self) -> Node:
        """The step's node whose item log this map's items go to: itself, unless it runs
        another node's items (a parallel BatchFlow's passes)."""
        return self

    def _log_scope(self) -> str | None:
        """What, besides its item, a kept result depends on (``ItemLog.open``): nothing
        for a MapNode, whose ``exec`` sees only its item. None: keep nothing this step."""
        return ""

    def _map(self, items: Sequence[Any], log: ItemLog | None) -> list[Any]:
        between = pausing.CURRENT.get()  # a local run's pause between items (None: none)
        if isinstance(self, AsyncNode):
            return run_coroutine(self._map_async(items, log, between))
        return _map_threads(self, items, self.max_parallel, self.cancelled, log, between)

    def run_item(self, index: int, item: Any) -> Any:
        """One item: ``exec`` under the retry policy; a spent item per ``on_item_error``."""
        try:
            with usage.for_item(self, index), running_item(self, index):
                return self._exec(item)  # report_usage and item_index name the item
        except Exception as exc:
            return self.item_outcome(index, exc)

    async def _map_async(
        self, items: Sequence[Any], log: ItemLog | None, between: ItemGate | None
    ) -> list[Any]:
        assert isinstance(self, AsyncNode)
        gate = asyncio.Semaphore(self.max_parallel)
        node = self
        kept = log.kept if log is not None else {}
        stop: list[BaseException] = []  # as threads: the first fatal failure stops new starts
        active = 0  # items whose exec runs now
        idle = asyncio.Event()  # set while none does
        idle.set()
        holding: asyncio.Event | None = None  # while the run is held: set when it goes on

        async def paused_before(index: int) -> None:
            """A pause met before item ``index`` starts: no item starts until the running
            ones ended and the run, held meanwhile off the loop, goes on (or stops)."""
            nonlocal holding
            while holding is not None:  # another item met it: wait with it
                await holding.wait()
            if stop or between is None or not between.requested():
                return
            holding = asyncio.Event()  # before any await: no item starts from here on
            try:
                while active:
                    await idle.wait()
                if not stop:
                    await asyncio.to_thread(_hold, between, log, node, index)
            except Exception as exc:  # RunCancelled: the run was cancelled while held
                stop.append(exc)
            finally:
                holding.set()
                holding = None

        async def one(index: int, item: Any) -> Any:
            nonlocal active
            if index in kept:
                return kept[index]
            async with gate:
                if between is not None:
                    await paused_before(index)
                if stop:
                    return None
                if node.cancelled():
                    stop.append(
                        RunCancelled(f"MapNode {node.name!r} cancelled before item {index}")
                    )
                    return None
                active += 1  # no await since the checks: a pause met later waits for it
                idle.clear()
                try:
                    with usage.for_item(node, index), running_item(node, index):
                        result = await _exec_async_with_retries(node, item)
                except Exception as exc:
                    try:
                        return node.item_outcome(index, exc)
                    except Exception as fatal:  # the running items end, and are kept
                        stop.append(fatal)
                        return None
                finally:
                    active -= 1
                    if not active:
                        idle.set()
                if log is not None:
                    log.keep(index, result)
                return result

        results = list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))
        if stop:
            raise stop[0]
        return results


def _map_threads(
    node: MapNode,
    items: Sequence[Any],
    parallel: int,
    cancelled: Callable[[], bool],
    log: ItemLog | None,
    between: ItemGate | None,
) -> list[Any]:
    """Items on up to ``parallel`` threads, started in order, each only if the run was not
    cancelled meanwhile; the first item to fail for good stops new starts and is raised
    once the running ones end (so no thread outlives the step). Items ``log`` kept from
    an earlier attempt do not run; it keeps each result (not a collected error) as its
    item ends. A pause ``between`` says was requested holds the run, once the running
    items ended, before the next item starts."""
    results: list[Any] = [None] * len(items)
    if not items:
        return results
    kept = log.kept if log is not None else {}
    failure: list[BaseException] = []
    lock = threading.Lock()
    with ThreadPoolExecutor(
        max_workers=min(parallel, len(items)), thread_name_prefix=f"pocoflow-map-{node.name}"
    ) as pool:
        running: set[Future[None]] = set()

        def one(index: int, item: Any) -> None:
            try:
                results[index] = result = node.run_item(index, item)
            except BaseException as exc:
                with lock:
                    failure.append(exc)
                return
            if log is not None and not isinstance(result, BaseException):
                log.keep(index, result)

        for index, item in enumerate(items):
            if index in kept:
                results[index] = kept[index]
                continue
            while len(running) >= parallel:
                running = wait(running, return_when=FIRST_COMPLETED).not_done
            if failure:
                break
            if between is not None and between.requested():
                wait(running)  # they end, and are kept, before the run holds
                running = set()
                if failure:
                    break
                _hold(between, log, node, index)
            if cancelled():
                wait(running)
                raise RunCancelled(f"MapNode {node.name!r} cancelled before item {index}")
            running.add(pool.submit(one, index, item))
        wait(running)
    if failure:
        raise failure[0]
    return results


def _hold(between: ItemGate, log: ItemLog | None, node: MapNode, index: int) -> None:
    """No item runs: make what finished durable (a process that dies while held leaves
    its items kept for ``flow.resume``), then hold the run until it may go on."""
    if log is not None:
        log.flush()
    between.hold(f"MapNode {node.name!r} paused before item {index}")


async def _exec_async_with_retries(node: AsyncNode, item: Any) -> Any:
    """``exec_async`` with the node's retry policy, waiting on the loop (not a thread);
    each try passes the node's limits first, as a sync item's ``_exec_once`` does."""
    tries = max(1, int(node.max_retries))
    gate = node._limit_gate
    for failed in range(1, tries + 1):
        try:
            if gate is None:
                return await _exec_async_bounded(node, item)
            async with gate.entered_async(node, item):
                return await _exec_async_bounded(node, item)
        except LimitWait:
            raise
        except Exception as exc:
            if failed >= tries or not node.is_retryable(exc):
                return node.exec_fallback(item, exc)
            delay = node.delay_after(failed)
            if delay > 0:
                await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


async def _exec_async_bounded(node: AsyncNode, item: Any) -> Any:
    """One try, bounded by the node's timeout (else ``POCOFLOW_STEP_TIMEOUT``); on the
    loop a timed-out try is cancelled, so it ends (and gives its slot back) for real."""
    limit = node.exec_timeout()
    if limit is None:
        return await node.exec_async(item)
    return await asyncio.wait_for(node.exec_async(item), limit)
