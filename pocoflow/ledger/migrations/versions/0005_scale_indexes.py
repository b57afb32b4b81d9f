"""Indexes for a ledger that keeps its history: the sweeper's queries start from the live
runs and their unfinished steps, so 100,000 finished runs cost it nothing.

* pf_runs: ix_pf_runs_live (run_id) WHERE status IN ('queued', 'running', 'waiting').
* pf_steps: ix_pf_steps_active (run_id, lease_expires_at) WHERE status IN ('queued',
  'running'), replacing ix_pf_steps_status_lease: that one listed the queued rows every
  paused or cancelled run leaves behind, and the sweeper walked all of them each pass.

Partial indexes (SQLite 3.8+ and PostgreSQL both have them); the predicates are written
out exactly as ``pocoflow.ledger.tables.literal_in`` renders them in the queries.

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_LIVE = sa.text("status IN ('queued', 'running', 'waiting')")
_ACTIVE = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.create_index(
        "ix_pf_runs_live", "pf_runs", ["run_id"], sqlite_where=_LIVE, postgresql_where=_LIVE
    )
    op.drop_index("ix_pf_steps_status_lease", table_name="pf_steps")
    op.create_index(
        "ix_pf_steps_active",
        "pf_steps",
        ["run_id", "lease_expires_at"],
        sqlite_where=_ACTIVE,
        postgresql_where=_ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ix_pf_steps_active", table_name="pf_steps")
    op.create_index("ix_pf_steps_status_lease", "pf_steps", ["status", "lease_expires_at"])
    op.drop_index("ix_pf_runs_live", table_name="pf_runs")
