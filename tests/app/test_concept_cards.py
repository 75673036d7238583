"""The concept browser's precomputed cards (`concept_cards`), on runs really mined by
`mine_run`: they hold what the tables they replace say, label edits show at once and escaped,
a re-mine replaces them, an interrupted mine keeps the old ones, and the migration that adds
them fills them in for runs mined before it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient

from app.db import get_engine, session_factory
from app.main import create_app
from app.migrations import alembic_config, foreign_keys_off, upgrade_database
from app.models import (
    Concept,
    ConceptCardData,
    ConceptModelStats,
    ConceptTopImage,
    Image,
    Run,
)
from app.schemas.concepts import MinedCard, ModelFiring
from app.schemas.images import Thumb
from app.services import card_html
from app.services import mining as mining_service
from app.services.concepts import card_ranks, concept_cards
from app.services.mining import mine_run
from app.settings import Settings
from tests.app.seed import create_analyst
from tests.app.webapp import login
from tests.core.planted_concept import Planted, build_planted
from usae_core.mining import MiningConfig

IMAGE_HW = (48, 64)


def _planted(root: Path, dims: dict[str, int] | None = None) -> tuple[Planted, Path]:
    planted = build_planted(root, image_files=IMAGE_HW, n_concepts=12, dims=dims)
    run_dir = root / "runs" / "planted"
    planted.model.save_pretrained(run_dir)
    return planted, run_dir


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> tuple[Planted, Path]:
    return _planted(tmp_path_factory.mktemp("cards-planted"))


def _mine(url: str, media: Path, planted_run, **kwargs):
    planted, run_dir = planted_run
    return mine_run(url, media, run_dir, planted.store, planted.model, **kwargs)


def tables_card(session, run: Run, concept_id: int) -> MinedCard:
    """A card as the browser assembled it before `concept_cards` existed: firing from
    `concept_model_stats` in the run's model order, thumbnails from the active generation's
    top images (the first `card_ranks` of each model) by model order, then rank."""
    names = {m.id: m.name for m in run.models}
    order = {m.id: m.position for m in run.models}
    stats = session.execute(sa.select(ConceptModelStats).where(ConceptModelStats.concept_id == concept_id)).scalars()
    firing = [ModelFiring(model=names[s.run_model_id], fire_count=s.fire_count, frequency=s.frequency, share=s.share,
                          cofire=s.cofire, max_activation=s.max_activation)
              for s in sorted(stats, key=lambda s: order[s.run_model_id])]
    tops = session.execute(sa.select(ConceptTopImage, Image).join(Image, Image.id == ConceptTopImage.image_id).where(
        ConceptTopImage.concept_id == concept_id, ConceptTopImage.generation_id == run.active_generation_id,
        ConceptTopImage.rank < card_ranks(len(run.models)))).all()
    thumbs = [Thumb(model=names[t.run_model_id], rank=t.rank, activation=t.activation, heatmap=t.heatmap_path,
                    thumbnail=image.thumbnail_path, image_key=image.image_key)
              for t, image in sorted(tops, key=lambda row: (order[row[0].run_model_id], row[0].rank))]
    return MinedCard(firing=firing, thumbs=thumbs)


def stored_cards(url: str) -> dict[int, MinedCard]:
    """Concept index -> the card the browser reads for it (active generation)."""
    with session_factory(url)() as s:
        run = s.scalars(sa.select(Run)).one()
        concepts = s.scalars(sa.select(Concept).where(Concept.run_id == run.id).order_by(Concept.index)).all()
        return {c.index: MinedCard(firing=card.firing, thumbs=card.thumbs)
                for c, card in zip(concepts, concept_cards(s, run=run, concepts=concepts))}


def card_rows(url: str) -> list[tuple[int, int, str]]:
    """Every row of `concept_cards`, whatever its generation: (generation, concept index, payload)."""
    with session_factory(url)() as s:
        return sorted(s.execute(sa.select(ConceptCardData.generation_id, Concept.index, ConceptCardData.payload)
                                .join(Concept, Concept.id == ConceptCardData.concept_id)).all())


@pytest.mark.parametrize("dims", [None, {"vit": 8, "dino": 12}, {"vit": 8}], ids=["3 models", "2 models", "1 model"])
def test_cards_hold_what_the_mined_tables_say(db_url, data_dir, tmp_path, dims):
    planted, run_dir = _planted(tmp_path, dims)
    mine_run(db_url, data_dir / "media", run_dir, planted.store, planted.model, cfg=MiningConfig(top_n=5),
             batch_concepts=5)
    cards = stored_cards(db_url)
    with session_factory(db_url)() as s:
        run = s.scalars(sa.select(Run)).one()
        ids = dict(s.execute(sa.select(Concept.index, Concept.id).where(Concept.run_id == run.id)).all())
        expected = {index: tables_card(s, run, concept_id) for index, concept_id in ids.items()}
        # One model has no cross R²: stored as null (Postgres rejects NaN in JSON).
        assert (run.metrics["r2_cross"] is None) == (len(planted.store.model_names) == 1)
    assert cards == expected  # exact: the same float64 numbers, paths and order
    # The planted concept fires on three images only.
    per_model = min(card_ranks(len(planted.store.model_names)), len(planted.images))
    card = cards[planted.concept]
    assert [f.model for f in card.firing] == planted.store.model_names
    assert [(t.model, t.rank) for t in card.thumbs] == [(m, r) for m in planted.store.model_names
                                                       for r in range(per_model)]
    assert [t.image_key for t in card.thumbs[:per_model]] == [planted.store.image_ids[i]
                                                            for i in planted.images[:per_model]]
    assert all((data_dir / "media" / t.heatmap).is_file() and (data_dir / "media" / t.thumbnail).is_file()
               for c in cards.values() for t in c.thumbs)
    assert len(card_rows(db_url)) == 12


def test_the_overview_of_a_one_model_run_says_that_universality_does_not_apply(tmp_path):
    """Firing entropy is 0 for every concept of one model, which the two-or-more-models summary
    would read as every concept being model-specific."""
    settings = Settings(data_dir=tmp_path / "data", secret_key="test-secret", database_url=None)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url).begin() as s:
        create_analyst(s)
    _mine(settings.db_url, settings.media_dir, _planted(tmp_path, {"vit": 8}), cfg=MiningConfig(top_n=3))
    with TestClient(create_app(settings)) as client:
        login(client, "alice")
        with session_factory(settings.db_url)() as s:
            run_id = s.scalars(sa.select(Run.id)).one()
        summary = re.search(r'<p class="lede" id="summary">(.*?)</p>', client.get(f"/runs/{run_id}").text, re.S).group(1)
    assert "this run has one model, vit, which uses" in summary and "with one, every concept is its own" in summary
    assert "used by all of them" not in summary


def test_a_label_edit_shows_on_the_card_at_once_and_escaped(tmp_path, planted_run):
    settings = Settings(data_dir=tmp_path / "data", secret_key="test-secret", database_url=None)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url).begin() as s:
        create_analyst(s)
    _mine(settings.db_url, settings.media_dir, planted_run, cfg=MiningConfig(top_n=3))
    planted, _ = planted_run
    concept = planted.concept
    cards_before = card_rows(settings.db_url)
    with TestClient(create_app(settings)) as client:
        login(client, "alice")
        with session_factory(settings.db_url)() as s:
            run_id = s.scalars(sa.select(Run.id)).one()
        browser = f"/runs/{run_id}/concepts?sort=index"
        assert "Unlabelled" in _card_html(client.get(browser).text, concept)  # also puts the page in the cache
        page = client.get(f"/runs/{run_id}/concepts/{concept}").text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        version = re.search(r'name="version" value="(\d+)"', page).group(1)
        r = client.put(f"/api/runs/{run_id}/concepts/{concept}/label", headers={"X-CSRF-Token": token}, json={
            "label": "<script>alert(1)</script> blob", "description": "", "tags": ["Planted<b>"],
            "version": int(version)})
        assert r.status_code == 200, r.text
        card = _card_html(client.get(browser).text, concept)
        assert "&lt;script&gt;alert(1)&lt;/script&gt; blob" in card and "<script>" not in card
        assert "planted&lt;b&gt;" in card and "planted<b>" not in card
        api = client.get(f"/api/runs/{run_id}/concepts?sort=index").json()
        by_index = {c["index"]: c for c in api["concepts"]}
        assert by_index[concept]["label"] == "<script>alert(1)</script> blob"
        assert by_index[concept]["tags"] == ["planted<b>"]
        assert by_index[concept]["thumbs"] and by_index[concept]["firing"]
    # The edit did not need (nor touch) the mined card rows.
    assert card_rows(settings.db_url) == cards_before
    get_engine(settings.db_url).dispose()


def test_firing_bars_share_the_runs_scale_on_every_page(tmp_path, planted_run):
    """The mine records the run's most frequent model-concept pair, and every browser page
    scales its bars to it (a page of rare concepts no longer shows them as full bars)."""
    from app.models import ConceptModelStats

    settings = Settings(data_dir=tmp_path / "data", secret_key="test-secret", database_url=None)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url).begin() as s:
        create_analyst(s)
    _mine(settings.db_url, settings.media_dir, planted_run, cfg=MiningConfig(top_n=3))
    with session_factory(settings.db_url)() as s:
        run = s.scalars(sa.select(Run)).one()
        highest = s.scalar(sa.select(sa.func.max(ConceptModelStats.frequency)))
        assert run.metrics["max_frequency"] == pytest.approx(highest) and highest > 0
    with TestClient(create_app(settings)) as client:
        login(client, "alice")

        def scales() -> set[float]:
            found = set()
            for page in (1, 2, 3):
                html = client.get(f"/runs/{run.id}/concepts?sort=frequency&per_page=4&page={page}").text
                found.add(float(re.search(r'id="concept-grid" style="--fmax: ([0-9.e-]+)"', html).group(1)))
            return found

        assert [pytest.approx(highest)] == list(scales())
        # The overview's labelled concepts are drawn on the same scale (it was their own highest).
        csrf = client.get("/api/auth/csrf").json()["csrf_token"]
        with session_factory(settings.db_url)() as s:
            rare = s.execute(sa.select(Concept.index).join(ConceptModelStats, ConceptModelStats.concept_id == Concept.id)
                             .group_by(Concept.index).having(sa.func.max(ConceptModelStats.frequency) > 0)
                             .order_by(sa.func.max(ConceptModelStats.frequency)).limit(1)).scalar_one()
        version = client.get(f"/api/runs/{run.id}/concepts/{rare}").json()["version"]
        assert client.put(f"/api/runs/{run.id}/concepts/{rare}/label", json={"label": "Rare", "version": version},
                          headers={"X-CSRF-Token": csrf}).status_code == 200
        overview = client.get(f"/runs/{run.id}").text
        assert set(re.findall(r'class="fire-bar compact" style="--fmax: ([0-9.e-]+)"', overview)) == {repr(highest)}
        # A run mined before the mine recorded the scale reads it from its statistics.
        with session_factory(settings.db_url).begin() as s:
            stored = s.get(Run, run.id)
            stored.metrics = {k: v for k, v in stored.metrics.items() if k != "max_frequency"}
        client.app.state.page_cache = type(client.app.state.page_cache)()
        assert [pytest.approx(highest)] == list(scales())
    get_engine(settings.db_url).dispose()


def _card_html(page: str, index: int) -> str:
    start = page.index(f'data-concept="{index}"')
    return page[start:page.index("</a>", start)]


def test_a_remine_replaces_the_cards(db_url, data_dir, planted_run):
    media = data_dir / "media"
    first = _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=4))
    old_prefix = f"runs/{first.run_id}/g{first.generation_id}"
    assert all(t.heatmap.startswith(old_prefix) for c in stored_cards(db_url).values() for t in c.thumbs)
    second = _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=2))
    rows = card_rows(db_url)
    assert {gen for gen, _, _ in rows} == {second.generation_id} and len(rows) == 12
    cards = stored_cards(db_url)
    new_prefix = f"runs/{second.run_id}/g{second.generation_id}/"
    thumbs = [t for c in cards.values() for t in c.thumbs]
    assert thumbs and all(t.heatmap.startswith(new_prefix) and (media / t.heatmap).is_file() for t in thumbs)
    assert not (media / old_prefix).exists()
    with session_factory(db_url)() as s:
        run = s.scalars(sa.select(Run)).one()
        assert cards == {c.index: tables_card(s, run, c.id) for c in s.scalars(sa.select(Concept))}


def _fail_in_second_batch_after_its_cards(monkeypatch, written: list[int]) -> None:
    """The second concept batch writes its rows (cards included), then fails in its transaction;
    `written` gets the number of card rows the building generation had at that moment."""
    real = mining_service._insert_concept_rows
    calls = []

    def insert_then_fail(s, ids, *args, **kwargs):
        calls.append(1)
        result = real(s, ids, *args, **kwargs)
        if len(calls) == 2:
            written.append(s.scalar(sa.select(sa.func.count()).select_from(ConceptCardData)
                                    .where(ConceptCardData.generation_id == ids.generation_id)))
            raise RuntimeError("disk on fire")
        return result

    monkeypatch.setattr(mining_service, "_insert_concept_rows", insert_then_fail)


def test_an_interrupted_mine_keeps_the_old_cards(db_url, data_dir, planted_run, monkeypatch):
    media = data_dir / "media"
    _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=4))
    rows_before, cards_before = card_rows(db_url), stored_cards(db_url)
    written: list[int] = []
    _fail_in_second_batch_after_its_cards(monkeypatch, written)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=2), batch_concepts=3)
    assert written == [6], "the failed mine had written cards of its own"
    assert card_rows(db_url) == rows_before and stored_cards(db_url) == cards_before
    # The failure in the final switch (statistics swapped, then an error) is covered by
    # test_mine.py's snapshot of every mined table; check the cards there too.
    monkeypatch.undo()
    monkeypatch.setattr(mining_service, "utcnow", _raise)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _mine(db_url, media, planted_run, cfg=MiningConfig(top_n=2))
    assert card_rows(db_url) == rows_before and stored_cards(db_url) == cards_before


def _raise() -> None:
    raise RuntimeError("disk on fire")


def test_the_migration_fills_in_cards_of_runs_mined_before_it(db_url, data_dir, planted_run):
    _mine(db_url, data_dir / "media", planted_run, cfg=MiningConfig(top_n=4))
    mined = stored_cards(db_url)
    cfg = alembic_config(db_url)
    # as the app migrates (upgrade_database): SQLite's rebuilt tables (0014's images) would cascade otherwise
    with get_engine(db_url).connect() as connection, foreign_keys_off(connection), connection.begin():
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0003")
        assert "concept_cards" not in sa.inspect(connection).get_table_names()
    upgrade_database(db_url)
    assert stored_cards(db_url) == mined
    with session_factory(db_url)() as s:
        active = s.scalars(sa.select(Run.active_generation_id)).one()
    assert [gen for gen, _, _ in card_rows(db_url)] == [active] * 12


def test_cards_carry_their_markup_rendered_by_the_mine(db_url, data_dir, planted_run):
    _mine(db_url, data_dir / "media", planted_run, cfg=MiningConfig(top_n=5), batch_concepts=5)
    with session_factory(db_url)() as s:
        run = s.scalars(sa.select(Run)).one()
        rows = s.execute(sa.select(ConceptCardData)).scalars().all()
        assert rows and {r.html_format for r in rows} == {card_html.FORMAT}
        for row in rows:
            mined = MinedCard.model_validate_json(row.payload)
            assert (row.thumbs_html, row.firing_html) == card_html.render(mined, len(run.models))
            assert row.max_frequency == card_html.max_frequency(mined) and row.max_frequency > 0


def test_migrations_0006_and_0013_fill_the_card_columns_from_the_json(db_url, data_dir, planted_run):
    """0006 fills the bar scale (and the top model of its day) from each card's JSON; 0013 drops
    the top model and, going back, fills it again the same way."""
    _mine(db_url, data_dir / "media", planted_run, cfg=MiningConfig(top_n=5), batch_concepts=5)
    with get_engine(db_url).connect() as connection:
        mined = {concept: (max(MinedCard.model_validate_json(payload).firing, key=lambda f: f.share).model, fmax)
                 for concept, payload, fmax in connection.execute(sa.select(
                     ConceptCardData.concept_id, ConceptCardData.payload, ConceptCardData.max_frequency))}
    assert len(mined) == 12
    columns = sa.text("SELECT concept_id, top_model, max_frequency FROM concept_cards")
    cfg = alembic_config(db_url)
    with get_engine(db_url).connect() as connection, foreign_keys_off(connection), connection.begin():
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0005")
        assert "top_model" not in {c["name"] for c in sa.inspect(connection).get_columns("concept_cards")}
        command.upgrade(cfg, "0006")
        assert {c: (top, fmax) for c, top, fmax in connection.execute(columns)} == mined
        command.upgrade(cfg, "0013")
        assert "top_model" not in {c["name"] for c in sa.inspect(connection).get_columns("concept_cards")}
        command.downgrade(cfg, "0012")
        assert {c: (top, fmax) for c, top, fmax in connection.execute(columns)} == mined
    upgrade_database(db_url)  # 0013 again, as every command runs it: the cards survive the rebuilt table
    with get_engine(db_url).connect() as connection:
        assert "top_model" not in {c["name"] for c in sa.inspect(connection).get_columns("concept_cards")}
        assert {c: fmax for c, fmax in connection.execute(sa.text("SELECT concept_id, max_frequency FROM concept_cards"))} \
            == {c: fmax for c, (_, fmax) in mined.items()}


def test_cards_of_another_template_are_rendered_when_shown(tmp_path, planted_run):
    """A row rendered by an older fragment template (or before migration 0005 or 0006) shows
    exactly what a current row shows; share-link holders get their own media links either way."""
    settings = Settings(data_dir=tmp_path / "data", secret_key="test-secret", database_url=None)
    upgrade_database(settings.db_url)
    _mine(settings.db_url, settings.media_dir, planted_run)
    with session_factory(settings.db_url)() as s:
        create_analyst(s)
        s.commit()

    def pages() -> tuple[str, str]:
        with TestClient(create_app(settings)) as client:  # a new app: no page cache
            login(client, "alice")
            analyst = client.get("/runs/1/concepts?per_page=200")
            token = client.post("/api/shares", json={"run_id": 1, "scope": "run"},
                                headers={"X-CSRF-Token": client.get("/api/auth/csrf").json()["csrf_token"]})
            holder = client.get(f"/s/{token.json()['token']}/runs/1/concepts?per_page=200")
            assert analyst.status_code == holder.status_code == 200
            return (re.sub(r'"csrf_token" value="[^"]+"|"X-CSRF-Token": "[^"]+"', "", analyst.text),
                    re.sub(r"/s/[A-Za-z0-9_-]+", "/s/TOKEN", re.sub(r"printed [^<]+", "", holder.text)))

    stored = pages()
    assert 'src="/media/' in stored[0] and 'src="/media/' not in stored[1] and 'src="/s/TOKEN/media/' in stored[1]
    engine = get_engine(settings.db_url)
    with engine.begin() as connection:
        connection.execute(sa.update(ConceptCardData).values(thumbs_html="stale", firing_html="stale",
                                                             html_format="0ld"))
    assert pages() == stored
    with engine.begin() as connection:
        connection.execute(sa.update(ConceptCardData).values(thumbs_html=None, firing_html=None, html_format=None))
    assert pages() == stored
    with engine.begin() as connection:  # current markup, but a mine before migration 0006 and no backfill
        connection.execute(sa.update(ConceptCardData).values(html_format=card_html.FORMAT, thumbs_html="stale",
                                                             firing_html="stale", max_frequency=None))
    assert pages() == stored


def test_a_model_without_top_images_leaves_its_own_thumbnail_slot_blank():
    """Card columns follow the run's model order, each thumbnail captioned with its model: a
    model with no top image leaves its slot blank instead of the next model's thumbnail sliding
    into it."""
    firing = [ModelFiring(model=m, fire_count=1, frequency=0.1, share=1 / 3, cofire=0.0, max_activation=1.0)
              for m in ("alpha", "beta", "gamma")]
    thumbs = [Thumb(model=m, rank=0, activation=1.0, heatmap=f"heat/{m}.png", thumbnail=f"thumb/{m}.jpg",
                    image_key=m) for m in ("alpha", "gamma")]
    html, _ = card_html.render(MinedCard(firing=firing, thumbs=thumbs), 3)
    slots = re.findall(r'<span class="(heat|blank)"(?: title="([^"]*)")?', html)
    assert slots == [("heat", "alpha · activation 1.00"), ("blank", "beta: no top image"),
                     ("heat", "gamma · activation 1.00")]
    assert re.findall(r'<span class="cap" aria-hidden="true">([^<]*)</span>', html) == ["alpha", "gamma"]
    two = [Thumb(model="beta", rank=r, activation=1.0, heatmap=f"heat/{r}.png", thumbnail=None, image_key=str(r))
           for r in (0, 1)]
    html, _ = card_html.render(MinedCard(firing=firing[:2], thumbs=two), 2)  # two models: two slots each
    assert [kind for kind, _ in re.findall(r'<span class="(heat|blank)"(?: title="([^"]*)")?', html)] == \
        ["blank", "blank", "heat", "heat"]


@pytest.mark.parametrize("n_models, columns", [(5, 3), (6, 3), (8, 4), (9, 4)])
def test_every_model_of_a_large_run_keeps_its_thumbnail_on_the_card(n_models, columns):
    """Past four models the thumbnails take two rows (or more), one per model: with five
    models the fifth had no slot."""
    names = [f"m{i}" for i in range(n_models)]
    firing = [ModelFiring(model=m, fire_count=1, frequency=0.1, share=1 / n_models, cofire=0.0, max_activation=1.0)
              for m in names]
    thumbs = [Thumb(model=m, rank=0, activation=1.0, heatmap=f"heat/{m}.png", thumbnail=f"thumb/{m}.jpg",
                    image_key=m) for m in names]
    html, _ = card_html.render(MinedCard(firing=firing, thumbs=thumbs), n_models)
    assert f"grid-template-columns: repeat({columns}, 1fr)" in html
    assert re.findall(r'<span class="cap" aria-hidden="true">([^<]*)</span>', html) == names
    slots = re.findall(r'<span class="(heat|blank)"', html)  # whole rows: the last one filled with blanks
    assert len(slots) % columns == 0 and slots == ["heat"] * n_models + ["blank"] * (len(slots) - n_models)


def test_serve_re_renders_cards_of_an_older_template(db_url, data_dir, planted_run):
    """Cards an older card template rendered (an app upgrade) are re-rendered once, in batches,
    to exactly what a mine with the current template stores; a second refresh finds nothing."""
    _mine(db_url, data_dir / "media", planted_run, cfg=MiningConfig(top_n=5), batch_concepts=5)
    columns = sa.select(ConceptCardData.concept_id, ConceptCardData.thumbs_html, ConceptCardData.firing_html,
                        ConceptCardData.html_format, ConceptCardData.max_frequency)
    engine = get_engine(db_url)
    with engine.connect() as connection:
        fresh = set(connection.execute(columns).all())
    with engine.begin() as connection:
        connection.execute(sa.update(ConceptCardData).where(ConceptCardData.concept_id % 2 == 0)
                           .values(thumbs_html="stale", firing_html="stale", html_format="0ld", max_frequency=None))
        connection.execute(sa.update(ConceptCardData).where(ConceptCardData.concept_id % 3 == 0)
                           .values(thumbs_html=None, firing_html=None, html_format=None))
    with engine.connect() as connection:
        stale = sum(row.html_format != card_html.FORMAT for row in connection.execute(columns))
    assert stale >= 6
    assert card_html.refresh_stale_cards(session_factory(db_url), batch=4) == stale
    with engine.connect() as connection:
        assert set(connection.execute(columns).all()) == fresh
    assert card_html.refresh_stale_cards(session_factory(db_url)) == 0
