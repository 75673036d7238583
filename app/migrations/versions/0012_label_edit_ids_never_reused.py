"""Label edit ids are never reused (SQLite AUTOINCREMENT): the newest edit's id is part of
every run's page-cache version, and once `usae runs delete` removed the newest edits, SQLite
handed their ids out again, so a new edit in another run could bring back a version already
cached and serve a stale page.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Postgres sequences never hand out an id twice; only SQLite needs the table rebuilt.
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("label_history", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    pass  # older code works with AUTOINCREMENT (see 0011)
