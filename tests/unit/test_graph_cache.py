"""A worker's graph cache is per thread: concurrent steps of a threads pool never share
node objects (``run_step`` sets ``run_id``/``step``/``attempt`` on them)."""

from __future__ import annotations

import logging
import threading

import pytest

from pocoflow import Flow, Node, register_flow
from pocoflow.distributed.graphs import GraphCache

SHARED = Flow(start=Node(name="shared_node"))
register_flow("cache_fresh", lambda: Flow(start=Node(name="fresh_node")))
register_flow("cache_singleton", lambda: SHARED)


def built_on_threads(cache: GraphCache, name: str, n: int = 3) -> list[Flow]:
    flows: list[Flow] = []
    barrier = threading.Barrier(n)  # all alive at once: thread idents are not reused

    def get() -> None:
        flows.append(cache.get(name)[0])
        barrier.wait(5)

    threads = [threading.Thread(target=get) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    return flows


def test_each_thread_gets_its_own_flow_and_keeps_it() -> None:
    cache = GraphCache()
    flows = built_on_threads(cache, "cache_fresh")
    assert len({id(f.start) for f in flows}) == 3
    flow, graph = cache.get("cache_fresh")
    assert cache.get("cache_fresh") == (flow, graph)  # built once per thread


def test_a_builder_sharing_one_flow_between_threads_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = GraphCache()
    with caplog.at_level(logging.WARNING, logger="pocoflow.distributed.graphs"):
        flows = built_on_threads(cache, "cache_singleton", n=2)
    assert flows == [SHARED, SHARED]
    assert "returned the same Flow object to two threads" in caplog.text
    assert "'cache_singleton'" in caplog.text
