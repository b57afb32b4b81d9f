"""Flows with node limits that the workers of ``test_limits.py`` import. Each exec writes
``<start> <end> <pid>`` (wall clock) to a side file, so the test process can check every
sliding window and the overlap of calls across workers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pocoflow import Flow, MapNode, Node, flow

#: The key every limited node here counts under: one shared resource across flows.
RATE = "3/s"
CONCURRENCY = 1
HANG_LIMIT_S = 60.0


class Timed(Node):
    """Records its exec interval and pid (and its name in the Store's trail); sleeps ``store["work_s"]``; with ``store["hang"]`` its
    first attempt hangs (until its worker is killed)."""

    def prep(self, store: Any) -> Any:
        return Path(store["side_dir"]), store.get("work_s", 0.0), store.get("hang", False)

    def exec(self, prep_result: Any) -> Any:
        side, work_s, hang = prep_result
        start = time.time()
        (side / f"{self.run_id}.{self.attempt}.started").write_text(str(os.getpid()))
        if hang and self.attempt == 1:
            time.sleep(HANG_LIMIT_S)
        time.sleep(work_s)
        with open(side / "calls", "a", encoding="utf-8") as handle:
            handle.write(f"{start} {time.time()} {os.getpid()} {self.name}\n")
        return self.attempt

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["attempt"] = exec_result
        store["trail"] = [*store.get("trail", []), self.name]
        return "default"


class RateLimited(Timed):
    rate_limit = RATE


class ConcurrencyLimited(Timed):
    max_concurrency = CONCURRENCY


@flow("limited-rate")
def limited_rate() -> Flow:
    return Flow(start=RateLimited(name="call"))


@flow("limited-concurrency")
def limited_concurrency() -> Flow:
    return Flow(start=ConcurrencyLimited(name="call"))


@flow("unlimited")
def unlimited() -> Flow:
    return Flow(start=Timed(name="call"))


class OnGpu(Timed):
    queue = "gpu"


@flow("routed")
def routed() -> Flow:
    """gpu -> cpu -> gpu: the first send and each successor follow Node.queue."""
    first, middle, last = OnGpu(name="gpu1"), Timed(name="cpu"), OnGpu(name="gpu2")
    first.then("default", middle)
    middle.then("default", last)
    return Flow(start=first)


class RecordedCalls(MapNode):
    """A fan-out whose items nap ``store["work_s"]`` (0.05 s) and each record
    ``<start> <end> <pid> item<i>``; ``before_call`` is what a call does first."""

    def prep(self, store: Any) -> Any:
        return [(store["side_dir"], i, store.get("work_s", 0.05)) for i in range(store["n"])]

    def exec(self, item: Any) -> Any:
        side, i, work_s = item
        start = time.time()
        self.before_call(side, i)
        time.sleep(work_s)
        with open(Path(side) / "calls", "a", encoding="utf-8") as handle:
            handle.write(f"{start} {time.time()} {os.getpid()} item{i}\n")
        return i

    def before_call(self, side: str, i: int) -> None:
        pass

    def post(self, store: Any, items: Any, results: Any) -> str:
        store["results"] = results
        return "default"


class LimitedMap(RecordedCalls):
    """A fan-out whose items share the rate limit and a concurrency limit across workers,
    and report their tokens."""

    rate_limit = "4/s"
    max_concurrency = 2
    max_retries = 2

    def before_call(self, side: str, i: int) -> None:
        self.report_usage(model="m", input_tokens=10, output_tokens=i, cost_usd=0.01)
        marker = Path(side) / f"{self.run_id}.{i}.failed"
        if i == 0 and not marker.exists():  # item 0 fails once: its usage still counts
            marker.write_text("1")
            raise ConnectionError("flaky item 0")


@flow("limited-map")
def limited_map() -> Flow:
    return Flow(start=LimitedMap(name="calls"))


class BadlyLimited(Timed):
    rate_limit = "10/d"  # no such unit: every step of it must fail, naming the node


@flow("limited-badly")
def limited_badly() -> Flow:
    return Flow(start=BadlyLimited(name="call"))


class RateLimitedTurns(Timed):
    rate_limit = RATE


@flow("limited-rate-turns")
def limited_rate_turns() -> Flow:
    """Its own limit key (flow / node name): no other test's starts in its window."""
    return Flow(start=RateLimitedTurns(name="call"))


class OneSlotMap(RecordedCalls):
    """A fan-out whose items share one concurrency slot (its own key: flow / node name)."""

    max_concurrency = 1


@flow("limited-slot-map")
def limited_slot_map() -> Flow:
    return Flow(start=OneSlotMap(name="calls"))


class TenantTokens(MapNode):
    """Items of one tenant (``limit_key``) share a token limit across runs and workers:
    each call reports 100 tokens; each exec records ``<start> <end> <pid> <run_id>``."""

    token_limit = "250/2s"

    def limit_key(self, item: Any) -> str:
        return f"tenant-{item[1]}"

    def prep(self, store: Any) -> Any:
        return [(store["side_dir"], store["tenant"]) for _ in range(store["n"])]

    def exec(self, item: Any) -> Any:
        start = time.time()
        self.report_usage(model="m", input_tokens=60, output_tokens=40)
        time.sleep(0.05)
        with open(Path(item[0]) / "calls", "a", encoding="utf-8") as handle:
            handle.write(f"{start} {time.time()} {os.getpid()} {self.run_id}\n")
        return 100

    def post(self, store: Any, items: Any, results: Any) -> str:
        store["tokens"] = sum(results)
        return "default"


@flow("tenant-tokens")
def tenant_tokens() -> Flow:
    return Flow(start=TenantTokens(name="tenant_calls"))


@flow("tenant-tokens-b")
def tenant_tokens_b() -> Flow:
    """Another flow and node: only the tenant key makes its calls share the limit."""
    return Flow(start=TenantTokens(name="other_calls"))


class HeldSlotMap(MapNode):
    """Items sharing one slot under ``store["key"]``: the item that gets it holds it until
    the test writes ``release`` in the side directory, so the others queue meanwhile."""

    max_concurrency = 1

    def limit_key(self, item: Any) -> str:
        return str(item[1])

    def prep(self, store: Any) -> Any:
        return [(store["side_dir"], store["key"], i) for i in range(store["n"])]

    def exec(self, item: Any) -> Any:
        side = Path(item[0])
        (side / f"{self.run_id}.item{item[2]}.started").write_text(str(os.getpid()))
        deadline = time.monotonic() + HANG_LIMIT_S
        while not (side / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return item[2]

    def post(self, store: Any, items: Any, results: Any) -> str:
        store["results"] = results
        return "default"


@flow("held-slot-map")
def held_slot_map() -> Flow:
    return Flow(start=HeldSlotMap(name="held"))


class KeyedCall(Node):
    """One call under ``store["key"]``'s single slot; records when its exec started."""

    max_concurrency = 1

    def limit_key(self, prep_result: Any) -> str:
        return str(prep_result[1])

    def prep(self, store: Any) -> Any:
        return store["side_dir"], store["key"]

    def exec(self, prep_result: Any) -> Any:
        (Path(prep_result[0]) / f"{self.run_id}.started").write_text(str(time.time()))


@flow("keyed-call")
def keyed_call() -> Flow:
    return Flow(start=KeyedCall(name="call"))
