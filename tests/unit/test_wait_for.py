"""``Node.wait_for`` in the pure core, with a fake signal reader: what it returns, raises
and refuses, and that the retry seam and ``except Exception`` leave ``WaitingFor`` alone."""

from __future__ import annotations

from typing import Any

import pytest

from pocoflow import AsyncNode, Node
from pocoflow.hooks import Hooks
from pocoflow.step import run_step
from pocoflow.waiting import Signal, WaitingFor


def reader(signals: dict[str, Signal]) -> Any:
    return lambda key: signals.get(key, Signal(sent=False))


class Asks(Node):
    max_retries = 3
    fallbacks = 0

    def exec(self, prep_result: Any) -> Any:
        try:
            return self.wait_for("answer", timeout=30)
        except Exception:  # a node's own broad catch must not swallow the wait
            return "swallowed"

    def exec_fallback(self, prep_result: Any, exc: BaseException) -> Any:
        Asks.fallbacks += 1
        raise exc

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["answer"] = exec_result
        return "default"


def run(node: Node, signals: dict[str, Signal]) -> dict[str, Any]:
    store: dict[str, Any] = {}
    run_step(node, store, step=0, hooks=Hooks(), run_id="r-1", signals=reader(signals))
    return store


def test_a_sent_value_is_returned() -> None:
    assert run(Asks(), {"answer": Signal(sent=True, value={"ok": True})}) == {
        "answer": {"ok": True}
    }


def test_no_value_raises_waiting_for_past_retries_and_broad_catches() -> None:
    Asks.fallbacks = 0
    with pytest.raises(WaitingFor) as waiting:
        run(Asks(), {})
    assert (waiting.value.key, waiting.value.timeout, waiting.value.node_name) == (
        "answer",
        30.0,
        "Asks",
    )
    assert Asks.fallbacks == 0 and not isinstance(waiting.value, Exception)


def test_an_expired_wait_raises_timeout_error_naming_node_and_key() -> None:
    class Strict(Node):
        def prep(self, store: Any) -> Any:
            return self.wait_for("answer")

    with pytest.raises(Exception, match=r"Node 'Strict' .*'answer'.*timed out") as failed:
        run(Strict(), {"answer": Signal(sent=False, expired=True)})
    assert isinstance(failed.value.__cause__, TimeoutError)


def test_an_async_node_waits_too() -> None:
    class AsyncAsks(AsyncNode):
        async def exec_async(self, prep_result: Any) -> Any:
            return self.wait_for("answer")

    with pytest.raises(WaitingFor):
        run(AsyncAsks(), {})
    assert run(AsyncAsks(), {"answer": Signal(sent=True, value=3)}) == {}


def test_bad_keys_and_timeouts_and_no_ledger_are_refused() -> None:
    node = Asks()
    node._signals = reader({})
    for key in ("", None, 3):
        with pytest.raises(ValueError, match="non-empty str"):
            node.wait_for(key)  # type: ignore[arg-type]
    for timeout in (0, -1, "5", True):
        with pytest.raises(ValueError, match="timeout must be a number"):
            node.wait_for("k", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"Node 'Asks': wait_for\('k'\) needs a run recorded"):
        Asks().wait_for("k")
