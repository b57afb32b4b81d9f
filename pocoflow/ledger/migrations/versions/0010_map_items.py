"""Map items and joins: the distributed fan-out of a MapNode.

* New: pf_items (one row per item: value, status, attempt, lease, outbox, result), with
  a partial index on the active items and an index on ``received_by``.
* New: pf_joins (one row per fanned-out step: total, done counter, ready_at).

New tables only: no existing constraint changes (SQLite cannot alter a CHECK in place).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.create_table(
        "pf_items",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("item_json", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
        sa.Column("try_number", sa.Integer, nullable=False, server_default="1"),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("sent_at", sa.Float),
        sa.Column("queued_at", sa.Float, nullable=False),
        sa.Column("received_by", sa.Text),
        sa.Column("result_json", sa.Text),
        sa.Column("error_json", sa.Text),
        sa.Column("task_id", sa.Text),
        sa.Column("crashes", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("run_id", "step", "idx", name="pk_pf_items"),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed')", name="ck_pf_items_status"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["pf_runs.run_id"], name="fk_pf_items_run_id"),
    )
    op.create_index("ix_pf_items_received_by", "pf_items", ["received_by"])
    op.create_index(
        "ix_pf_items_active",
        "pf_items",
        ["run_id", "lease_expires_at"],
        sqlite_where=_ACTIVE,
        postgresql_where=_ACTIVE,
    )
    op.create_table(
        "pf_joins",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("ready_at", sa.Float),
        sa.Column("sending_by", sa.Text),
        sa.PrimaryKeyConstraint("run_id", "step", name="pk_pf_joins"),
        sa.ForeignKeyConstraint(["run_id"], ["pf_runs.run_id"], name="fk_pf_joins_run_id"),
    )


def downgrade() -> None:
    op.drop_table("pf_joins")
    op.drop_index("ix_pf_items_active", table_name="pf_items")
    op.drop_index("ix_pf_items_received_by", table_name="pf_items")
    op.drop_table("pf_items")
