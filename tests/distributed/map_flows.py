"""MapNode flows the test workers import (``POCOFLOW_FLOWS=tests.distributed.map_flows``).

Every item's ``exec`` appends ``idx attempt pid`` to ``<side>/<run_id>.items`` when it
starts, so a test counts executions per item and sees which process ran them; the Store
stays comparable with a local run's (the side directory travels in the items).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from pocoflow import AsyncNode, BatchFlow, Flow, MapNode, Node, Store, flow

#: A cancel or kill test's item must still be running when the test acts on it.
SLOW_ITEM_S = 0.3


def _log_exec(item: dict[str, Any], node: Node) -> None:
    side = item.get("side")
    if side:
        with open(Path(side) / f"{node.run_id}.items", "a", encoding="utf-8") as handle:
            handle.write(f"{item['i']} {node.attempt} {os.getpid()}\n")


def _tries(item: dict[str, Any], node: Node) -> int:
    """How many times this item's exec started in this run (from the side file)."""
    side = item.get("side")
    if not side:
        return 1
    path = Path(side) / f"{node.run_id}.items"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    return sum(1 for line in lines if line.split()[0] == str(item["i"]))


class Square(MapNode):
    """items: ``{"i", "side", "sleep"}`` for i in range(store["n"]); result i*i."""

    fail_on: tuple[int, ...] = ()
    flaky_on: tuple[int, ...] = ()

    def prep(self, store: Any) -> list[dict[str, Any]]:
        sleep = store.get("sleep", 0.0)
        return [{"i": i, "side": store.get("side_dir"), "sleep": sleep} for i in range(store["n"])]

    def exec(self, item: dict[str, Any]) -> int:
        _log_exec(item, self)
        if item["i"] in self.flaky_on and _tries(item, self) < 2:
            raise ConnectionError(f"flaky item {item['i']}")
        if item["i"] in self.fail_on:
            raise ValueError(f"bad item {item['i']}")
        deadline = time.monotonic() + item["sleep"]
        while time.monotonic() < deadline:  # a long call that polls for a cancel
            time.sleep(0.01)
        return int(item["i"]) ** 2

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["squares"] = [
            f"{type(r).__name__}: {r}" if isinstance(r, Exception) else r for r in results
        ]
        store["total"] = sum(r for r in results if isinstance(r, int))
        return "default"


