"""Precomputed concept browser cards: one `concept_cards` row per concept and mining
generation, holding what the card shows of the mine (firing per model, top thumbnails) as
JSON. Existing mined runs get theirs from their active generation's rows, so they need no
new mine.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json
from collections import defaultdict

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "concept_cards",
        sa.Column("generation_id", sa.Integer(), nullable=False),
        sa.Column("concept_id", sa.Integer(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["concept_id"], ["concepts.id"], name=op.f("fk_concept_cards_concept_id_concepts"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["generation_id"], ["mining_generations.id"],
                                name=op.f("fk_concept_cards_generation_id_mining_generations"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("generation_id", "concept_id", name=op.f("pk_concept_cards")),
    )
    op.create_index(op.f("ix_concept_cards_concept_id"), "concept_cards", ["concept_id"])
    connection = op.get_bind()
    for run_id, generation_id in connection.execute(sa.text(
            "SELECT id, active_generation_id FROM runs WHERE active_generation_id IS NOT NULL")).all():
        _backfill(connection, run_id, generation_id)


def downgrade() -> None:
    op.drop_index(op.f("ix_concept_cards_concept_id"), table_name="concept_cards")
    op.drop_table("concept_cards")


def _backfill(connection: sa.Connection, run_id: int, generation_id: int) -> None:
    """The cards of one run's active generation, from the rows the browser assembled them from
    before this revision. The JSON is that of `app.schemas.concepts.MinedCard`, written out here
    so that this revision keeps doing what it did when the app's code moves on."""
    models = connection.execute(sa.text("SELECT id, name FROM run_models WHERE run_id = :run ORDER BY position"),
                                {"run": run_id}).all()
    names = {model_id: name for model_id, name in models}
    order = {model_id: position for position, (model_id, _) in enumerate(models)}
    per_card = {1: 4, 2: 2}.get(len(models), 1)  # top images per model on a card
    firing: dict[int, list] = defaultdict(list)
    for concept_id, model_id, fire_count, frequency, share, cofire, max_activation in connection.execute(sa.text(
            "SELECT s.concept_id, s.run_model_id, s.fire_count, s.frequency, s.share, s.cofire, s.max_activation "
            "FROM concept_model_stats s JOIN concepts c ON c.id = s.concept_id WHERE c.run_id = :run"),
            {"run": run_id}):
        firing[concept_id].append((order[model_id], {
            "model": names[model_id], "fire_count": fire_count, "frequency": frequency, "share": share,
            "cofire": cofire, "max_activation": max_activation}))
    thumbs: dict[int, list] = defaultdict(list)
    for concept_id, model_id, rank, activation, heatmap, thumbnail, key in connection.execute(sa.text(
            "SELECT t.concept_id, t.run_model_id, t.rank, t.activation, t.heatmap_path, i.thumbnail_path, i.image_key "
            "FROM concept_top_images t JOIN images i ON i.id = t.image_id "
            "WHERE t.generation_id = :gen AND t.rank < :ranks"), {"gen": generation_id, "ranks": per_card}):
        thumbs[concept_id].append(((order[model_id], rank), {
            "model": names[model_id], "rank": rank, "activation": activation, "heatmap": heatmap,
            "thumbnail": thumbnail, "image_key": key}))
    concept_ids = connection.execute(sa.text("SELECT id FROM concepts WHERE run_id = :run"), {"run": run_id}).scalars()
    rows = [{"gen": generation_id, "concept": concept_id, "payload": json.dumps({
        "firing": [f for _, f in sorted(firing[concept_id], key=lambda item: item[0])],
        "thumbs": [t for _, t in sorted(thumbs[concept_id], key=lambda item: item[0])]}, separators=(",", ":"))}
        for concept_id in concept_ids]
    if rows:
        connection.execute(sa.text("INSERT INTO concept_cards (generation_id, concept_id, payload) "
                                   "VALUES (:gen, :concept, :payload)"), rows)
