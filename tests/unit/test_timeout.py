"""Node ``timeout`` and ``POCOFLOW_STEP_TIMEOUT`` on the local path (G3: a hung exec is
bounded): the try fails with TimeoutError, the retry policy decides, a late result is
dropped."""

from __future__ import annotations

import threading
import time

import pytest

from pocoflow import Flow, Node
from pocoflow.node import STEP_TIMEOUT_ENV, call_with_timeout, default_step_timeout
from tests.helpers import wait_until

pytestmark = pytest.mark.unit


class Hangs(Node):
    """exec blocks on ``release`` on its first ``hang_tries`` tries, then answers."""

    timeout = 0.2

    def __init__(self, hang_tries: int = 1) -> None:
        super().__init__()
        self.hang_tries = hang_tries
        self.tries = 0
        self.release = threading.Event()
        self.late: list[str] = []

    def exec(self, prep_result):
        self.tries += 1
        if self.tries <= self.hang_tries:
            self.release.wait(10)
            self.late.append("late")
            return "late"
        return "on time"

    def post(self, store, prep_result, result):
        store["result"] = result
        store["tries"] = self.tries
        return None


def test_a_hung_exec_fails_with_timeout_error_naming_the_node() -> None:
    node = Hangs()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"Node 'Hangs' exec took longer than .* 0.2s"):
        Flow(start=node).run({})
    assert time.monotonic() - started < 5
    node.release.set()


def test_a_timed_out_try_follows_the_retry_policy_and_the_late_result_is_dropped() -> None:
    node = Hangs(hang_tries=1)
    node.max_retries = 2
    store = Flow(start=node).run({})
    assert store["result"] == "on time" and store["tries"] == 2
    node.release.set()  # the abandoned first try finishes now: its result goes nowhere
    wait_until(lambda: node.late == ["late"], 5)
    assert store["result"] == "on time"


def test_the_environment_default_applies_to_nodes_without_their_own(monkeypatch) -> None:
    class Slow(Node):
        def exec(self, prep_result):
            time.sleep(2)

    monkeypatch.setenv(STEP_TIMEOUT_ENV, "0.1")
    with pytest.raises(TimeoutError):
        Flow(start=Slow()).run({})
    node = Slow()
    node.timeout = 5.0  # the node's own value wins over the default
    assert node.exec_timeout() == 5.0


def test_no_timeout_runs_exec_inline() -> None:
    seen = []

    class Here(Node):
        def exec(self, prep_result):
            seen.append(threading.current_thread())

    Flow(start=Here()).run({})
    assert seen == [threading.current_thread()]


def test_exceptions_cross_the_helper_thread_unchanged() -> None:
    def boom(_):
        raise KeyError("x")

    with pytest.raises(KeyError):
        call_with_timeout(boom, None, 5, "boom")
    assert call_with_timeout(lambda v: v + 1, 1, 5, "add") == 2


@pytest.mark.parametrize(
    ("raw", "expected"), [("", None), ("  ", None), ("2.5", 2.5), (None, None)]
)
def test_step_timeout_setting_parses(raw, expected) -> None:
    env = {} if raw is None else {STEP_TIMEOUT_ENV: raw}
    assert default_step_timeout(env) == expected


@pytest.mark.parametrize("raw", ["abc", "0", "-1"])
def test_a_bad_step_timeout_setting_names_the_variable(raw) -> None:
    with pytest.raises(ValueError, match=STEP_TIMEOUT_ENV):
        default_step_timeout({STEP_TIMEOUT_ENV: raw})