class Finish(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["finished"] = True
        return "default"


def _map_flow(node: Square) -> Flow:
    node.then("default", Finish())
    return Flow(start=node, max_steps=10)


@flow("map_square")
def map_square() -> Flow:
    return _map_flow(Square())


class FlakySquare(Square):
    max_retries = 2
    retry_delay = 0.2
    flaky_on = (3, 7)


@flow("map_retry")
def map_retry() -> Flow:
    return _map_flow(FlakySquare())


class FailingSquare(Square):
    max_retries = 2
    fail_on = (5,)


@flow("map_fail")
def map_fail() -> Flow:
    return _map_flow(FailingSquare())


class CollectingSquare(FailingSquare):
    on_item_error = "collect"
    fail_on = (1, 4)


@flow("map_collect")
def map_collect() -> Flow:
    return _map_flow(CollectingSquare())


class Double(MapNode):
    """The inner fan-out of a sub-flow: runs on threads inside the item's process."""

    def prep(self, store: Any) -> list[int]:
        return list(range(store["k"]))

    def exec(self, item: int) -> int:
        return item * 2

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["doubled"] = sum(results)
        return "default"


class RunSubflow(Square):
    """Each item runs a sub-flow (itself a fan-out): nested fan-out."""

    def exec(self, item: dict[str, Any]) -> int:
        _log_exec(item, self)
        inner = Flow(start=Double()).run(Store({"k": item["i"]}))
        return int(inner["doubled"])


@flow("map_subflow")
def map_subflow() -> Flow:
    return _map_flow(RunSubflow())


class Sleep(MapNode):
    """``store["n"]`` items that each sleep ``store["sleep"]`` seconds (an LLM call's
    stand-in): what a fan-out's per-item cost is measured with."""

    def prep(self, store: Any) -> list[float]:
        return [store["sleep"]] * store["n"]

    def exec(self, seconds: float) -> int:
        time.sleep(seconds)
        return 1

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["done"] = sum(results)
        return "default"


@flow("map_sleep")
def map_sleep() -> Flow:
    return Flow(start=Sleep())


@flow("map_hooked")
def map_hooked() -> Flow:
    """``map_square`` whose hooks append to ``<side_dir>/hooks``: node_start fires once at
    the fan-out, node_end once at the join, in the workers."""
    built = map_square()

    def note(line: str, store: Any) -> None:
        side = store.get("side_dir")
        if side:
            with open(Path(side) / "hooks", "a", encoding="utf-8") as handle:
                handle.write(f"{line} {os.getpid()}\n")

    built.on("node_start", lambda name, store: note(f"node_start {name}", store))
    built.on("node_end", lambda name, action, elapsed, store: note(f"node_end {name}", store))
    return built


class AsyncSquare(Square, AsyncNode):
    """An async exec on workers: each item task runs its coroutine."""

    async def exec_async(self, item: dict[str, Any]) -> int:
        _log_exec(item, self)
        await asyncio.sleep(0.001)
        return int(item["i"]) ** 2

    def exec(self, item: dict[str, Any]) -> int:
        return AsyncNode.exec(self, item)


@flow("map_async")
def map_async() -> Flow:
    return _map_flow(AsyncSquare())


class PrepWrites(Square):
    """A prep that writes to the Store (as a plain node's prep may): post reads it."""

    def prep(self, store: Any) -> list[dict[str, Any]]:
        items = super().prep(store)
        store["planned"] = len(items)
        store.update({"n": store["n"] * 10})  # changed, not only added
        return items

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["summary"] = f"{store['planned']} planned, n={store['n']}"
        return super().post(store, items, results)


@flow("map_prep_writes")
def map_prep_writes() -> Flow:
    return _map_flow(PrepWrites())


class WaitsInItem(MapNode):
    """An item's exec asks for a human's value: not something an item can wait for."""

    def prep(self, store: Any) -> list[int]:
        return [0, 1]

    def exec(self, item: int) -> Any:
        return self.wait_for(f"ok-{item}")

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["got"] = results
        return "default"


@flow("map_waits_in_item")
def map_waits_in_item() -> Flow:
    return Flow(start=WaitsInItem(), max_steps=10)


def _crash_between_fan_out_and_publish() -> None:
    """Workers of ``map_crash_after_fanout`` die (SIGKILL) right after the fan-out's
    commit, before any item message is published: once per run (a marker file)."""
    import signal
    import tempfile

    from pocoflow.distributed import mapstep

    send = mapstep._send

    def crashing(sr: Any, run: Any, node: Any, todo: Any) -> None:
        marker = Path(tempfile.gettempdir()) / f"pocoflow-crash-{sr.msg.run_id}"
        if sr.msg.flow == "map_crash_after_fanout" and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        send(sr, run, node, todo)

    mapstep._send = crashing  # type: ignore[assignment]


_crash_between_fan_out_and_publish()


@flow("map_crash_after_fanout")
def map_crash_after_fanout() -> Flow:
    return _map_flow(Square())


def _crash_between_last_item_commit_and_join_publish() -> None:
    """Workers of ``map_crash_before_join`` die (SIGKILL) right after the item commit
    that completed the join, before the join's message is published: once per run."""
    import signal
    import tempfile

    from pocoflow.distributed import itemtask

    message = itemtask.StepMessage

    def crashing(run_id: str, flow_name: str, *args: Any, **kwargs: Any) -> Any:
        marker = Path(tempfile.gettempdir()) / f"pocoflow-join-crash-{run_id}"
        if flow_name == "map_crash_before_join" and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return message(run_id, flow_name, *args, **kwargs)

    itemtask.StepMessage = crashing  # type: ignore[assignment,misc]


_crash_between_last_item_commit_and_join_publish()


@flow("map_crash_before_join")
def map_crash_before_join() -> Flow:
    return _map_flow(Square())


def _arm_crash_mid_batch_publish(run_id: str, marker: Path) -> None:
    """This process dies (SIGKILL) in the middle of publishing ``run_id``'s item
    messages, right after the second batch reached the broker (the first two batches
    out, perhaps unmarked, the rest never sent), unless ``marker`` exists: once per
    run. Armed by the node's prep in the worker that fans out, so that no other process
    (the test's own included) has its publisher patched."""
    import signal

    from pocoflow.distributed import publish

    publish_batch = publish.Publisher._publish_batch

    def crashing(self: Any, messages: Any, queue: Any, countdown: Any) -> Any:
        keys = publish_batch(self, messages, queue, countdown)
        first = messages[0]
        if first.run_id == run_id and first.idx > 0 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return keys

    publish.Publisher._publish_batch = crashing  # type: ignore[method-assign]


class CrashesMidPublish(Square):
    """``Square`` whose worker dies mid-publish of its item messages (the marker in the
    run's side directory)."""

    def prep(self, store: Any) -> list[dict[str, Any]]:
        marker = Path(store["side_dir"]) / f"{self.run_id}.publish-crash"
        if not marker.exists():
            _arm_crash_mid_batch_publish(str(self.run_id), marker)
        return super().prep(store)


@flow("map_crash_mid_publish")
def map_crash_mid_publish() -> Flow:
    return _map_flow(CrashesMidPublish())


class ApprovedMap(Square):
    """A human approves the fan-out (in prep) and the result (in post)."""

    def prep(self, store: Any) -> list[dict[str, Any]]:
        store["scale"] = self.wait_for("go")
        return super().prep(store)

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["verdict"] = self.wait_for("verdict")
        return super().post(store, items, results)


@flow("map_approved")
def map_approved() -> Flow:
    return _map_flow(ApprovedMap())


class CancelledInItem(Square):
    """Item 1's exec raises asyncio.CancelledError (a BaseException since Python 3.8),
    as a library cancelled inside the call may."""

    def exec(self, item: dict[str, Any]) -> int:
        if item["i"] == 1:
            _log_exec(item, self)
            raise asyncio.CancelledError("the call was cancelled")
        return super().exec(item)


@flow("map_cancelled_error")
def map_cancelled_error() -> Flow:
    return _map_flow(CancelledInItem())


class CancelledInStep(Node):
    def exec(self, prep_result: Any) -> Any:
        raise asyncio.CancelledError("the call was cancelled")


@flow("step_cancelled_error")
def step_cancelled_error() -> Flow:
    return Flow(start=CancelledInStep(), max_steps=10)


@flow("map_fail_hooked")
def map_fail_hooked() -> Flow:
    """``map_fail`` whose node_error hook appends to ``<side_dir>/hooks``."""
    built = map_fail()

    def note(name: str, exc: BaseException, store: Any) -> None:
        with open(Path(store["side_dir"]) / "hooks", "a", encoding="utf-8") as handle:
            handle.write(f"node_error {name} {type(exc).__name__} {exc}\n")

    built.on("node_error", note)
    return built


def _until_two_processes_started(item: dict[str, Any], node: Node, timeout: float = 5.0) -> None:
    """Hold this exec until another process has started one of the run's too (or
    ``timeout``): a test of spreading then does not depend on how fast each worker
    takes its next message."""
    if not item.get("side"):  # a local run: one process
        return
    path = Path(item["side"]) / f"{node.run_id}.items"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {line.split()[2] for line in path.read_text(encoding="utf-8").splitlines()}
        if len(pids) >= 2:
            return
        time.sleep(0.01)


class SquarePass(Node):
    """One pass of ``batch_square``: logs its exec as a map item does (``i`` = the pass)
    and writes its own key; reads what the batch's prep wrote."""

    def prep(self, store: Any) -> dict[str, Any]:
        return {"i": self.params["i"], "side": store.get("side_dir"), "base": store["base"]}

    def exec(self, item: dict[str, Any]) -> int:
        _log_exec(item, self)
        _until_two_processes_started(item, self)
        return item["base"] + item["i"] ** 2

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store[f"square/{self.params['i']}"] = exec_result
        return "default"


class SquareBatch(BatchFlow):
    parallel = True

    def prep(self, store: Any) -> list[dict[str, Any]]:
        store["base"] = 1000  # a pass starts from the Store prep left
        return [{"i": i} for i in range(store["n"])]

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["total"] = sum(store[f"square/{p['i']}"] for p in prep_result)
        return "default"


@flow("batch_square")
def batch_square() -> Flow:
    """A parallel BatchFlow as a node: its passes are map items on workers."""
    batch = SquareBatch(start=SquarePass(), flow_name="square_pass")
    batch.then("default", Finish())
    return Flow(start=batch, max_steps=10)


class OnGpu(Square):
    queue = "gpu"  # its items too, not only its step


@flow("map_on_gpu")
def map_on_gpu() -> Flow:
    return _map_flow(OnGpu())


class WrongType(Node):
    """Pass 1 writes a str where the flow's schema wants an int."""

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["count"] = "three" if self.params["i"] == 1 else self.params["i"]
        return "default"


class ThreePasses(BatchFlow):
    parallel = True

    def prep(self, store: Any) -> list[dict[str, Any]]:
        return [{"i": i} for i in range(3)]


@flow("batch_schema")
def batch_schema() -> Flow:
    return Flow(
        start=ThreePasses(start=WrongType(), flow_name="schema_batch"), schema={"count": int}
    )


class TimedPass(Node):
    """Appends ``i start end pid`` to ``<side>/<run_id>.passes``."""

    def prep(self, store: Any) -> tuple[str, int, str | None]:
        return store["side_dir"], self.params["i"], self.run_id

    def exec(self, prep_result: Any) -> int:
        side, i, run_id = prep_result
        started = time.time()
        time.sleep(0.2)
        with open(Path(side) / f"{run_id}.passes", "a", encoding="utf-8") as handle:
            handle.write(f"{i} {started} {time.time()} {os.getpid()}\n")
        return i

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store[f"out/{exec_result}"] = exec_result
        return "default"


class OneAtATime(BatchFlow):
    parallel = True
    max_concurrency = 1  # on workers: one pass at a time, across every worker

    def prep(self, store: Any) -> list[dict[str, Any]]:
        return [{"i": i} for i in range(4)]


@flow("batch_one_at_a_time")
def batch_one_at_a_time() -> Flow:
    return Flow(start=OneAtATime(start=TimedPass(), flow_name="one_at_a_time"))


class WaitsInPass(Node):
    def prep(self, store: Any) -> Any:
        return self.wait_for("go")


@flow("batch_wait")
def batch_wait() -> Flow:
    return Flow(start=ThreePasses(start=WaitsInPass(), flow_name="wait_batch"))


class PathPasses(ThreePasses):
    def prep(self, store: Any) -> list[dict[str, Any]]:
        return [{"i": i, "path": Path(f"/data/doc{i}.txt")} for i in range(3)]


@flow("batch_path_params")
def batch_path_params() -> Flow:
    return Flow(start=PathPasses(start=WrongType(), flow_name="path_batch"))
