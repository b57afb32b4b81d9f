"""0.3 additions: run control and lineage, delta checkpoints, steps, leases and attempts.

* pf_runs: fingerprint, max_steps, store_name, control, parent_run_id, forked_from_step,
  updated_at; status also allows waiting and cancelled; index on started_at.
* pf_checkpoints: next_node, action, manifest; store_json becomes nullable (new rows keep
  their values in pf_values).
* pf_events: attempt; index on (run_id, id).
* New: pf_values, pf_steps, pf_attempts.

SQLite cannot alter a CHECK constraint or a column's nullability, so pf_runs and
pf_checkpoints are rebuilt in batch mode from the 0001 definitions below (``copy_from``:
a 0.2.1 file has the same columns but unnamed constraints, which reflection would lose).
Every row is copied.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_V1_STATUSES = "status IN ('queued','running','paused','completed','failed')"
_V2_STATUSES = "status IN ('queued','running','paused','waiting','completed','failed','cancelled')"
_CONTROLS = "control IS NULL OR control IN ('cancel','pause')"
_STEP_STATUSES = "status IN ('queued','running','committed','failed')"
_RUN_COLUMNS = (
    ("fingerprint", sa.Text),
    ("max_steps", sa.Integer),
    ("store_name", sa.Text),
    ("control", sa.Text),
    ("parent_run_id", sa.Text),
    ("forked_from_step", sa.Integer),
    ("updated_at", sa.Text),
)
_CHECKPOINT_COLUMNS = (("next_node", sa.Text), ("action", sa.Text), ("manifest", sa.Text))


def _runs_0001() -> sa.Table:
    return sa.Table(
        "pf_runs",
        sa.MetaData(),
        sa.Column("run_id", sa.Text, primary_key=True),
        sa.Column("flow_name", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        sa.Column("started_at", sa.Text, nullable=False),
        sa.Column("completed_at", sa.Text),
        sa.Column("total_steps", sa.Integer),
        sa.Column("current_node", sa.Text),
        sa.Column("error_msg", sa.Text),
        sa.CheckConstraint(_V1_STATUSES, name="ck_pf_runs_status"),
    )


def _checkpoints_0001() -> sa.Table:
    meta = sa.MetaData()
    sa.Table("pf_runs", meta, sa.Column("run_id", sa.Text, primary_key=True))
    return sa.Table(
        "pf_checkpoints",
        meta,
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


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["run_id"], ["pf_runs.run_id"], name=f"fk_{table}_run_id")


def upgrade() -> None:
    with op.batch_alter_table("pf_runs", copy_from=_runs_0001()) as batch:
        for name, type_ in _RUN_COLUMNS:
            batch.add_column(sa.Column(name, type_))
        batch.drop_constraint("ck_pf_runs_status", type_="check")
        batch.create_check_constraint("ck_pf_runs_status", sa.text(_V2_STATUSES))
        batch.create_check_constraint("ck_pf_runs_control", sa.text(_CONTROLS))
    op.create_index("ix_pf_runs_started_at", "pf_runs", ["started_at"])

    with op.batch_alter_table("pf_checkpoints", copy_from=_checkpoints_0001()) as batch:
        batch.alter_column("store_json", existing_type=sa.Text, nullable=True)
        for name, type_ in _CHECKPOINT_COLUMNS:
            batch.add_column(sa.Column(name, type_))

    op.add_column("pf_events", sa.Column("attempt", sa.Integer))
    op.create_index("ix_pf_events_run_id", "pf_events", ["run_id", "id"])

    op.create_table(
        "pf_values",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("value_json", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", "key", name="pk_pf_values"),
        _run_fk("pf_values"),
    )
    op.create_table(
        "pf_steps",
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="queued"),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
        sa.Column("lease_owner", sa.Text),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("sent_at", sa.Float),
        sa.Column("task_id", sa.Text),
        sa.Column("queued_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "step", name="pk_pf_steps"),
        sa.CheckConstraint(_STEP_STATUSES, name="ck_pf_steps_status"),
        _run_fk("pf_steps"),
    )
    op.create_index("ix_pf_steps_status_lease", "pf_steps", ["status", "lease_expires_at"])
    op.create_table(
        "pf_attempts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.Text, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("worker", sa.Text),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("outcome", sa.Text),
        sa.Column("error_msg", sa.Text),
        _run_fk("pf_attempts"),
    )
    op.create_index("ix_pf_attempts_run_step", "pf_attempts", ["run_id", "step", "attempt"])


def downgrade() -> None:
    """Back to 0.2.1; refuses (CHECK) while runs hold a status 0.2.1 did not know."""
    op.drop_table("pf_attempts")
    op.drop_table("pf_steps")
    op.drop_table("pf_values")
    op.drop_index("ix_pf_events_run_id", "pf_events")
    with op.batch_alter_table("pf_events") as batch:
        batch.drop_column("attempt")
    op.execute("DELETE FROM pf_checkpoints WHERE store_json IS NULL")
    with op.batch_alter_table("pf_checkpoints") as batch:
        for name, _ in _CHECKPOINT_COLUMNS:
            batch.drop_column(name)
        batch.alter_column("store_json", existing_type=sa.Text, nullable=False)
    op.drop_index("ix_pf_runs_started_at", "pf_runs")
    with op.batch_alter_table("pf_runs") as batch:
        batch.drop_constraint("ck_pf_runs_control", type_="check")
        batch.drop_constraint("ck_pf_runs_status", type_="check")
        batch.create_check_constraint("ck_pf_runs_status", sa.text(_V1_STATUSES))
        for name, _ in reversed(_RUN_COLUMNS):
            batch.drop_column(name)
