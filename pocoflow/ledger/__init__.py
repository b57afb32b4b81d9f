"""The ledger: SQLAlchemy Core over SQLite or PostgreSQL, behind ``pocoflow.db.WorkflowDB``.

Modules, one job each: ``engine`` (URL -> pooled engine; the only backend-specific set-up),
``tables`` (the schema, defined once), ``migrate`` + ``migrations/`` (alembic revisions,
run programmatically), ``txn`` (one transaction with lock retries), ``pipeline`` (a
guarded batch; one round trip on PostgreSQL), the queries by table group: ``runs``,
``checkpoints`` (checkpoints + values + the step commit), ``events``, ``steps`` (steps +
attempts), and the facade layers ``client`` (open, plumbing) and ``queue`` (the executor's
step calls) under ``pocoflow.db.WorkflowDB``.
"""

from pocoflow.ledger.errors import (
    LedgerError,
    LedgerLockedError,
    LedgerOpenError,
    SchemaVersionError,
)

__all__ = ["LedgerError", "LedgerLockedError", "LedgerOpenError", "SchemaVersionError"]
