"""Flows for the fault tests and the chaos runner (``POCOFLOW_FLOWS=tests.distributed.
fault_flows``): the flows of ``tests.distributed.flows`` plus nodes that run long, kill
their own worker at a chosen point, or crash it every time (poison).

A fault a test cannot reach from outside (a worker dying between its commit and its
publish) is armed by the node itself, in the worker process that runs it, and fires in
that process: ``POCOFLOW_TEST_FAULTS=1`` (set in the workers' environment only) wraps
``Publisher.send`` so a worker armed by ``ArmDeath`` kills its whole node (main process
and pool, as a lost machine) just before it publishes the successor of the armed step.
The wrap is installed only in test workers, never in the test process.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from typing import Any

from pocoflow import Flow, Node, flow
from tests.distributed.flows import Increment, _append, _side

FAULTS_ENV = "POCOFLOW_TEST_FAULTS"

#: (run id, step) whose publish kills this worker node; set by ArmDeath in this process.
_die_before_publishing: tuple[str, int] | None = None


def kill_my_worker_node() -> None:
    """kill -9 of the worker node this process belongs to (its process group)."""
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _install() -> None:
    from pocoflow.distributed.publish import Publisher

    send = Publisher.send

    def send_or_die(self: Publisher, message: Any, **kwargs: Any) -> bool:
        armed = _die_before_publishing
        if armed is not None and armed == (message.run_id, message.step):
            kill_my_worker_node()
        return send(self, message, **kwargs)

    Publisher.send = send_or_die  # type: ignore[method-assign]


if os.environ.get(FAULTS_ENV) == "1":
    _install()


class Long(Node):
    """An exec that runs ``store["long_s"]`` seconds (healthy, just long); one side-file
    line per exec."""

    def prep(self, store: Any) -> Any:
        return float(store["long_s"]), _side(store, f"{self.run_id}.long")

    def exec(self, prep_result: Any) -> float:
        seconds, side = prep_result
        _append(side, f"{self.step} {self.attempt} {os.getpid()}")
        time.sleep(seconds)  # the work itself: a long call, not a synchronisation
        return seconds

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["long"] = exec_result
        store["count"] += 1
        return "default"


@flow("long")
def long_flow() -> Flow:
    """Increment -> Long -> Increment."""
    first, long, last = Increment(name="before"), Long(), Increment(name="after")
    first.then("default", long)
    long.then("default", last)
    return Flow(start=first)


class ArmDeath(Node):
    """On its first attempt, arms this worker to die right after committing this step,
    before publishing the next one (see the module docstring)."""

    def exec(self, prep_result: Any) -> None:
        global _die_before_publishing
        if self.attempt == 1 and os.environ.get(FAULTS_ENV) == "1":
            _die_before_publishing = (self.run_id, self.step + 1)

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["armed"] = store.get("armed", 0) + 1
        return "default"


@flow("die_before_publish")
def die_before_publish_flow() -> Flow:
    """Increment -> ArmDeath -> Increment -> Increment."""
    nodes = [Increment(name="first"), ArmDeath(), Increment(name="third"), Increment(name="last")]
    for a, b in itertools.pairwise(nodes):
        a.then("default", b)
    return Flow(start=nodes[0])


class Poison(Node):
    """Kills the process running it, every time (a segfault, the OOM killer)."""

    def exec(self, prep_result: Any) -> None:
        if os.environ.get(FAULTS_ENV) == "1":
            os.kill(os.getpid(), signal.SIGKILL)

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["poisoned"] = True
        return "default"


@flow("poison_kill")
def poison_kill_flow() -> Flow:
    """Increment -> Poison -> Increment (SIGKILL; recovery_flows has the os._exit one)."""
    first, poison, last = Increment(name="before"), Poison(), Increment(name="after")
    first.then("default", poison)
    poison.then("default", last)
    return Flow(start=first)


class Nap(Node):
    """count += 1 after ``store["nap_s"]`` seconds: chains that stay in flight long
    enough for the chaos runner's faults to hit them."""

    def prep(self, store: Any) -> Any:
        return store["count"], float(store.get("nap_s", 0.05))

    def exec(self, prep_result: Any) -> int:
        count, seconds = prep_result
        time.sleep(seconds)  # the work itself
        return count + 1

    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["count"] = exec_result
        store["trail"] = [*store.get("trail", []), self.name]
        return "default"


NAP_CHAIN = 10


@flow("nap_chain")
def nap_chain_flow() -> Flow:
    """NAP_CHAIN Nap nodes in a row."""
    nodes = [Nap(name=f"nap{i}") for i in range(NAP_CHAIN)]
    for a, b in itertools.pairwise(nodes):
        a.then("default", b)
    return Flow(start=nodes[0], max_steps=100)
