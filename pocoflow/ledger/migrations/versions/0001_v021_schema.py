"""The pocoflow 0.2.1 schema: pf_runs, pf_checkpoints, pf_events.

A 0.2.1 database already has these tables (created by 0.2's own DDL) and is stamped with
this revision instead of running it; constraints are named here so later revisions can
alter them on PostgreSQL (SQLite rebuilds the tables in batch mode instead).

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pf_runs",
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("flow_name", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        sa.Column("started_at", sa.Text, nullable=False),
        sa.Column("completed_at", sa.Text),
        sa.Column("total_steps", sa.Integer),
        sa.Column("current_node", sa.Text),
        sa.Column("error_msg", sa.Text),
        sa.CheckConstraint(
            "status IN ('queued','running','paused','completed','failed')",
            name="ck_pf_runs_status",
        ),
    )
    op.create_table(
        "pf_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("node_name", sa.Text, nullable=False),
        sa.Column("store_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.UniqueConstraint("run_id", "step", name="uq_pf_checkpoints_run_step"),
        sa.ForeignKeyConstraint(["run_id"], ["pf_runs.run_id"], name="fk_pf_checkpoints_run_id"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "pf_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step", sa.Integer),
        sa.Column("node_name", sa.Text),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("action", sa.Text),
        sa.Column("elapsed_ms", sa.Float),
        sa.Column("error_msg", sa.Text),
        sa.Column("ts", sa.Text, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["pf_runs.run_id"], name="fk_pf_events_run_id"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("pf_events")
    op.drop_table("pf_checkpoints")
    op.drop_table("pf_runs")
