"""A realistic LLM pipeline: outline -> draft each section -> review (loop) -> summarise.

Runs offline on a deterministic fake LLM. The same module is what workers import to run
it distributed (``pocoflow worker --flows examples.article``):

    python -m examples.article "durable workflows"
"""

from __future__ import annotations

import sys

from examples.fake_llm import FakeLLM
from pocoflow import Flow, Node, Store, flow

llm = FakeLLM(fail_first=1)  # every prompt fails once: retries are part of the demo


class Outline(Node):
    max_retries = 3
    retry_delay = 0.01
    backoff_factor = 2.0

    def prep(self, store):
        return store["topic"]

    def exec(self, topic):
        return llm.complete(f"outline: {topic}", self.attempt)

    def post(self, store, topic, outline):
        store["sections"] = [line[2:] for line in outline.splitlines()]
        store["drafts"] = []
        return "draft"


class Draft(Node):
    """Drafts one section per step, looping on itself until every section has a draft."""

    max_retries = 3
    retry_delay = 0.01

    def prep(self, store):
        return store["sections"][len(store["drafts"])]

    def exec(self, section):
        return llm.complete(f"draft: {section}", self.attempt)

    def post(self, store, section, text):
        store["drafts"] = [*store["drafts"], text]
        return "more" if len(store["drafts"]) < len(store["sections"]) else "review"


class Review(Node):
    max_retries = 3
    retry_delay = 0.01

    def prep(self, store):
        return " | ".join(store["drafts"])

    def exec(self, drafts):
        return llm.complete(f"review: {drafts}", self.attempt)

    def post(self, store, drafts, verdict):
        store["reviews"] = store.get("reviews", 0) + 1
        if verdict == "revise" and store["reviews"] < 3:
            store["drafts"] = [f"{d} (revised)" for d in store["drafts"]]
            return "revise"
        return "approved"


class Summarise(Node):
    max_retries = 3
    retry_delay = 0.01

    def prep(self, store):
        return " ".join(store["drafts"])

    def exec(self, text):
        return llm.complete(f"summary: {text}", self.attempt)

    def post(self, store, text, summary):
        store["summary"] = summary
        return "done"


@flow("article")
def build_article_flow(db_path: str | None = None) -> Flow:
    outline, draft, review, summarise = Outline(), Draft(), Review(), Summarise()
    outline.then("draft", draft)
    draft.then("more", draft).then("review", review)
    review.then("revise", review).then("approved", summarise)
    return Flow(start=outline, db_path=db_path, max_steps=50)


def main(topic: str = "durable workflows", db_path: str | None = None) -> Store:
    store = build_article_flow(db_path).run(Store({"topic": topic}, schema={"topic": str}))
    print(store["summary"])
    return store


if __name__ == "__main__":
    main(*sys.argv[1:2])
