"""Human in the loop: ``pf_signals`` holds the values sent to runs (``RunHandle.send``,
``pocoflow send``) and which step waits for which key (``Node.wait_for``), unique per
(run, key).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pf_signals",
        sa.Column("run_id", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value_json", sa.Text()),
        sa.Column("sent_at", sa.Float()),
        sa.Column("waiting_step", sa.Integer()),
        sa.Column("wait_until", sa.Float()),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "key", name="pk_pf_signals"),
        sa.ForeignKeyConstraint(["run_id"], ["pf_runs.run_id"], name="fk_pf_signals_run_id"),
    )


def downgrade() -> None:
    op.drop_table("pf_signals")
