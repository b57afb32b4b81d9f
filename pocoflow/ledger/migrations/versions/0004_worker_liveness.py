"""Worker liveness: one heartbeat row per worker process, and who received a step.

* New: pf_workers (worker_id, host, pid, started_at, beat_at; index on beat_at).
* pf_steps: received_by (+ index): the worker process holding the step's message unstarted.

A new table and a plain ADD COLUMN (nullable, no default): no rebuild, every row kept.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pf_workers",
        sa.Column("worker_id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text),
        sa.Column("pid", sa.Integer),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("beat_at", sa.Float, nullable=False),
    )
    op.create_index("ix_pf_workers_beat_at", "pf_workers", ["beat_at"])
    op.add_column("pf_steps", sa.Column("received_by", sa.Text))
    op.create_index("ix_pf_steps_received_by", "pf_steps", ["received_by"])


def downgrade() -> None:
    op.drop_index("ix_pf_steps_received_by", table_name="pf_steps")
    with op.batch_alter_table("pf_steps") as batch:
        batch.drop_column("received_by")
    op.drop_index("ix_pf_workers_beat_at", table_name="pf_workers")
    op.drop_table("pf_workers")
