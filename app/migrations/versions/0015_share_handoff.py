"""A new audit link's token, sealed, until the page the creating form redirects to shows it once:
kept by the database, not the session cookie, whose copies in concurrent responses of the same
session could drop it (the address never shown) or bring it back (shown twice).

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("share_links", sa.Column("handoff", sa.Text(), nullable=True))
    op.add_column("share_links", sa.Column("handoff_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("share_links") as batch:
        batch.drop_column("handoff_until")
        batch.drop_column("handoff")
