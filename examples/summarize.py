"""Map-reduce summariser: one LLM call per document (a MapNode fans them out), then one
call that combines the summaries. Every call reports its tokens; a price table turns
them into dollars, and the run's usage comes back by node.

Runs offline on the deterministic fake LLM. On workers (``pocoflow worker --flows
examples.summarize``) each document is its own task, spread over every worker, and the
rate limit holds across all of them:

    python -m examples.summarize 50
"""

from __future__ import annotations

import os
import sys
from typing import Any

from examples.fake_llm import FakeLLM
from pocoflow import Flow, MapNode, Node, flow, set_prices

#: Simulated latency of one LLM call, in seconds (the demo sets it; tests leave it 0).
LATENCY_ENV = "POCOFLOW_EXAMPLE_LLM_LATENCY"

llm = FakeLLM(delay=float(os.environ.get(LATENCY_ENV) or 0))

#: Dollars per token (input, output) of the two pretend models.
PRICES = {"fake-small": (0.15e-6, 0.60e-6), "fake-large": (2.50e-6, 10.0e-6)}

TOPICS = ["tides", "bees", "compilers", "glaciers", "jazz", "ledgers", "lichens", "rivets"]


def documents(count: int) -> list[dict[str, Any]]:
    """``count`` small made-up documents, the same every time."""
    return [
        {
            "title": f"On {TOPICS[i % len(TOPICS)]} #{i}",
            "body": " ".join(f"{TOPICS[(i + k) % len(TOPICS)]} fact {k}." for k in range(30)),
        }
        for i in range(count)
    ]


def tokens(text: str) -> int:
    """A rough token count (about 4 tokens for 3 words), as a provider would bill."""
    return max(1, len(text.split()) * 4 // 3)


class SummarizeEach(MapNode):
    """One summary per document, up to 8 at a time per process; on workers every
    document is its own task."""

    max_parallel = 8
    max_retries = 3
    retry_delay = 0.05
    rate_limit = "100/s"  # across every worker and process

    def prep(self, store):
        return store["documents"]

    def exec(self, document):
        prompt = f"summary: {document['title']}. {document['body']}"
        text = llm.complete(prompt)
        self.report_usage(
            model="fake-small", input_tokens=tokens(prompt), output_tokens=tokens(text)
        )
        return text

    def post(self, store, documents, summaries):
        store["summaries"] = summaries
        return "default"


class Combine(Node):
    """The reduce step: one call over every summary."""

    def prep(self, store):
        return store["summaries"]

    def exec(self, summaries):
        prompt = "summary: " + " ".join(summaries)
        text = llm.complete(prompt)
        self.report_usage(
            model="fake-large", input_tokens=tokens(prompt), output_tokens=tokens(text)
        )
        return text

    def post(self, store, summaries, text):
        store["digest"] = text
        return "default"


@flow("summarize")
def build_summarize_flow() -> Flow:
    set_prices(PRICES)  # here, not at import: every process that builds the flow prices it
    each = SummarizeEach()
    each.then("default", Combine())
    return Flow(start=each)


def main(count: int = 20, db_path: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run locally; returns (the Store, the run's usage)."""
    summarize = build_summarize_flow()
    summarize.db_path = db_path
    store = summarize.run({"documents": documents(count)})
    usage = summarize.usage()
    print(f"{len(store['summaries'])} summaries; digest: {store['digest'][:60]}")
    for name, row in usage["by_node"].items():
        print(
            f"  {name:<14} {row['calls']:>3} calls  {row['input_tokens']:>6} in  "
            f"{row['output_tokens']:>5} out  ${row['cost_usd']:.6f}"
        )
    print(f"  total cost ${usage['cost_usd']:.6f}")
    return store.as_dict(), usage


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
