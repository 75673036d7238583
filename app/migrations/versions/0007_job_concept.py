"""Jobs about one concept (CAM images) name it in a column, so a concept page finds its
newest job by index instead of reading job parameters.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("concept_index", sa.Integer(), nullable=True))
    op.create_index("ix_jobs_run_concept", "jobs", ["run_id", "concept_index"])


def downgrade() -> None:
    op.drop_index("ix_jobs_run_concept", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("concept_index")
