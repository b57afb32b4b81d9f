"""The public surface is pinned, and the pure core loads no database or broker code."""

from __future__ import annotations

import subprocess
import sys

import pocoflow

EXPECTED = {
    "AsyncNode",
    "BatchFlow",
    "Flow",
    "MapNode",
    "Node",
    "RunHandle",
    "Store",
    "WorkflowDB",
    "attach",
    "flow",
    "register_flow",
    "register_type",
    "set_prices",
}


def test_all_is_pinned():
    assert set(pocoflow.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(pocoflow, name) is not None


def test_02_import_paths_still_work():
    from pocoflow.db import WorkflowDB
    from pocoflow.runner import RunHandle

    assert pocoflow.WorkflowDB is WorkflowDB and pocoflow.RunHandle is RunHandle


def test_core_does_not_load_sqlalchemy_celery_or_redis():
    code = (
        "import sys, pocoflow\n"
        "from pocoflow import Flow, Node, Store\n"
        "class N(Node):\n"
        "    def post(self, s, p, e): s['ok'] = True\n"
        "assert Flow(start=N()).run({})['ok']\n"
        "loaded = [m for m in ('sqlalchemy', 'celery', 'redis', 'kombu', 'pydantic') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
