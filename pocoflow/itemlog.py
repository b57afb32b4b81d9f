"""ItemLog: a local MapNode step's finished items, kept in the ledger as they finish.

Why: a local run with a ledger checkpoints after each node, so a process killed in the
middle of a map step would otherwise run every item of it again on ``Flow.resume``. With
an ItemLog each item whose ``exec`` returned is kept (one ``pf_items`` row), and the
resume of the step runs only the items that have none.

Why a writer thread: an item's thread (or the event loop of an async map) only encodes
its result and queues it; one thread per step, started by the first item that finishes,
writes what has queued up since its last write in one transaction, so items that finish
together share a commit (on SQLite a commit costs more than the rows it carries) and no
item waits for the ledger. An item is durable once its batch is committed; a crash loses
at most the last batch, whose items run again (at-least-once, G2).

Best effort: the step's checkpoint is what makes a map's outcome durable, so a write
that fails only costs a resume some re-runs. It is logged as a warning, its rows go
with the next batch (or a last try at ``close``), and the map never fails for it.

Which kept results a resume takes: a row is found by its item (a digest of the item's
codec text, stored instead of the text), wherever that item now is in ``prep``'s list:
the same items in another order (``list(set(...))`` under another hash seed) run no
exec again. Only a step that can have kept rows reads them (``may_have_kept``: the
first step of a resume, a step that runs again after ``wait_for``); a fresh run's steps
do not pay for the read. An item or result that the codec cannot carry (G7) is not kept
(a warning says so): it runs again on a resume. A collected or fatal item error is not
kept either: on a resume the item runs again, its tries from the first.

How the log reaches the node: ``Flow`` sets it for the step (``CURRENT``), a context
variable, and ``MapNode.map_items`` takes it (``take``) if it is its own node's: two
runs of one Flow object at once each see their own log.

No SQL here: the ledger calls are ``WorkflowDB.keep_items`` / ``kept_items`` /
``drop_items_from`` (``pocoflow.ledger.localitems``).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from pocoflow import codec
from pocoflow.logging import get_logger

if TYPE_CHECKING:
    from pocoflow.db import WorkflowDB
    from pocoflow.node import Node

_log = get_logger("itemlog")

#: Most newly finished items written in one transaction (a bound on a batch's size in
#: memory; rows of a failed write go again with the next batch on top).
MAX_BATCH = 500
_STOP = None

#: The item log of the map step running in this context (set by ``Flow`` for the step).
CURRENT: ContextVar[ItemLog | None] = ContextVar("pocoflow_item_log", default=None)


def take(node: Node) -> ItemLog | None:
    """The log of ``node``'s step in this context, once: None for another node (an inner
    node of a sub-flow, a MapNode called from another node) or a second call."""
    log = CURRENT.get()
    if log is None or log.node is not node or log.taken:
        return None
    log.taken = True
    return log


def digest(text: str) -> str:
    """What a row stores of its item: enough to tell it from another item, not its text
    (an item of 10 KB would cost its size per row and per resume)."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


Row = tuple[int, str, str]  # (idx, item digest, result codec text)
_KEY = "item"  # what the codec's messages name; cut off again by ``_why``


def _why(exc: BaseException) -> str:
    """A codec error's reason without the "Store key" it names: an item is no Store key."""
    return str(exc).removeprefix(f"Store key {_KEY!r}: ")


