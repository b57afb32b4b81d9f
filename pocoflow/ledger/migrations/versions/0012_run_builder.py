"""The builder of a run started from the CLI: ``pocoflow resume`` and ``fork`` rebuild its
graph from the ledger instead of asking for ``--flow``.

* New: pf_runs.builder (``MODULE:BUILDER``, NULL for runs not built by the CLI).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pf_runs", sa.Column("builder", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("pf_runs") as batch:
        batch.drop_column("builder")
