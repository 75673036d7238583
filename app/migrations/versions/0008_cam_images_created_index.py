"""Index `cam_images.created_at`: every analyst page reads its maximum as part of the run's data
version (app/page_cache.py), which must stay a lookup, not a scan, however many CAM images exist.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_cam_images_created_at", "cam_images", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_cam_images_created_at", table_name="cam_images")
