"""A MapNode's step on workers (or a parallel BatchFlow's, whose passes are the items):
the fan-out and the join (ARCHITECTURE §1, issue 7).

    claim -> join row?  no:   prep -> items + join row + step parked (one transaction)
                              -> one message per item           (node_start here)
                        yes, count complete:  items + results from the ledger -> post
                              -> the step's usual commit         (node_end here)
                        yes, not complete: re-open unfinished items, park again

The step message is also the join's: the item commit that completes the count re-queues
the step under a new attempt (``ledger.items``), and whoever claims it finds the count
complete and runs ``post``. So the join's delivery, duplicates, lost messages and dead
workers are handled by the step protocol itself (G1, G3), and ``prep`` never runs again
once the items are in the ledger. A resume of a run stopped mid fan-out (cancel, pause,
failed item) sends the step, whose claim re-opens the items nobody finished.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from pocoflow import codec
from pocoflow.batchflow import BatchPasses
from pocoflow.codec import CodecError
from pocoflow.distributed.message import ItemMessage
from pocoflow.hooks import NODE_END, NODE_ERROR, NODE_START
from pocoflow.ledger.itemqueue import FANNED_OUT_OUTCOME
from pocoflow.limits import limits_of
from pocoflow.logging import get_logger
from pocoflow.mapnode import MapNode, revive_error
from pocoflow.step import utc_now
from pocoflow.waiting import WaitingFor

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from pocoflow.distributed.executor import _Loaded, _StepRun

_log = get_logger("distributed.mapstep")

#: What ``execute_step`` returns for a step whose items now run.
FANNED_OUT = FANNED_OUT_OUTCOME


def run_map_step(sr: _StepRun, run: dict[str, Any], loaded: _Loaded, node: MapNode) -> str:
    """The claimed step of a MapNode (``node``: ``loaded.node`` itself, or the passes of
    a parallel BatchFlow, ``batchflow.map_node_of``): fan out, join, or re-open (module
    docstring). ``wait_for`` in ``prep`` or ``post`` parks the run as a plain step's node
    does (nothing of the step is committed: a woken step fans out, or joins, again)."""
    from pocoflow.distributed.executor import LOST, MAX_WAKEUPS_IN_STEP

    for _ in range(MAX_WAKEUPS_IN_STEP):
        try:
            return _run_map_step(sr, run, loaded, node)
        except WaitingFor as waiting:
            stop = sr._park(loaded, waiting)
            if stop is not None:
                return stop
            loaded = sr._reload(loaded)  # the value came meanwhile: run again
    sr._end(LOST, "woken too often in one step; the sweeper sends it again")
    return LOST


def _run_map_step(sr: _StepRun, run: dict[str, Any], loaded: _Loaded, node: MapNode) -> str:
    msg, db = sr.msg, sr.db
    node.run_id, node.step, node.attempt = msg.run_id, msg.step, msg.attempt
    node._signals = lambda key: db.read_signal(msg.run_id, key, now=sr._now())
    if db.get_join(msg.run_id, msg.step) is None:
        return _fan_out(sr, run, loaded, node)
    state, todo = db.reopen_items(msg.run_id, msg.step, msg.attempt, sr.holder, sr.worker)
    if state is not None and state["done"] >= state["total"]:
        return _join(sr, run, loaded, node)
    _parked(sr)
    # Publish first: the re-opened items wait for this process (``sending_by``) until
    # it has, so a ledger error closing the attempt row must not come before.
    _send(sr, run, node, [(r["idx"], r["attempt"], r["try_number"]) for r in todo])
    sr._end(FANNED_OUT_OUTCOME, None)
    _log.info("Step %d of run %s: %d unfinished items sent again", msg.step, msg.run_id, len(todo))
    return FANNED_OUT


def _event(event: str, sr: _StepRun, node: MapNode, **fields: Any) -> dict[str, Any]:
    return {"event": event, "step": sr.msg.step, "node_name": node.name, "ts": utc_now(), **fields}


def _fan_out(sr: _StepRun, run: dict[str, Any], loaded: _Loaded, node: MapNode) -> str:
    msg, db = sr.msg, sr.db
    hooks = loaded.flow._hooks
    started = _event(NODE_START, sr, node, attempt=msg.attempt)
    hooks.fire(NODE_START, node.name, loaded.store)
    t0 = time.perf_counter()
    try:
        node.check_policy()
        limits_of(node)  # a bad limit fails the node now, not each item as a crash
        values = node.items_of(node.prep(loaded.store))
        texts = []
        for idx, value in enumerate(values):
            try:
                texts.append(codec.encode(value, key=f"item {idx}"))
            except CodecError as exc:  # G7: named, never stringified
                if isinstance(node, BatchPasses):
                    raise TypeError(
                        f"BatchFlow {node.name!r} step {msg.step}: on workers each parallel "
                        f"pass is a map item, so its params must be Store values: {exc}"
                    ) from None
                raise TypeError(f"MapNode {node.name!r} step {msg.step}: {exc}") from None
    except Exception as exc:
        return _node_failed(sr, loaded, node, exc, [started], t0)
    if not values:  # nothing to fan out: post at once, as a plain step
        return _post(sr, run, loaded, node, [], [], [started], t0)
    try:
        prep_store = _prep_writes(loaded, msg.step)
    except CodecError as exc:  # G7, as a plain step's commit would say
        error = TypeError(f"MapNode {node.name!r} step {msg.step}: {exc}")
        return _node_failed(sr, loaded, node, error, [started], t0)
    if not db.fan_out(
        msg.run_id,
        msg.step,
        msg.attempt,
        sr.holder,
        sr.worker,
        texts,
        [started],
        prep_store=prep_store,
    ):
        sr._end("lost", "lease taken over before the fan-out committed")
        return "lost"
    _parked(sr)
    _send(sr, run, node, [(idx, 1, 1) for idx in range(len(texts))])
    _log.info("Step %d of run %s: fanned out %d items", msg.step, msg.run_id, len(texts))
    return FANNED_OUT


def _prep_writes(loaded: _Loaded, step: int) -> str | None:
    """What ``prep`` wrote to the Store (keys set or changed, keys deleted), as the JSON
    the join applies before ``post``: the join is another delivery, which loads the Store
    of step-1 from the ledger. None if prep wrote nothing. Only for a step that fans out:
    the diff moves the tracker on, and this delivery commits no checkpoint."""
    before = loaded.tracker.manifest
    manifest, changed = loaded.tracker.diff(loaded.store.as_dict(), step)
    deleted = sorted(set(before) - set(manifest))
    if not changed and not deleted:
        return None
    return json.dumps({"set": changed, "deleted": deleted})


def apply_prep_writes(db: WorkflowDB, run_id: str, step: int, store: Any) -> None:
    """What ``prep`` wrote at the fan-out, written to the Store of step-1 again: at the
    join, and for a parallel BatchFlow's pass, which starts from the Store ``prep`` left."""
    text = db.get_prep_store(run_id, step)
    if text is None:
        return
    writes = json.loads(text)
    for key in writes["deleted"]:
        if key in store:
            del store[key]
    for key, value in writes["set"].items():
        store[key] = codec.decode(value, key=key)


