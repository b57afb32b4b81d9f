"""BatchFlow: a sub-flow run once per parameter dict, as in PocketFlow.

    prep(store)                       -> a list of param dicts, one per pass
    the graph from ``start``          runs once per dict; its nodes read ``self.params``
    post(store, params_list, None)    -> the action for the outer flow ("default")

Sequential passes (the default) run in order on the one Store, as PocketFlow's do: a pass
sees what the passes before it wrote. Parallel passes (``parallel = True``) run side by
side, so they cannot share a Store without racing: each pass runs on its own copy of the
Store as it was before the batch, and what each pass wrote (set or deleted, including a
value changed in place) is merged back in pass order once every pass is done; when two
passes write one key, the later pass wins. Passes that must all be seen write keys of
their own (say ``results/<doc>``) and ``post`` gathers them.

Why the parallel passes are a MapNode's items: a pass is then one unit of concurrency
(``max_parallel`` threads here) and of failure (a failed pass is named by its index), and
its result is the JSON-shaped set of keys it wrote, which is what a distributed map item
hands back, and on workers they are map items (``map_node_of``).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pocoflow import codec
from pocoflow.flow import Flow, as_store
from pocoflow.limits import LimitGate
from pocoflow.logging import get_logger
from pocoflow.mapnode import ItemFailed, MapNode
from pocoflow.node import DEFAULT_ACTION, Node
from pocoflow.step import RunCancelled, StepError
from pocoflow.store import Store
from pocoflow.waiting import SignalReader

_log = get_logger("batchflow")

#: How much of a pass's params an error message shows.
PARAMS_SHOWN = 200


class BatchPassFailed(ItemFailed):
    """A pass of a BatchFlow failed: names the batch, the pass index, its params and the
    inner node; ``cause`` is the node's own exception. An ``ItemFailed`` (a pass is an
    item of the batch's passes), so a worker fails the run with this same message."""

    def __init__(
        self, batch: str, index: int, params: Mapping[str, Any], cause: BaseException
    ) -> None:
        node = ""
        if isinstance(cause, StepError):
            node, cause = f" at node {cause.node_name!r}", cause.cause
        shown = repr(dict(params))
        if len(shown) > PARAMS_SHOWN:
            shown = shown[: PARAMS_SHOWN - 3] + "..."
        message = (
            f"BatchFlow {batch!r}: pass {index} (params {shown}) failed{node}: "
            f"{type(cause).__name__}: {cause}"
        )
        super().__init__(batch, index, cause, message)
        self.batch = batch
        self.params = dict(params)


@dataclass
class PassWrites:
    """What one parallel pass wrote to its copy of the Store: the keys it set (with their
    final values) and the keys it deleted. JSON-shaped, as a map item's result."""

    set: dict[str, Any] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"set": self.set, "deleted": self.deleted}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PassWrites:
        return cls(dict(data["set"]), list(data["deleted"]))

    def apply(self, store: Store) -> None:
        """Write these changes onto ``store`` (schema checks and observers as usual)."""
        for key, value in self.set.items():
            store[key] = value
        for key in self.deleted:
            if key in store:
                del store[key]


