"""Run ids are never reused (SQLite AUTOINCREMENT) now that `usae runs delete` removes runs: a
run id names media folders (`media/runs/ID`, `media/cam/run-ID`), and pages are cached per run id.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Postgres sequences never hand out an id twice; only SQLite needs the table rebuilt.
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("runs", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    # Kept as is: older code works with AUTOINCREMENT, and rebuilding `runs` again would risk
    # cascading deletes through every table that points at it on a connection with foreign keys on.
    pass
