"""Flows whose deliveries crash in the executor, not in the node (issue 7): a Store or a
map item holds a value that was encoded fine but cannot be decoded, so every worker that
loads it fails the same way. The test workers import this module
(``POCOFLOW_FLOWS=...,tests.distributed.crash_flows``) and so does the test process,
which builds the undecodable value with ``unloadable()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pocoflow import Flow, MapNode, Node, flow
from pocoflow.codec import register_type

#: The text ``Checked`` refuses to be built with.
REFUSED_TEXT = "refused"


@register_type
@dataclass
class Checked:
    """A registered value with a check of its own in ``__post_init__``. Changed after it
    was built, it is encoded as it is, and then refused by every decode: a value a
    worker can never load (as a newer release's validation would refuse old data)."""

    text: str

    def __post_init__(self) -> None:
        if self.text == REFUSED_TEXT:
            raise ValueError(f"Checked text may not be {REFUSED_TEXT!r}")


def unloadable() -> Checked:
    """A ``Checked`` that encodes fine and that no process can decode."""
    value = Checked("fine")
    value.text = REFUSED_TEXT
    return value


class Touch(Node):
    def post(self, store: Any, prep_result: Any, exec_result: Any) -> str:
        store["touched"] = [*store.get("touched", []), self.name]
        return "default"


@flow("crash_store")
def crash_store_flow() -> Flow:
    """Two plain nodes; submitted with ``unloadable()`` in its Store, its first step can
    never load the Store."""
    first = Touch(name="load")
    first.then("default", Touch(name="after"))
    return Flow(start=first)


class CheckedItems(MapNode):
    """items: ``Checked("a")``, ``unloadable()``, ``Checked("c")``: item 1 can never be
    decoded by the worker that claims it."""

    def prep(self, store: Any) -> list[Checked]:
        return [Checked("a"), unloadable(), Checked("c")]

    def exec(self, item: Checked) -> str:
        return item.text.upper()

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["results"] = results
        return "default"


@flow("crash_item")
def crash_item_flow() -> Flow:
    return Flow(start=CheckedItems(name="checked"))
