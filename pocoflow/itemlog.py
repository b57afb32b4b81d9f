"""ItemLog: a local MapNode step's finished items, kept in the ledger as they finish.

Why: a local run with a ledger checkpoints after each node, so a process killed in the
middle of a map step would otherwise run every item of it again on ``Flow.resume``. With
an ItemLog each item whose ``exec`` returned is kept (one ``pf_items`` row, written
once), and the resume of the step runs only the items that have none.

Why a writer thread: an item's thread (or the event loop of an async map) only encodes
its result and queues it; one thread per step writes what has queued up since its last
write in one transaction, so items that finish together share a commit (on SQLite a
commit costs more than the rows it carries) and no item waits for the ledger. An item is
durable once its batch is committed; a crash loses at most the last batch, whose items
run again (at-least-once, G2).

Which kept results a resume takes: those whose item, as codec text, is the item that
``prep`` returned at the same index this time; the others are dropped and run again. An
item or result that the codec cannot carry (G7) is not kept (a warning says so): it runs
again on a resume. A collected or fatal item error is not kept either: on a resume the
item runs again, its tries from the first.

No SQL here: the ledger calls are ``WorkflowDB.keep_items`` / ``kept_items`` /
``drop_items`` (``pocoflow.ledger.localitems``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pocoflow import codec
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB

_log = get_logger("itemlog")

#: Most finished items written in one transaction (a bound on a batch's size in memory).
MAX_BATCH = 500
_STOP = None


class ItemLog:
    """The kept items of one map step of a local run: ``open`` at the start of the map
    (what an earlier attempt kept), ``keep`` from any item thread or the event loop as an
    item finishes, ``close`` once every item is done (flushes, stops the writer)."""

    def __init__(self, db: WorkflowDB, run_id: str, step: int, node_name: str) -> None:
        self.db = db
        self.run_id = run_id
        self.step = step
        self.node_name = node_name
        self._texts: list[str | None] = []
        #: Results an earlier attempt of the step kept, by item index (set by ``open``).
        self.kept: dict[int, Any] = {}
        self._queue: queue.SimpleQueue[tuple[int, str, str] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._warned = False

    def belongs_to(self, run_id: str | None, step: int | None) -> bool:
        return run_id == self.run_id and step == self.step

    def open(self, items: Sequence[Any]) -> dict[int, Any]:
        """The results an earlier attempt of this step kept for these items, by index (an
        item whose value changed since is dropped, and runs again); then start the
        writer for the items that will finish now."""
        self._texts = [self._encode(idx, item, "") for idx, item in enumerate(items)]
        kept = self.kept = {}
        stale: list[int] = []
        for row in self.db.kept_items(self.run_id, self.step):
            idx = row["idx"]
            if idx < len(self._texts) and row["item_json"] == self._texts[idx]:
                try:
                    kept[idx] = codec.decode(row["result_json"], key=f"item {idx} result")
                    continue
                except Exception as exc:  # e.g. its type is not registered any more
                    self._warn(idx, exc)
            stale.append(idx)
        if stale:
            self.db.drop_items(self.run_id, self.step, stale)
        if kept:
            _log.info(
                "Run %s step %d (%s): %d of %d items kept from an earlier attempt",
                self.run_id,
                self.step,
                self.node_name,
                len(kept),
                len(items),
            )
        if len(kept) < len(items):
            self._writer = threading.Thread(
                target=self._write_loop, daemon=True, name=f"pocoflow-items-{self.run_id}"
            )
            self._writer.start()
        return kept

    def keep(self, idx: int, result: Any) -> None:
        """Item ``idx`` finished with ``result``: queue it for the writer (never blocks)."""
        item = self._texts[idx]
        if item is None:
            return
        text = self._encode(idx, result, " result")
        if text is not None:
            self._queue.put((idx, item, text))

    def close(self, *, failing: bool = False) -> None:
        """Write what is queued and stop the writer. A write that failed raises here (the
        step then fails, as when its checkpoint cannot be written), unless the map is
        ``failing`` already: its own error is the one to raise, so this one is logged."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._queue.put(_STOP)
        writer.join()
        error = self._error
        if error is None:
            return
        if failing:
            _log.error("Run %s step %d: finished items not kept: %s", self.run_id, self.step, error)
            return
        raise error

    # ── internals ─────────────────────────────────────────────────────────────

    def _write_loop(self) -> None:
        """Until ``close``: wait for a finished item, take every other one queued by then
        (up to ``MAX_BATCH``) and write them in one transaction. After a failed write the
        rest is drained unwritten, so ``close`` never waits on a dead ledger."""
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stopping = False
        while not stopping:
            first = get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    row = get_nowait()
                except queue.Empty:
                    break
                if row is _STOP:
                    stopping = True
                    break
                batch.append(row)
            if self._error is not None:
                continue
            try:
                self.db.keep_items(self.run_id, self.step, batch)
            except Exception as exc:
                self._error = exc

    def _encode(self, idx: int, value: Any, what: str) -> str | None:
        try:
            return codec.encode(value, key=f"item {idx}{what}")
        except Exception as exc:  # CodecError, or a model's own dump failing
            self._warn(idx, exc)
            return None

    def _warn(self, idx: int, exc: BaseException) -> None:
        """Once per step: say that an item is not kept, and why (G7 names the value)."""
        if self._warned:
            return
        self._warned = True
        _log.warning(
            "Run %s step %d (%s): item %d is not kept in the ledger and runs again on a "
            "resume (%s); later items of the step with the same problem are not reported",
            self.run_id,
            self.step,
            self.node_name,
            idx,
            exc,
        )
