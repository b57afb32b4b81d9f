"""Alembic environment: runs on the connection ``pocoflow.ledger.migrate`` hands over.

No alembic.ini: the ledger calls alembic programmatically, inside its own transaction and
migration lock, so this file only binds that connection and the version table name.
"""

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "pocoflow migrations run through pocoflow.ledger.migrate.ensure_schema "
        "(opening a WorkflowDB does it), not from the alembic command line"
    )

context.configure(
    connection=connection,
    version_table="pf_alembic_version",
    # Because SQLite cannot ALTER constraints or nullability: such changes rebuild the table.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
