"""Which worker process runs a job (`host/boot/pid-namespace/pid`), so a worker on the same machine
can tell at once that a job's process is gone, and workers on other machines judge a silent
heartbeat by their own clocks instead of comparing another machine's timestamps with theirs.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("worker", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("worker")
