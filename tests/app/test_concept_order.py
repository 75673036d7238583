"""The browser pages views of mined statistics from a cached id list per view and active
generation (app/services/concept_order.py). Its pages must be exactly those of the
ORDER BY / OFFSET query it replaces, ties included, on both backends; a re-mine must change
them, and label edits must show without a re-mine. Previous / next on the concept page too."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.db import session_factory
from app.models import Concept, MiningGeneration, Run
from app.schemas.concepts import ConceptFilters, SortKey
from app.services import concepts as concept_service
from app.services.concepts import browse_concepts
from app.services.runs_view import get_run
from tests.app.seed import seed_run

SORTS: list[SortKey] = ["energy", "entropy", "cofire", "frequency", "index"]
VIEWS = [{}, {"show_dead": True}, {"min_entropy": 0.8}, {"mostly": "vit_s"}, {"mostly": "cnn_m", "min_entropy": 0.0}]


@pytest.fixture
def run_url(db_url: str, data_dir: Path) -> str:
    with session_factory(db_url)() as s:
        run = seed_run(s, data_dir / "media", n_concepts=47, write_files=False)
        # Ties in every statistic, broken by the concept index in both paths.
        s.execute(sa.update(Concept).where(Concept.run_id == run.run_id, Concept.index.in_([3, 9, 20, 21, 30]))
                  .values(energy=0.5, firing_entropy=0.9, cofire=0.25, frequency=0.01))
        s.commit()
    return db_url


def _pages(url: str, filters: dict, per_page: int, scope: frozenset[int] | None = None) -> list[list[int]]:
    """Every page of the view, each as concept indices, and the totals each page reported."""
    with session_factory(url)() as s:
        run = get_run(s, run_id=1)
        first = browse_concepts(s, run=run, filters=ConceptFilters(per_page=per_page, **filters), scope=scope)
        pages = [browse_concepts(s, run=run, filters=ConceptFilters(per_page=per_page, page=n, **filters), scope=scope)
                 for n in range(1, first.pages + 2)]  # one page past the end: empty
        assert {p.total for p in pages} == {first.total}
        return [[c.index for c in p.concepts] for p in pages]


def _without_order_cache(monkeypatch) -> None:
    monkeypatch.setattr(concept_service, "_order_key", lambda *args: None)


@pytest.mark.parametrize("order", [None, "asc", "desc"])
@pytest.mark.parametrize("sort", SORTS)
def test_cached_orders_page_exactly_like_order_by_offset(run_url, monkeypatch, sort, order):
    scope = frozenset({0, 1, 3, 9, 20, 21, 30, 45, 46})
    cases = [(dict(view, sort=sort, order=order), per_page, None) for view in VIEWS for per_page in (1, 7, 200)]
    cases += [({"sort": sort, "order": order, "show_dead": True}, 4, scope), ({"sort": sort, "order": order}, 2, scope)]
    cached = [_pages(run_url, filters, per_page, scope) for filters, per_page, scope in cases]
    with monkeypatch.context() as m:
        _without_order_cache(m)
        offset = [_pages(run_url, filters, per_page, scope) for filters, per_page, scope in cases]
    assert cached == offset
    assert all(pages[-1] == [] for pages in cached)


@pytest.mark.parametrize("sort", SORTS)
def test_each_sort_goes_both_ways_and_lowest_first_is_highest_first_reversed(run_url, sort):
    """Highest first is the usual order of a statistic (concept number: lowest first); the other
    direction is that list exactly reversed, ties (concepts 3, 9, 20, 21, 30 share every
    statistic) included, so both walk the same index, one of them backwards."""
    usual = "asc" if sort == "index" else "desc"
    other = "desc" if sort == "index" else "asc"
    for view in VIEWS:
        default = _pages(run_url, dict(view, sort=sort), 200)[0]
        assert _pages(run_url, dict(view, sort=sort, order=usual), 200)[0] == default
        reverse = _pages(run_url, dict(view, sort=sort, order=other), 200)[0]
        assert reverse == default[::-1], view
    with session_factory(run_url)() as s:
        cards = browse_concepts(s, run=get_run(s, run_id=1), filters=ConceptFilters(
            sort=sort, order=other, show_dead=True, per_page=200)).concepts
    values = [getattr(c, {"entropy": "firing_entropy"}.get(sort, sort)) for c in cards]
    assert values == sorted(values, reverse=other == "desc")
    if sort != "index":  # ties by concept number, reversed with the rest
        assert [c.index for c in cards if c.index in {3, 9, 20, 21, 30}] == [30, 21, 20, 9, 3]


def test_one_list_one_key_however_its_direction_is_spelt(run_url):
    """The usual direction named in the URL is the list without it: one cached list, one URL."""
    with session_factory(run_url)() as s:
        run = get_run(s, run_id=1)
        keys = {concept_service._order_key(s, run, ConceptFilters(**view), None)
                for view in ({"sort": "entropy"}, {"sort": "entropy", "order": "desc"})}
        assert len(keys) == 1
        keys = {concept_service._order_key(s, run, ConceptFilters(**view), None)
                for view in ({"sort": "index"}, {"sort": "index", "order": "asc"})}
        assert len(keys) == 1
        assert concept_service._order_key(s, run, ConceptFilters(sort="entropy", order="asc"), None) not in keys
    assert ConceptFilters(sort="entropy", order="desc").query() == {"sort": "entropy"}
    assert ConceptFilters(sort="index", order="asc").query() == {"sort": "index"}
    assert ConceptFilters(sort="index", order="desc").query() == {"sort": "index", "order": "desc"}
    assert ConceptFilters(sort="entropy", order="asc").query(page=2) == {"sort": "entropy", "order": "asc", "page": 2}
    # A direction that is the usual one of the sort a link switches to is left out there too.
    assert ConceptFilters(sort="entropy", order="asc").query(sort="index") == {"sort": "index"}
    assert not ConceptFilters(sort="entropy", order="asc").narrows()  # an order leaves no concept out


def test_a_remine_changes_the_order_and_a_label_edit_shows_at_once(run_url):
    def first_page() -> list[tuple[int, str]]:
        with session_factory(run_url)() as s:
            page = browse_concepts(s, run=get_run(s, run_id=1), filters=ConceptFilters(per_page=3))
            return [(c.index, c.label) for c in page.concepts]

    before = first_page()
    with session_factory(run_url)() as s:
        s.execute(sa.update(Concept).where(Concept.index == before[-1][0]).values(label="edited"))
        s.commit()
    assert first_page() == [*before[:2], (before[-1][0], "edited")]
    with session_factory(run_url)() as s:  # what a mine's final transaction does
        run = s.get(Run, 1)
        generation = MiningGeneration(run_id=1, status="active", params={}, media_prefix="runs/1/generation-2")
        s.add(generation)
        s.flush()
        run.active_generation_id = generation.id
        s.execute(sa.update(Concept).where(Concept.run_id == 1, Concept.index == 40).values(energy=1e6))
        s.commit()
    assert first_page()[0] == (40, "")


@pytest.mark.parametrize("scope", [None, frozenset({0, 3, 9, 46})], ids=["whole run", "share"])
def test_previous_and_next_concepts(run_url, scope):
    indices = sorted(scope) if scope is not None else list(range(47))
    with session_factory(run_url)() as s:
        run = get_run(s, run_id=1)
        for index in [0, 3, 9, 20, 46]:
            expected = (max((i for i in indices if i < index), default=None),
                        min((i for i in indices if i > index), default=None))
            assert concept_service._prev_next(s, run, index, scope) == expected


def test_a_cached_views_key_weighs_the_same_whatever_its_search_text_or_scope(run_url):
    """The cache's budget counts the ids it keeps, not its keys: a key holding a link holder's
    search text or a share's concept list would let requests grow memory without bound (1,500
    searches of 12 KB each kept 19 MB before the key became a digest)."""
    def key_bytes(filters: ConceptFilters, scope: frozenset[int] | None) -> int:
        with session_factory(run_url)() as s:
            key = concept_service._order_key(s, get_run(s, run_id=1), filters, scope, after_label_edits=True)
        return len(pickle.dumps(key[1:]))  # the database aside

    short = key_bytes(ConceptFilters(q="x"), None)
    assert key_bytes(ConceptFilters(q="x" * 500), frozenset(range(500))) == short
    assert key_bytes(ConceptFilters(q="y"), None) == short
    with session_factory(run_url)() as s:
        run = get_run(s, run_id=1)
        keys = {concept_service._order_key(s, run, ConceptFilters(**view), scope, after_label_edits=True)
                for view in ({}, {"q": "x"}, {"q": "y"}, {"tag": "x"}) for scope in (None, frozenset({1}))}
    assert len(keys) == 8  # distinct views keep distinct keys
    with session_factory(run_url)() as s:  # and one list keeps one key, however its URL spelt "none"
        run = get_run(s, run_id=1)
        same = {concept_service._order_key(s, run, ConceptFilters(**view), None)
                for view in ({}, {"q": "  "}, {"tag": ""}, {"mostly": ""})}
    assert len(same) == 1
