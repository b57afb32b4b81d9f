"""Flows for the human-in-the-loop tests (workers import this module): a draft that waits
for an approval, and one whose wait times out."""

from __future__ import annotations

from typing import Any

from pocoflow import Flow, Node, flow


class Draft(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["draft"] = f"draft for {store['topic']}"
        return "default"


class AwaitApproval(Node):
    """Waits in prep; counts its preps in the Store (reset by each re-run from prep)."""

    wait_timeout: float | None = None

    def prep(self, store: Any) -> Any:
        store["preps"] = store.get("preps", 0) + 1
        try:
            return self.wait_for("approval", timeout=self.wait_timeout)
        except TimeoutError:
            return {"ok": False, "note": "timed out"}

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["approval"] = prep_result
        return "ship" if prep_result.get("ok") else "drop"


class Outcome(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["outcome"] = self.name
        return "default"


class QuickTimeout(AwaitApproval):
    wait_timeout = 1.0


def _approval(waiter: Node) -> Flow:
    draft = Draft()
    draft.then("default", waiter)
    waiter.then("ship", Outcome(name="shipped"))
    waiter.then("drop", Outcome(name="dropped"))
    return Flow(draft)


@flow("wait_approval")
def approval() -> Flow:
    return _approval(AwaitApproval())


@flow("wait_quick_timeout")
def quick_timeout() -> Flow:
    return _approval(QuickTimeout())
