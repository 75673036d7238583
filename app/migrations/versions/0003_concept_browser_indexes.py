"""Indexes for the concept browser: one per sort order, led by (run_id, dead) so the default
view (live concepts of a run) counts and pages by walking an index instead of sorting the run;
and (run_model_id, share, concept_id) so "mostly in model X" is one index range.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# name -> the sort column, descending (ties broken by concept index, ascending)
BROWSE_INDEXES = {
    "ix_concepts_browse_energy": "energy",
    "ix_concepts_browse_entropy": "firing_entropy",
    "ix_concepts_browse_cofire": "cofire",
    "ix_concepts_browse_frequency": "frequency",
}


def upgrade() -> None:
    for name, column in BROWSE_INDEXES.items():
        op.create_index(name, "concepts", ["run_id", "dead", sa.text(f"{column} DESC"), "index"])
    op.create_index("ix_concepts_browse_index", "concepts", ["run_id", "dead", "index"])
    op.create_index("ix_concept_model_stats_mostly", "concept_model_stats", ["run_model_id", "share", "concept_id"])


def downgrade() -> None:
    op.drop_index("ix_concept_model_stats_mostly", table_name="concept_model_stats")
    for name in [*BROWSE_INDEXES, "ix_concepts_browse_index"]:
        op.drop_index(name, table_name="concepts")
