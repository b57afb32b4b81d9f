"""MapNode flows whose items report ``self.item_index`` (issue 7), imported by the test
workers (``POCOFLOW_FLOWS=tests.distributed.index_flows``) and by the test process."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pocoflow import AsyncNode, Flow, MapNode, flow

ITEMS = 16
#: The item whose first attempt fails (retried as attempt 2 on workers).
FLAKY = 3


def answer(node: MapNode, item: str, before: int | None) -> list[Any]:
    """What an item's exec reports, for the test to check outside it (an assert inside
    would only fail the try, which the retry policy absorbs): its value, its index read
    before and after other items ran, the idempotency key the README shows and the
    attempt it ran under."""
    key = f"{node.run_id}/{node.step}/{node.item_index}"
    return [item, before, node.item_index, key, node.attempt]


class Keyed(MapNode):
    """String items (their index is not their value), run side by side on threads."""

    max_retries = 2
    max_parallel = 8

    def prep(self, store: Any) -> list[str]:
        return [f"doc-{i}" for i in range(ITEMS)]

    def exec(self, item: str) -> list[Any]:
        index = self.item_index
        time.sleep(0.05)  # other items run on this process's threads meanwhile
        if index == FLAKY and self.attempt == 1:
            raise ConnectionError("flaky first attempt")
        return answer(self, item, index)

    def post(self, store: Any, items: list[Any], results: list[Any]) -> str:
        store["results"] = results
        return "default"


@flow("item_index")
def item_index_flow() -> Flow:
    return Flow(start=Keyed())


class AsyncKeyed(Keyed, AsyncNode):
    def exec(self, item: str) -> list[Any]:
        """Not Keyed's, which comes first in the MRO: on workers an item runs ``exec``,
        which for an AsyncNode runs ``exec_async``."""
        result: list[Any] = AsyncNode.exec(self, item)
        return result

    async def exec_async(self, item: str) -> list[Any]:
        index = self.item_index
        await asyncio.sleep(0.01)
        return answer(self, item, index)


@flow("item_index_async")
def item_index_async_flow() -> Flow:
    return Flow(start=AsyncKeyed())
