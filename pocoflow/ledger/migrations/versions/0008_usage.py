"""Usage and budgets: one row per ``report_usage`` call, and a run's budget.

* New: pf_usage (run_id, step, attempt, node_name, item, model, input_tokens,
  output_tokens, cost_usd, ts; index on (run_id, node_name)).
* pf_runs: max_tokens, max_cost_usd (nullable: NULL = no limit).

A new table and plain ADD COLUMNs (nullable, no default): no rebuild, every row kept.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pf_usage",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step", sa.Integer),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("node_name", sa.Text, nullable=False),
        sa.Column("item", sa.Integer),
        sa.Column("model", sa.Text),
        sa.Column("input_tokens", sa.Integer, nullable=False),
        sa.Column("output_tokens", sa.Integer, nullable=False),
        sa.Column("cost_usd", sa.Float),
        sa.Column("ts", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["pf_runs.run_id"], name="fk_pf_usage_run_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_pf_usage_run_id", "pf_usage", ["run_id", "node_name"])
    op.add_column("pf_runs", sa.Column("max_tokens", sa.Integer))
    op.add_column("pf_runs", sa.Column("max_cost_usd", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("pf_runs") as batch:
        batch.drop_column("max_cost_usd")
        batch.drop_column("max_tokens")
    op.drop_index("ix_pf_usage_run_id", table_name="pf_usage")
    op.drop_table("pf_usage")
