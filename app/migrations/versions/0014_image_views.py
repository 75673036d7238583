"""An image's larger square view, which the concept page's enlarged view shows where the source
image is larger than its thumbnail (mines from before it have none: they enlarge the thumbnail).

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("view_path", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("view_path")
