"""The plumbing every ledger facade shares: open (engine, migration), one transaction per
call with lock retries, driver errors turned into messages naming the run and database."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from pocoflow.ledger import txn
from pocoflow.ledger.engine import DEFAULT_BUSY_TIMEOUT_S, mask_url, resolve_url, shared_engine
from pocoflow.ledger.errors import LedgerOpenError, is_fk_violation
from pocoflow.ledger.migrate import ensure_schema

T = TypeVar("T")


class LedgerClient:
    """Opens the database behind ``path_or_url`` (see ``WorkflowDB``) and runs calls on it."""

    def __init__(
        self,
        path_or_url: str | os.PathLike[str],
        *,
        synchronous: str | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        url = resolve_url(path_or_url)
        self._ledger = shared_engine(url, synchronous=synchronous, busy_timeout_s=busy_timeout)
        self._dialect = self._ledger.dialect
        #: The SQLite file (0.2 attribute), None on PostgreSQL.
        self.db_path: Path | None = (
            Path(url.database) if self._dialect == "sqlite" and url.database else None
        )
        try:
            ensure_schema(self._ledger)
        except DBAPIError as exc:
            raise LedgerOpenError(
                f"Cannot open the ledger database {self._ledger.label}: {exc.orig}"
            ) from exc

    # ── identity ──────────────────────────────────────────────────────────────

    @property
    def url(self) -> str:
        """The database URL with any password masked: safe to print and log."""
        return mask_url(self._ledger.url)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._dialect

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def close(self) -> None:
        """Close pooled connections now (others on this database reconnect on next use)."""
        self._ledger.dispose()

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ── plumbing ──────────────────────────────────────────────────────────────

    def _read(self, fn: Callable[[Connection], T], run_id: str | None = None) -> T:
        return txn.run(self._ledger, fn, write=False, what="reading", run_id=run_id)

    def _write(
        self,
        fn: Callable[[Connection], T],
        what: str,
        run_id: str | None,
        *,
        confirm: Callable[[Connection, T], T] | None = None,
        batched: bool = False,
        grouped: bool = False,
    ) -> T:
        """A write transaction; a row naming a run ``pf_runs`` lacks -> ``KeyError``.
        ``confirm``: see ``txn.run`` (a COMMIT whose outcome was lost); ``batched``: ``fn``
        starts with a ``pipeline`` batch, which then carries the BEGIN (``txn.run``);
        ``grouped``: it may share an SQLite transaction with other threads' (``txn.run``)."""
        try:
            return txn.run(
                self._ledger,
                fn,
                write=True,
                what=what,
                run_id=run_id,
                confirm=confirm,
                batched=batched,
                grouped=grouped,
            )
        except IntegrityError as exc:
            if run_id is not None and is_fk_violation(exc):
                raise self._unknown_run(run_id) from None
            raise

    def _unknown_run(self, run_id: str) -> KeyError:
        """What a write naming a run ``pf_runs`` lacks raises."""
        return KeyError(
            f"Unknown run id {run_id!r} in ledger {self._ledger.label}: create_run() it first"
        )
