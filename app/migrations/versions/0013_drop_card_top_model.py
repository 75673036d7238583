"""The browser's "mostly" badge names every model with at least its fair share of a concept's
firings, read with the page from `concept_model_stats` (the same rule as the "Mostly in model"
filter), so the card's single stored top model (migration 0006) is no longer read.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_BATCH = 2_000


def upgrade() -> None:
    with op.batch_alter_table("concept_cards") as batch:
        batch.drop_column("top_model")


def downgrade() -> None:
    """Older code shows the column as the badge: fill it from each card's JSON, as 0006 did."""
    op.add_column("concept_cards", sa.Column("top_model", sa.String(length=100), nullable=True))
    connection = op.get_bind()
    read = sa.text("SELECT generation_id, concept_id, payload FROM concept_cards "
                   "WHERE generation_id > :gen OR (generation_id = :gen AND concept_id > :concept) "
                   "ORDER BY generation_id, concept_id LIMIT :n")
    update = sa.text("UPDATE concept_cards SET top_model = :top WHERE generation_id = :gen AND concept_id = :concept")
    last = {"gen": -1, "concept": -1}
    while rows := connection.execute(read, {**last, "n": _BATCH}).all():
        connection.execute(update, [_top(gen, concept, payload) for gen, concept, payload in rows])
        last = {"gen": rows[-1][0], "concept": rows[-1][1]}


def _top(generation_id: int, concept_id: int, payload: str) -> dict[str, object]:
    firing = json.loads(payload)["firing"]
    return {"gen": generation_id, "concept": concept_id,
            "top": max(firing, key=lambda f: f["share"])["model"] if firing else None}
