"""An approval flow: a fake LLM drafts an announcement, a human approves it or asks for a
change, and only an approved draft is published. The run waits for each answer holding
no worker and no thread: the answer is sent to it later, from anywhere.

python -m examples.approval      # plays the human: asks for a change, then approves

On the workers (any worker continues the run once the answer arrives):

    pocoflow worker --flows examples.approval &
    pocoflow submit approval --store '{"topic": "our new API"}' --flows examples.approval
    pocoflow send approval-1a2b3c4d review-1 '{"ok": false, "note": "shorter"}'
    pocoflow send approval-1a2b3c4d review-2 '{"ok": true}'
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from examples.fake_llm import FakeLLM
from pocoflow import Flow, Node, Store, attach, flow

LLM = FakeLLM()


class Draft(Node):
    """Writes a draft; after a rejection, a revision that takes the reviewer's note."""

    def prep(self, store: Any) -> tuple[str, str | None]:
        return store["topic"], store.get("note")

    def exec(self, prep_result: tuple[str, str | None]) -> str:
        topic, note = prep_result
        return LLM.complete(f"draft: {topic}" + (f" ({note})" if note else ""))

    def post(self, store: Any, prep_result: Any, draft: str) -> str:
        store["draft"] = draft
        store["round"] = store.get("round", 0) + 1
        return "review"


class Review(Node):
    """Waits for the human's answer to this round's draft. Each round has its own key
    (``review-1``, ``review-2``...), since a key takes one value."""

    def prep(self, store: Any) -> dict[str, Any]:
        return self.wait_for(f"review-{store['round']}")

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        if prep_result.get("ok"):
            return "approved"
        store["note"] = prep_result.get("note", "")
        return "revise"


class Publish(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["published"] = store["draft"]
        return "done"


@flow("approval")
def build_flow(db_path: str | Path | None = None) -> Flow:
    draft, review = Draft(), Review()
    draft.then("review", review)
    review.then("revise", draft)
    review.then("approved", Publish())
    return Flow(start=draft, db_path=db_path, max_steps=20)


def main(db_path: str | Path | None = None) -> Store:
    """Run the flow locally, answering as a human would: a change first, then yes."""
    db_path = str(db_path or Path(tempfile.mkdtemp()) / "approval.db")
    flow = build_flow(db_path)
    store = flow.run({"topic": "our new API"})
    run_id = flow.last_run_id
    assert run_id is not None
    handle = attach(run_id, db_path)
    answers = [{"ok": False, "note": "shorter"}, {"ok": True}]
    for answer in answers:
        print(f"run {run_id} is {handle.status}; draft {store['round']}: {store['draft']}")
        handle.send(f"review-{store['round']}", answer)
        store = flow.resume(run_id)  # type: ignore[assignment]
    print(f"run {run_id} is {handle.status}: published {store['published']!r}")
    return store


if __name__ == "__main__":
    main()
