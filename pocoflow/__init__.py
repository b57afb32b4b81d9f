"""PocoFlow: LLM workflows as graphs of prep -> exec -> post nodes, run on one laptop or
across many Celery workers, recorded step by step in an SQL ledger.

The pure core (Store, Node, Flow) loads no database or broker code; ``WorkflowDB`` and
``attach`` import SQLAlchemy only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pocoflow.batchflow import BatchFlow
from pocoflow.codec import register_type
from pocoflow.flow import Flow
from pocoflow.mapnode import MapNode
from pocoflow.node import AsyncNode, Node
from pocoflow.registry import flow, register_flow
from pocoflow.runner import RunHandle
from pocoflow.store import Store
from pocoflow.usage import set_prices

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from pocoflow.distributed.client import attach

__all__ = [
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
]
__version__ = "0.3.0.dev0"


def __getattr__(name: str) -> Any:
    if name == "WorkflowDB":
        from pocoflow.db import WorkflowDB

        return WorkflowDB
    if name == "attach":
        from pocoflow.distributed.client import attach

        return attach
    raise AttributeError(f"module 'pocoflow' has no attribute {name!r}")
