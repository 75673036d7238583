"""The browser card's mined part as HTML, stored with its `concept_cards` row by the mine
(app/services/card_html.py). Rows of earlier mines keep NULL and are rendered when shown.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("concept_cards", sa.Column("thumbs_html", sa.Text(), nullable=True))
    op.add_column("concept_cards", sa.Column("firing_html", sa.Text(), nullable=True))
    op.add_column("concept_cards", sa.Column("html_format", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("concept_cards") as batch:
        batch.drop_column("html_format")
        batch.drop_column("firing_html")
        batch.drop_column("thumbs_html")
