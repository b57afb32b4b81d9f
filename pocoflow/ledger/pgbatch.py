"""A batch of statements sent to PostgreSQL in one write and read back in one go.

psycopg's pipeline mode sends each statement the moment it is queued: a write and two
polls per statement, and a server process woken once per statement. A step's claim and
commit are about 16 statements, so that cost more client and server CPU than the
statements themselves (measured: 8 small statements took 424 us of client and 283 us
of server CPU through psycopg's pipeline, 53 us and 157 us sent as here). This module
queues the whole batch in libpq's pipeline mode (psycopg's ``pq`` layer), sends it with
one flush after its Sync and reads every result back, with psycopg's own adaptation
(``Transformer``) both ways, so values go and come as psycopg would send and load them.

Each statement is prepared once per connection (named ``pf_<n>``) and then only bound
and executed, as psycopg does after its prepare threshold.
"""

from __future__ import annotations

import select
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import errors, pq
from psycopg.adapt import PyFormat, Transformer

_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


class _Prepared:
    """A connection's prepared statements: (SQL, parameter types) -> name. Names are
    never reused: a prepare whose batch failed may or may not have run."""

    __slots__ = ("count", "names")

    def __init__(self) -> None:
        self.names: dict[tuple[bytes, tuple[int, ...]], bytes] = {}
        self.count = 0

    def new_name(self) -> bytes:
        self.count += 1
        return f"pf_{self.count}".encode()


_PREPARED: weakref.WeakKeyDictionary[Any, _Prepared] = weakref.WeakKeyDictionary()


class Command(NamedTuple):
    """One statement: its SQL with ``$n`` placeholders, its values in that order, and
    whether its rows are wanted."""

    sql: bytes
    values: Sequence[Any] = ()
    reads: bool = False


class Outcome(NamedTuple):
    """What one command did: its row count and, if it asked, its rows (tuples)."""

    rowcount: int
    rows: list[tuple[Any, ...]] | None


def run(raw: psycopg.Connection[Any], commands: Sequence[Command]) -> list[Outcome]:
    """Run ``commands`` in one pipeline on ``raw`` (in autocommit: the batch brings its
    own BEGIN and COMMIT if it wants a transaction). Returns an outcome per command, or
    raises the first error the server reported (as psycopg raises it: its SQLSTATE
    class, its diagnostics); the commands after it were not run. A failure of the link
    raises ``psycopg.OperationalError``; so does anything that stops a batch half sent
    or half read (a value psycopg cannot adapt, an interrupt), after closing the link,
    which cannot be used again in that state."""
    with raw.lock:
        pgconn = raw.pgconn
        tx = Transformer(raw)
        prepared = _PREPARED.get(raw)
        if prepared is None:
            prepared = _PREPARED[raw] = _Prepared()
        added: list[tuple[bytes, tuple[int, ...]]] = []
        pgconn.enter_pipeline_mode()
        try:
            kinds = _send(pgconn, tx, commands, prepared, added)
            outcomes, failure, unprepared = _receive(pgconn, tx, commands, kinds, raw.info.encoding)
            pgconn.exit_pipeline_mode()
        except BaseException:
            pgconn.finish()
            raise
        if failure is None:
            return outcomes
        # A prepare that failed or never ran (after the failure) is prepared afresh next
        # time; one that ran stays: the session keeps it whatever the transaction did.
        for key in (added[n] for n in unprepared):
            prepared.names.pop(key, None)
        if isinstance(failure, errors.InvalidSqlStatementName):
            # Deallocated under us (psycopg's DEALLOCATE ALL after a rollback, a
            # DISCARD ALL): none of this connection's names can be trusted. The ledger
            # retries the transaction (``errors.is_lost_statement``).
            prepared.names.clear()
        raise failure


#: What a result in the pipeline answers: a prepare, or the command at this index.
_PREPARE = -1


def _send(
    pgconn: Any,
    tx: Any,
    commands: Sequence[Command],
    prepared: _Prepared,
    added: list[tuple[bytes, tuple[int, ...]]],
) -> list[int]:
    kinds: list[int] = []
    for index, command in enumerate(commands):
        if not command.values and command.sql in (b"BEGIN", b"COMMIT"):
            pgconn.send_query_params(command.sql, None)
            kinds.append(index)
            continue
        values = tx.dump_sequence(command.values, [PyFormat.AUTO] * len(command.values))
        key = (command.sql, tuple(tx.types or ()))
        name = prepared.names.get(key)
        if name is None:
            name = prepared.names[key] = prepared.new_name()
            added.append(key)
            pgconn.send_prepare(name, command.sql, param_types=key[1])
            kinds.append(_PREPARE)  # the n-th prepare answers for added[n]
        pgconn.send_query_prepared(name, values, param_formats=tx.formats)
        kinds.append(index)
    pgconn.pipeline_sync()
    # 1: more to send once the socket takes it. Results are read meanwhile: a server
    # whose replies are not read stops reading in turn (a long batch would deadlock).
    while pgconn.flush():
        if _wait(pgconn, write=True):
            pgconn.consume_input()
    return kinds


def _receive(
    pgconn: Any, tx: Any, commands: Sequence[Command], kinds: list[int], encoding: str
) -> tuple[list[Outcome], psycopg.Error | None, list[int]]:
    """Every result up to the batch's Sync: the outcome of each command, or the first
    error (the commands after it come back aborted), and which of the batch's prepares
    (by order) did not prepare their statement."""
    outcomes: list[Outcome] = []
    failure: psycopg.Error | None = None
    unprepared: list[int] = []
    prepares = 0
    pending = iter(kinds)
    while True:
        result = _next_result(pgconn)
        if result is None:  # the end of one command's results
            continue
        status = result.status
        if status == pq.ExecStatus.PIPELINE_SYNC:
            break
        kind = next(pending, None)
        if kind == _PREPARE:
            if status != pq.ExecStatus.COMMAND_OK:
                unprepared.append(prepares)
            prepares += 1
        if status in _OK:
            if kind is not None and kind != _PREPARE:
                rows = None
                if commands[kind].reads:
                    tx.set_pgresult(result)
                    rows = tx.load_rows(0, result.ntuples, tuple)
                count = result.command_tuples
                outcomes.append(Outcome(count if count is not None else result.ntuples, rows))
        elif status == pq.ExecStatus.FATAL_ERROR and failure is None:
            failure = errors.error_from_result(result, encoding=encoding)
        # PIPELINE_ABORTED: a command after the failure, not run
    if failure is None and len(outcomes) != len(commands):  # pragma: no cover
        failure = psycopg.InternalError(
            f"a batch of {len(commands)} commands returned {len(outcomes)} results"
        )
    return outcomes, failure, unprepared


def _next_result(pgconn: Any) -> Any:
    while pgconn.is_busy():
        _wait(pgconn, write=False)
        pgconn.consume_input()
    return pgconn.get_result()


def _wait(pgconn: Any, *, write: bool) -> bool:
    """Block until the socket can be read, or (``write``) written; True when it can be
    read. A link cut half-open is bounded by the connection's keepalives and
    ``tcp_user_timeout`` (``engine``), as psycopg's own waits are."""
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN | (select.POLLOUT if write else 0))
    return any(events & (select.POLLIN | select.POLLERR | select.POLLHUP)
               for _fd, events in poller.poll())  # fmt: skip
