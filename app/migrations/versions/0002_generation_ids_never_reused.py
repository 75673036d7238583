"""Mining generation ids are never reused (SQLite AUTOINCREMENT), since each names a media folder.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Postgres sequences never hand out an id twice; only SQLite needs the table rebuilt.
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("mining_generations", recreate="always",
                                  table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("mining_generations", recreate="always",
                                  table_kwargs={"sqlite_autoincrement": False}):
            pass
