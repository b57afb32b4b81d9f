"""Distributed runs: the queue a run's steps go to, the graph shape it started with, and
the broker task id of each attempt.

* pf_runs: queue, graph_shape (JSON text; a G6 refusal names what changed).
* pf_attempts: task_id.

Plain ADD COLUMNs (nullable, no default): no table rebuild, every row kept.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("pf_runs", sa.Column("queue", sa.Text))
    op.add_column("pf_runs", sa.Column("graph_shape", sa.Text))
    op.add_column("pf_attempts", sa.Column("task_id", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("pf_attempts") as batch:
        batch.drop_column("task_id")
    with op.batch_alter_table("pf_runs") as batch:
        batch.drop_column("graph_shape")
        batch.drop_column("queue")