def _parked(sr: _StepRun) -> None:
    """The step holds no lease any more: its items do."""
    if sr.holding is not None:
        sr.ctx.leases.release(sr.holding)


def _send(
    sr: _StepRun, run: dict[str, Any], node: MapNode, todo: list[tuple[int, int, int]]
) -> None:
    """Publish item messages in one batch through the process's producer; a message the
    broker did not take stays unsent in the ledger and the sweeper sends it (G3)."""
    msg = sr.msg
    messages = [
        ItemMessage(msg.run_id, msg.flow, msg.step, msg.node_id, idx, attempt, try_number)
        for idx, attempt, try_number in todo
    ]
    if messages:
        from pocoflow.distributed.executor import step_queue  # (executor imports this module)

        sr.ctx.publisher.send_items(messages, queue=step_queue(run, node))
    sr.db.items_published(msg.run_id, msg.step, sr.worker)


def _join(sr: _StepRun, run: dict[str, Any], loaded: _Loaded, node: MapNode) -> str:
    """Every item is done: ``post(store, items, results)`` in item order, then the
    step's usual commit (checkpoint, events, successor)."""
    msg = sr.msg
    rows = sr.db.get_items(msg.run_id, msg.step, values_only=True)
    t0 = time.perf_counter()
    try:
        apply_prep_writes(sr.db, msg.run_id, msg.step, loaded.store)
        values = [codec.decode(r["item_json"], key=f"item {r['idx']}") for r in rows]
        results = [_result_of(r) for r in rows]
    except Exception as exc:
        return _node_failed(sr, loaded, node, exc, [], t0)
    return _post(sr, run, loaded, node, values, results, [], t0)


def _result_of(row: dict[str, Any]) -> Any:
    if row["error_json"] is not None:
        return revive_error(json.loads(row["error_json"]))
    return codec.decode(row["result_json"], key=f"item {row['idx']} result")


def _post(
    sr: _StepRun,
    run: dict[str, Any],
    loaded: _Loaded,
    node: MapNode,
    values: list[Any],
    results: list[Any],
    events: list[dict[str, Any]],
    t0: float,
) -> str:
    try:
        action = node.post(loaded.store, values, results)
        if action is not None and not isinstance(action, str):
            raise TypeError(
                f"Node {node.name!r} (step {sr.msg.step}): post() must return an action str "
                f"or None, got {type(action).__name__}"
            )
    except Exception as exc:
        return _node_failed(sr, loaded, node, exc, events, t0)
    elapsed = time.perf_counter() - t0
    ended = _event(NODE_END, sr, node, action=action, elapsed_ms=elapsed * 1000)
    loaded.flow._hooks.fire(NODE_END, node.name, action, elapsed, loaded.store)
    return sr._commit(run, loaded, action, [*events, ended])


def _node_failed(
    sr: _StepRun,
    loaded: _Loaded,
    node: MapNode,
    exc: BaseException,
    events: list[dict[str, Any]],
    t0: float,
) -> str:
    error = f"{type(exc).__name__}: {exc}"
    elapsed = (time.perf_counter() - t0) * 1000
    failed = _event(NODE_ERROR, sr, node, error_msg=error, elapsed_ms=elapsed)
    loaded.flow._hooks.fire(NODE_ERROR, node.name, exc, loaded.store)
    return sr._fail(error, [*events, failed])
