"""A run's usage totals kept on its row: a budget check reads one row, not every call.

* pf_runs: used_tokens (BIGINT NOT NULL DEFAULT 0: input + output tokens; BIGINT as the
  SUM it replaces, because a big fan-out passes 2**31) and used_cost_usd (FLOAT NOT NULL
  DEFAULT 0; an unknown cost counts 0), each the sum over the run's pf_usage rows, which
  ``add_usage`` now adds to in the same transaction as its row.
* Data: both backfilled from the pf_usage rows already in the ledger.

Before, each check summed the run's pf_usage rows: a budgeted fan-out checks once per
map item, so n items read O(n^2) rows (1.3 ms a check at 10,000 rows).

Plain ADD COLUMNs with a constant default (no table rebuild on either backend; an
instant catalog change on PostgreSQL), then one UPDATE of the runs that reported usage,
which reads their rows by ``ix_pf_usage_run_id``. It locks those run rows for its length:
on a ledger of millions of calls, upgrade while the workers are stopped (any command
that opens the ledger migrates it).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_OF_RUN = "FROM pf_usage u WHERE u.run_id = pf_runs.run_id"


def upgrade() -> None:
    op.add_column(
        "pf_runs", sa.Column("used_tokens", sa.BigInteger, nullable=False, server_default="0")
    )
    op.add_column(
        "pf_runs", sa.Column("used_cost_usd", sa.Float, nullable=False, server_default="0")
    )
    # Correlated subqueries, not UPDATE ... FROM: the same SQL on both backends.
    op.execute(
        "UPDATE pf_runs SET "
        # BIGINT before adding: each column is an INTEGER, their sum may not fit one.
        "used_tokens = (SELECT COALESCE(SUM(CAST(u.input_tokens AS BIGINT) + u.output_tokens), 0) "
        f"{_OF_RUN}), "
        f"used_cost_usd = (SELECT COALESCE(SUM(u.cost_usd), 0) {_OF_RUN}) "
        "WHERE run_id IN (SELECT run_id FROM pf_usage)"
    )


def downgrade() -> None:
    with op.batch_alter_table("pf_runs") as batch:
        batch.drop_column("used_cost_usd")
        batch.drop_column("used_tokens")
