"""Nodes that report usage, shared by the unit, ledger and distributed usage tests (the
distributed workers import them through tests/distributed/usage_flows.py)."""

from __future__ import annotations

from typing import Any

from pocoflow import Flow, Node


class Ask(Node):
    """Reports 10 + 5 tokens of model ``m`` per try; fails its first ``fail_tries`` tries
    (counted in this process)."""

    max_retries = 3
    fail_tries = 0
    calls = 0

    def exec(self, prep_result: Any) -> str:
        type(self).calls += 1
        self.report_usage(model="m", input_tokens=10, output_tokens=5)
        if type(self).calls <= type(self).fail_tries:
            raise RuntimeError("provider hiccup")
        return "ok"


class Summarise(Node):
    """Reports 100 + 50 tokens at a given cost of $0.25."""

    ran = 0

    def exec(self, prep_result: Any) -> None:
        type(self).ran += 1
        self.report_usage(model="other", input_tokens=100, output_tokens=50, cost_usd=0.25)

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["summarised"] = True
        return "default"


def ask_then_summarise(flow_name: str = "usage_two", **kwargs: Any) -> Flow:
    """Ask -> Summarise, counters reset."""
    Ask.calls, Summarise.ran = 0, 0
    ask = Ask()
    ask.then("default", Summarise())
    return Flow(ask, flow_name=flow_name, **kwargs)
