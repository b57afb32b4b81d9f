"""What a map step's ``prep`` wrote to the Store, kept for its join.

* pf_joins: prep_store (nullable; NULL = prep wrote nothing, as every join before 0011).

A plain ADD COLUMN (nullable, no default): no rebuild, every row kept.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pf_joins", sa.Column("prep_store", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("pf_joins") as batch:
        batch.drop_column("prep_store")
