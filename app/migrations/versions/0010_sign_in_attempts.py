"""`sign_in_attempts`: the sign-in throttle's window, shared by every server process (before,
each process counted on its own, so N processes allowed N times the limit).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sign_in_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sign_in_attempts")),
    )
    op.create_index("ix_sign_in_attempts_key_at", "sign_in_attempts", ["key_hash", "at"])
    op.create_index("ix_sign_in_attempts_at", "sign_in_attempts", ["at"])


def downgrade() -> None:
    op.drop_index("ix_sign_in_attempts_at", table_name="sign_in_attempts")
    op.drop_index("ix_sign_in_attempts_key_at", table_name="sign_in_attempts")
    op.drop_table("sign_in_attempts")
