"""What the browser page reads of a card besides its markup, as columns of `concept_cards`:
the model with the largest share of firings (the "mostly X" badge) and the largest firing
frequency (the page's bar scale), so a browser page parses no card JSON. Existing rows are
filled from their JSON here.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_BATCH = 2_000


def upgrade() -> None:
    op.add_column("concept_cards", sa.Column("top_model", sa.String(length=100), nullable=True))
    op.add_column("concept_cards", sa.Column("max_frequency", sa.Float(), nullable=True))
    connection = op.get_bind()
    # In key order, a batch at a time: every generation's cards may not fit in memory at once.
    read = sa.text("SELECT generation_id, concept_id, payload FROM concept_cards "
                   "WHERE generation_id > :gen OR (generation_id = :gen AND concept_id > :concept) "
                   "ORDER BY generation_id, concept_id LIMIT :n")
    update = sa.text("UPDATE concept_cards SET top_model = :top, max_frequency = :fmax "
                     "WHERE generation_id = :gen AND concept_id = :concept")
    last = {"gen": -1, "concept": -1}
    while rows := connection.execute(read, {**last, "n": _BATCH}).all():
        connection.execute(update, [_columns(gen, concept, payload) for gen, concept, payload in rows])
        last = {"gen": rows[-1][0], "concept": rows[-1][1]}


def _columns(generation_id: int, concept_id: int, payload: str) -> dict[str, object]:
    """Written out here (not app.services.card_html) so this revision keeps doing what it did."""
    firing = json.loads(payload)["firing"]
    return {"gen": generation_id, "concept": concept_id,
            "top": max(firing, key=lambda f: f["share"])["model"] if firing else None,
            "fmax": max((f["frequency"] for f in firing), default=0.0)}


def downgrade() -> None:
    with op.batch_alter_table("concept_cards") as batch:
        batch.drop_column("max_frequency")
        batch.drop_column("top_model")