class BatchFlow(Flow):
    """A Flow whose ``prep(store)`` returns a list of param dicts: the graph from
    ``start`` runs once per dict (a pass), and every node of a pass sees the dict,
    merged over the batch's own ``params``, as ``self.params``.

    ``parallel = True`` runs up to ``max_parallel`` passes at once, each on a copy of the
    Store merged back in pass order (see the module docstring). A failed pass fails the
    batch with ``BatchPassFailed`` naming its index; in parallel, passes not started yet
    do not start. A cancel stops the batch between nodes and between passes.

    Used as a node of an outer Flow, the whole batch is one step of the outer run (as any
    sub-flow); run on its own (``run``, ``run_background``, ``submit``), the run has one
    step: the batch. ``post(store, params_list, None)`` gets each pass's params and
    returns ``"default"`` so the outer flow goes on.
    """

    parallel: bool = False
    max_parallel: int = 8

    @property
    def _keeps_items(self) -> bool:  # type: ignore[override]
        """A local run with a ledger keeps each finished parallel pass (as workers keep
        each pass as its item): a resume runs only the others. Sequential passes share
        one Store, so the batch runs again whole."""
        return self.parallel

    def prep(self, store: Any) -> list[dict[str, Any]]:
        """The param dicts, one per pass (override). None means no pass."""
        return []

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str | None:
        return DEFAULT_ACTION

    def _entry(self) -> Node:
        return self

    def batch_of(self, prep_result: Any) -> list[dict[str, Any]]:
        """``prep``'s result as the list of each pass's params (the batch's own
        ``params`` under each dict), or a ``TypeError`` naming the batch and the pass."""
        if prep_result is None:
            return []
        if not isinstance(prep_result, list | tuple):
            raise TypeError(
                f"BatchFlow {self.name!r}: prep() must return a list of param dicts, "
                f"got {type(prep_result).__name__}"
            )
        batch = []
        for index, params in enumerate(prep_result):
            if not isinstance(params, Mapping):
                raise TypeError(
                    f"BatchFlow {self.name!r}: pass {index} params must be a dict, "
                    f"got {type(params).__name__}"
                )
            batch.append({**self.params, **params})
        return batch

    def _run(self, store: Any) -> str | None:
        store = as_store(store) if isinstance(store, dict) else store
        if self.parallel:
            passes = BatchPasses(self)
            passes._cancel_probe = self._outer_context[3]
            # The run's gate (it waits in place here): the batch's own limits hold each
            # pass locally as on workers.
            passes._limit_gate = self._limit_gate
            return passes._run(store)
        batch = self.batch_of(self.prep(store))
        for index, params in enumerate(batch):
            self.run_pass(store, index, params)
        return self.post(store, batch, None)

    def run_pass(self, store: Store, index: int, params: dict[str, Any]) -> None:
        """Pass ``index``: the graph once on ``store``, every node a copy with ``params``."""
        try:
            self._orchestrate(store, params, fire_end=False)
        except RunCancelled:
            raise
        except Exception as exc:
            raise BatchPassFailed(self.name, index, params, exc) from exc


