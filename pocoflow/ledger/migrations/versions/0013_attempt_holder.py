"""The claim an attempt row belongs to: two deliveries of one attempt in one process (a
threads pool, a redelivery) share the worker id, so each closes its own row by the
holder token its claim wrote into ``pf_steps.lease_owner`` (G1).

* New: pf_attempts.holder (NULL for rows opened before this revision; those are closed
  by their worker id, as before).

A plain ADD COLUMN (nullable, no default): no rebuild, every row kept.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pf_attempts", sa.Column("holder", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("pf_attempts") as batch:
        batch.drop_column("holder")
