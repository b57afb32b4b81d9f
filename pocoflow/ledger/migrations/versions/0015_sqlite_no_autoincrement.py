"""SQLite: pf_events and pf_checkpoints without AUTOINCREMENT, a page fewer per commit.

AUTOINCREMENT made each insert also rewrite the ``sqlite_sequence`` row, a page of its
own in every step's commit. Ids still grow: SQLite gives max(id) + 1, and the only ids
it could hand out again are those of the newest rows, after they were deleted; rows of
a run that is read by id (a live run's events after ``after_id``) are never deleted
while it is live, so its ids only grow. PostgreSQL is unchanged (its ids are sequences).

Not pf_values as WITHOUT ROWID, though it saved a page per step with small values: its
rows are LLM outputs of kilobytes, and a WITHOUT ROWID b-tree holds whole rows, so with
values of 500 bytes and more it wrote more pages than the rowid table, not fewer.

Each table is rebuilt, its rows copied: on a ledger of millions of events, upgrade
while the workers are stopped (any command that opens the ledger migrates it).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01
"""

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_FK = "FOREIGN KEY(run_id) REFERENCES pf_runs (run_id)"

#: table -> (its columns' DDL, its indexes' DDL), at this revision.
_LEAN = {
    "pf_events": (
        "id INTEGER NOT NULL PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER, "
        "node_name TEXT, event TEXT NOT NULL, action TEXT, elapsed_ms FLOAT, "
        "error_msg TEXT, ts TEXT NOT NULL, attempt INTEGER, "
        f"CONSTRAINT fk_pf_events_run_id {_FK}",
        ["CREATE INDEX ix_pf_events_run_id ON pf_events (run_id, id)"],
    ),
    "pf_checkpoints": (
        "id INTEGER NOT NULL PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER NOT NULL, "
        "node_name TEXT NOT NULL, store_json TEXT, created_at TEXT NOT NULL, "
        "next_node TEXT, action TEXT, manifest TEXT, "
        "CONSTRAINT uq_pf_checkpoints_run_step UNIQUE (run_id, step), "
        f"CONSTRAINT fk_pf_checkpoints_run_id {_FK}",
        [],
    ),
}


def _rebuild(table: str, columns: str, indexes: list[str]) -> None:
    names = [
        row[1] for row in op.get_bind().exec_driver_sql(f"PRAGMA table_info({table})").fetchall()
    ]
    listed = ", ".join(f'"{name}"' for name in names)
    op.execute(f"CREATE TABLE pf_rebuilt ({columns})")
    op.execute(f"INSERT INTO pf_rebuilt ({listed}) SELECT {listed} FROM {table}")
    op.execute(f"DROP TABLE {table}")
    op.execute(f"ALTER TABLE pf_rebuilt RENAME TO {table}")
    for index in indexes:
        op.execute(index)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, (columns, indexes) in _LEAN.items():
        _rebuild(table, columns, indexes)


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, (columns, indexes) in _LEAN.items():
        _rebuild(table, columns.replace("PRIMARY KEY,", "PRIMARY KEY AUTOINCREMENT,", 1), indexes)