class BatchPasses(MapNode):
    """The parallel passes of a batch as a MapNode, so they run wherever map items run:

        prep(store)                 -> items ``{"index": i, "params": {...}}``
        exec(item)                  -> the pass's writes, ``PassWrites.to_dict()`` (JSON)
        post(store, items, results) -> merges the writes in pass order, then the batch's
                                       own ``post``

    ``exec`` starts each pass from a copy of ``base``, the Store as it was before the
    batch, which ``prep`` binds; an executor that runs items elsewhere (a worker that
    did not run ``prep``) binds it with ``bind(store)`` first: the Store of step-1 and
    what ``prep`` wrote (``apply_prep_writes``). In process, MapNode runs the items on
    threads (``max_parallel``, in pass order) and stops starting them on a cancel or a
    failure, or holds on a pause.
    """

    def __init__(self, batch: BatchFlow) -> None:
        super().__init__(name=batch.name)  # its events and hooks are the batch's
        self.batch = batch
        self.max_parallel = batch.max_parallel
        # The passes are the batch's items: its queue routes them (on workers), and its
        # rate_limit and max_concurrency hold each pass, under the batch's own key (the
        # flow's and its name: never an inner node's, which a pass may wait for while
        # it holds its slot). Not token_limit: tokens count under the node reporting them.
        self.queue = batch.queue
        self.rate_limit = batch.rate_limit
        self.max_concurrency = batch.max_concurrency
        self.base: Store | None = None

    def bind(self, store: Store) -> None:
        """The Store every pass starts from (a copy of it each)."""
        self.base = store

    def prep(self, store: Any) -> list[dict[str, Any]]:
        self.bind(store)
        batch = self.batch.batch_of(self.batch.prep(store))
        return [{"index": index, "params": params} for index, params in enumerate(batch)]

    def _base(self) -> Store:
        if self.base is None:
            raise RuntimeError(f"{self.name}: bind(store) before running a pass")
        return self.base

    def exec(self, item: dict[str, Any]) -> dict[str, Any]:
        base = self._base()
        before = base.as_dict()
        own = Store(copy.deepcopy(before), schema=base.schema, name=base.name)
        written: dict[str, None] = {}
        own.add_observer(lambda key, old, new: written.setdefault(key))
        self.batch.run_pass(own, item["index"], item["params"])
        return _writes_of(own.as_dict(), before, written).to_dict()

    def _log_owner(self) -> Node:
        return self.batch  # the step's node: a local run keeps the passes under it

    def _log_scope(self) -> str | None:
        """A pass's writes depend on the Store it starts from, which the batch's ``prep``
        (run again on a resume, or when a pass's node waited with ``wait_for``) may leave
        otherwise: a pass kept from another start serves none. (Workers keep ``prep``'s
        writes instead and never run it again.) One codec encoding of the Store a step,
        key by key; a value whose text depends on hash order (a pydantic model's set
        field) makes every pass run again, which costs time, not correctness. None (keep
        nothing, with a warning) when a value cannot be encoded."""
        values = self._base().as_dict()
        scope = hashlib.sha256()
        # Keys in order: a Store loaded from its checkpoint may list them otherwise.
        for key in sorted(values):
            try:
                text = codec.encode(values[key], key=key)
            except Exception as exc:  # CodecError, or a model's own dump failing
                _log.warning(
                    "BatchFlow %r: its passes are not kept in the ledger and run again on a "
                    "resume: %s",
                    self.batch.name,
                    exc,
                )
                return None
            scope.update(f"{len(key)}:{key}{len(text)}:{text}".encode())
        return scope.hexdigest() + "\n"

    def run_item(self, index: int, item: Any) -> Any:
        # Neither the map's retries nor its timeout: a pass is many nodes, each with its
        # own policy, and a failed pass is already named by BatchPassFailed.
        return self._exec_once(item)

    def _exec_once(self, prep_result: Any) -> Any:
        # One pass (here, or an executor's one item), held as a whole by the batch's
        # limits when a gate is set: a local run's, or a worker's.
        gate = self._limit_gate
        if gate is not None:
            with gate.entered(self, prep_result):
                return self.exec(prep_result)
        return self.exec(prep_result)

    def item_outcome(self, index: int, exc: BaseException) -> BaseException:
        if isinstance(exc, BatchPassFailed) and self.on_item_error != "collect":
            raise exc  # names the batch, the pass, its params and the inner node already
        return super().item_outcome(index, exc)

    def run_in(self, signals: SignalReader | None, limit_gate: LimitGate | None) -> None:
        """What ``run_step`` would have given the batch, for a pass run as an item where
        the batch's own step did not run (a worker): its inner nodes see the run's ids
        and cancel (as set on these passes), and wait in place for their limits."""
        self.batch._outer_context = (
            self.run_id,
            self.step,
            self.attempt,
            self._cancel_probe,
            signals,
        )
        self.batch._limit_gate = limit_gate

    def post(self, store: Any, items: list[dict[str, Any]], results: list[Any]) -> str | None:
        for result in results:
            PassWrites.from_dict(result).apply(store)
        return self.batch.post(store, [item["params"] for item in items], None)


def map_node_of(node: Node) -> MapNode | None:
    """The MapNode whose items do ``node``'s work where map items run (on workers): the
    node itself, a parallel BatchFlow's passes, or None. The passes are new at each call,
    over a copy of the batch, so what one delivery binds (the Store, the run) is its own
    while other deliveries of the same graph run beside it (a threads pool)."""
    if isinstance(node, MapNode):
        return node
    if isinstance(node, BatchFlow) and node.parallel:
        return BatchPasses(copy.copy(node))
    return None


def _writes_of(
    after: dict[str, Any], before: dict[str, Any], written: dict[str, None]
) -> PassWrites:
    """What a pass changed: keys it wrote, values it changed in place, keys it deleted."""
    writes = PassWrites()
    for key, value in after.items():
        if key in written or key not in before or _differs(value, before[key]):
            writes.set[key] = value
    writes.deleted = [key for key in before if key not in after]
    return writes


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # a value whose == raises (arrays): count it as changed
        return True
