"""The broker queue of each step: ``Node.queue`` routes a node's steps to the workers
started with ``--queues <name>``, and a re-send (sweeper, resume) must route the step as
its first send did, from a process that need not have the flow's graph.

* pf_steps: queue (nullable; NULL = the run's queue, as every step before 0007).

A plain ADD COLUMN (nullable, no default): no rebuild, every row kept.

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pf_steps", sa.Column("queue", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("pf_steps") as batch:
        batch.drop_column("queue")