class ItemLog:
    """The kept items of one map step of a local run: ``open`` at the start of the map
    (what an earlier attempt kept), ``keep`` from any item thread or the event loop as an
    item finishes, ``close`` once every item is done (flushes, stops the writer); ``flush``
    when the map holds for a pause."""

    def __init__(
        self, db: WorkflowDB, run_id: str, step: int, node: Node, *, may_have_kept: bool
    ) -> None:
        self.db = db
        self.run_id = run_id
        self.step = step
        self.node = node
        self.may_have_kept = may_have_kept
        self.taken = False
        self._items: Sequence[Any] = ()
        self._scope = ""
        self._digests: list[str | None] | None = None  # computed by open only on a resume
        #: Results an earlier attempt of the step kept, by item index (set by ``open``).
        self.kept: dict[int, Any] = {}
        self._queue: queue.SimpleQueue[Row | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._warned = False

    def open(self, items: Sequence[Any], scope: str = "") -> dict[int, Any]:
        """The results an earlier attempt of this step kept for these items, by index: a
        kept row serves an equal item wherever it is now. Rows found at another index
        are written again at the new one (before any new result), and rows past the end
        of the list go, so the rows follow the list. Nothing is read for a step that
        cannot have kept rows.

        ``scope``: what else an item's result depends on (a parallel BatchFlow's pass
        runs on the Store its batch's ``prep`` left, which a resume's ``prep`` may leave
        otherwise); folded into every item's digest, so a row kept under another scope
        serves no item."""
        self._items = items
        self._scope = scope
        self.kept = {}
        if not self.may_have_kept:
            return self.kept
        try:
            rows = self.db.kept_items(self.run_id, self.step)
        except Exception as exc:  # best effort: every item runs
            self._warn_write(f"could not read the items kept by an earlier attempt ({exc})")
            return self.kept
        if not rows:
            return self.kept
        self._digests = [self._digest(idx, item) for idx, item in enumerate(items)]
        self.kept = self._match(rows)
        if rows[-1]["idx"] >= len(items):
            try:
                self.db.drop_items_from(self.run_id, self.step, len(items))
            except Exception as exc:  # they only take space: matched by item, not index
                self._warn_write(f"could not drop kept items past the list's end ({exc})")
        if self.kept:
            _log.info(
                "Run %s step %d (%s): %d of %d items kept from an earlier attempt",
                self.run_id,
                self.step,
                self.node.name,
                len(self.kept),
                len(items),
            )
        return self.kept

    def keep(self, idx: int, result: Any) -> None:
        """Item ``idx`` finished with ``result``: queue it for the writer (never blocks)."""
        item = self._digests[idx] if self._digests is not None else self._item_digest(idx)
        if item is None:
            return
        text = self._encode(idx, result, "its result")
        if text is not None:
            self._put((idx, item, text))

    def close(self) -> None:
        """Write what is queued and stop the writer. Never raises: rows that could not
        be written are logged (their items run again on a resume)."""
        self.flush()

    def flush(self) -> None:
        """Write what is queued now and wait for it (a map held by a pause: what finished
        is durable while no item runs); a later ``keep`` starts a writer again. Never
        raises, as ``close``."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._queue.put(_STOP)
        writer.join()

    # ── internals ─────────────────────────────────────────────────────────────

    def _match(self, rows: list[dict[str, Any]]) -> dict[int, Any]:
        """Each item index -> a kept row of an equal item: the row at its own index if
        that one is, else any other unused one; moved rows are queued at the new index."""
        assert self._digests is not None
        by_item: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_item.setdefault(row["item_json"], []).append(row)
        at = {row["idx"]: row for row in rows}
        used: set[int] = set()
        chosen: dict[int, dict[str, Any]] = {}
        for idx, item in enumerate(self._digests):
            here = at.get(idx)
            if item is not None and here is not None and here["item_json"] == item:
                chosen[idx] = here
                used.add(idx)
        for idx, item in enumerate(self._digests):
            if item is None or idx in chosen:
                continue
            for row in by_item.get(item, ()):
                if row["idx"] not in used:
                    chosen[idx] = row
                    used.add(row["idx"])
                    break
        kept: dict[int, Any] = {}
        for idx, row in sorted(chosen.items()):
            try:
                kept[idx] = codec.decode(row["result_json"], key=_KEY)
            except Exception as exc:  # e.g. its type is not registered any more
                self._warn(idx, f"its kept result cannot be read back: {_why(exc)}")
                continue
            if row["idx"] != idx:
                self._put((idx, row["item_json"], row["result_json"]))
        return kept

    def _put(self, row: Row) -> None:
        if self._writer is None:
            with self._start_lock:  # items of a threads map finish at once
                if self._writer is None:
                    self._writer = threading.Thread(
                        target=self._write_loop,
                        daemon=True,
                        name=f"pocoflow-items-{self.run_id}",
                    )
                    self._writer.start()
        self._queue.put(row)

    def _write_loop(self) -> None:
        """Until ``close``: wait for a finished item, take every other one queued by then
        (up to ``MAX_BATCH``) and write them in one transaction. Rows of a failed write
        go again with the next one; what is still unwritten after the last try at the
        stop is logged."""
        get, get_nowait = self._queue.get, self._queue.get_nowait
        unwritten: list[Row] = []
        stopping = False
        while not stopping:
            first = get()
            stopping = first is _STOP
            batch = list(unwritten)
            if first is not _STOP:
                batch.append(first)
            while not stopping and len(batch) < len(unwritten) + MAX_BATCH:
                try:
                    row = get_nowait()
                except queue.Empty:
                    break
                if row is _STOP:
                    stopping = True
                else:
                    batch.append(row)
            if not batch:
                continue
            try:
                self.db.keep_items(self.run_id, self.step, batch)
            except Exception as exc:
                unwritten = batch
                if stopping:
                    self._warn_write(
                        f"{len(batch)} finished items not kept, they run again on a resume ({exc})"
                    )
                else:
                    self._warn_write(f"writing finished items failed, trying again ({exc})")
            else:
                unwritten = []

    def _item_digest(self, idx: int) -> str | None:
        try:
            item = self._items[idx]
        except IndexError:
            return None
        return self._digest(idx, item)

    def _digest(self, idx: int, item: Any) -> str | None:
        text = self._encode(idx, item, "the item")
        return None if text is None else digest(self._scope + text)

    def _encode(self, idx: int, value: Any, what: str) -> str | None:
        try:
            return codec.encode(value, key=_KEY)
        except Exception as exc:  # CodecError, or a model's own dump failing
            self._warn(idx, f"the codec cannot carry {what}: {_why(exc)}")
            return None

    def _warn(self, idx: int, why: str) -> None:
        """Once per step: say that an item is not kept, and why (G7 names the value)."""
        if self._warned:
            return
        self._warned = True
        _log.warning(
            "Run %s step %d (%s): item %d is not kept in the ledger and runs again on a "
            "resume (%s); later items of the step with the same problem are not reported",
            self.run_id,
            self.step,
            self.node.name,
            idx,
            why,
        )

    def _warn_write(self, what: str) -> None:
        """A ledger call of the log failed: the map goes on (its checkpoint counts)."""
        _log.warning("Run %s step %d (%s): %s", self.run_id, self.step, self.node.name, what)
