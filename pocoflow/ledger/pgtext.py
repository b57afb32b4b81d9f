"""The ledger's text encoding on PostgreSQL: a NUL byte (``\\x00``) is written as the four
characters ``\\x00``.

PostgreSQL's text columns cannot hold NUL, and psycopg refuses any string with one
(``DataError``). Much of what the ledger writes is user text: a node's exception message,
a model name given to ``report_usage``, an event's text. Refused, such a write turned a
node's own failure into a "crash of the executor" that spent the crash budget and failed
the run blaming the worker. So every string parameter of every statement, through
SQLAlchemy or the batch pipeline (``pipeline.py``), goes through the dumpers here,
registered on each connection the engine opens (``engine._postgres_engine``). SQLite
stores NUL as it is. The ledger's own encoded values (``codec``: JSON) never hold a raw
NUL, so they are unchanged.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.string import StrBinaryDumper, StrDumperUnknown

NUL = "\x00"
#: What a NUL byte is stored as: readable, and what ``repr`` would show.
ESCAPED_NUL = "\\x00"


def escape_nul(text: str) -> str:
    """``text`` without NUL bytes, each written as ``\\x00``."""
    return text.replace(NUL, ESCAPED_NUL) if NUL in text else text


class _NulFreeText(StrDumperUnknown):
    """psycopg's default string dumper (text format, type inferred by the server)."""

    def dump(self, obj: str) -> Any:
        return super().dump(escape_nul(obj))


class _NulFreeBinaryText(StrBinaryDumper):
    def dump(self, obj: str) -> Any:
        return super().dump(escape_nul(obj))


def register(dbapi_connection: Any, _record: Any = None) -> None:
    """Make the psycopg connection write strings NUL-free (an engine ``connect`` hook)."""
    dbapi_connection.adapters.register_dumper(str, _NulFreeText)
    dbapi_connection.adapters.register_dumper(str, _NulFreeBinaryText)
