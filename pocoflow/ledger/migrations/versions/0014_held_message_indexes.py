"""The received-by indexes hold only the rows a worker process holds: the sweeper's
queries for messages nobody holds (``received_by IS NULL``) no longer walk them.

* pf_steps: ix_pf_steps_received_by (received_by) WHERE received_by IS NOT NULL.
* pf_items: ix_pf_items_received_by (received_by) WHERE received_by IS NOT NULL.
* Data: ``received_by`` cleared on rows no longer queued. A step's claim left it set
  before this revision (an item's always cleared it); it means "holds the message
  unstarted", which a started or finished row no longer is, and it would keep the
  partial index growing with the history.

A full index on ``received_by`` also holds every finished row, where it is NULL. SQLite
chose it for ``received_by IS NULL`` and walked all of them: with 100,000 finished runs'
items in the ledger one sweep's stale-item query took 20 ms instead of 0.2 ms. The
lookups the indexes exist for (``received_by = <worker>``) imply NOT NULL, so both
databases still use the partial ones for them.

The UPDATE and the index rebuilds lock ``pf_steps`` and ``pf_items`` for their length:
on a ledger of millions of steps, upgrade while the workers are stopped (any command that
opens the ledger migrates it, ``pocoflow runs`` for one).

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_HELD = sa.text("received_by IS NOT NULL")
_TABLES = ("pf_steps", "pf_items")


def upgrade() -> None:
    for table in _TABLES:
        name = f"ix_{table}_received_by"
        op.execute(
            f"UPDATE {table} SET received_by = NULL "
            "WHERE received_by IS NOT NULL AND status <> 'queued'"
        )
        op.drop_index(name, table_name=table)
        op.create_index(name, table, ["received_by"], sqlite_where=_HELD, postgresql_where=_HELD)


def downgrade() -> None:
    for table in _TABLES:
        name = f"ix_{table}_received_by"
        op.drop_index(name, table_name=table)
        op.create_index(name, table, ["received_by"])
