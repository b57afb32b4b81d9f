"""Flows for the usage tests (``tests/distributed/test_usage.py``): nodes that report
usage on the workers, priced there from ``usage_prices.json`` (``POCOFLOW_PRICES``)."""

from __future__ import annotations

import time
from typing import Any

from pocoflow import Flow, MapNode, Node, flow
from tests.distributed.flows import Hold
from tests.usage_nodes import Summarise, ask_then_summarise


class FlakyAsk(Node):
    """Reports 10 + 5 tokens of model ``m``, then fails its first attempt: a billed call
    whose attempt failed (attempt numbers count tries across workers)."""

    max_retries = 2

    def exec(self, prep_result: Any) -> str:
        self.report_usage(model="m", input_tokens=10, output_tokens=5)
        if self.attempt == 1:
            raise RuntimeError("provider hiccup")
        return "ok"


class AskThenHold(Hold):
    """Reports 7 + 3 tokens, then holds on attempt 1 (the worker is killed meanwhile)."""

    def exec(self, prep_result: Any) -> str:
        self.report_usage(model="m", input_tokens=7, output_tokens=3)
        return super().exec(prep_result)


@flow("usage_retry")
def usage_retry() -> Flow:
    """FlakyAsk -> Summarise."""
    ask = FlakyAsk()
    ask.then("default", Summarise())
    return Flow(start=ask)


@flow("usage_budget")
def usage_budget() -> Flow:
    """Ask -> Summarise with a budget of 10 tokens: Ask alone spends 15."""
    return ask_then_summarise("usage_budget", max_tokens=10)


@flow("usage_hold")
def usage_hold() -> Flow:
    return Flow(start=AskThenHold())


class SpendEach(MapNode):
    """12 items, each a call that reports 100 tokens of model ``m``."""

    def prep(self, store: Any) -> list[int]:
        return list(range(12))

    def exec(self, item: int) -> int:
        self.report_usage(model="m", input_tokens=60, output_tokens=40)
        time.sleep(0.1)
        return item

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["results"] = results
        return "default"


@flow("usage_map_budget")
def usage_map_budget() -> Flow:
    """A fan-out of 12 calls of 100 tokens under a budget of 150."""
    return Flow(SpendEach(), flow_name="usage_map_budget", max_tokens=150)
