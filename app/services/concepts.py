"""The concept browser (filter, sort, search, paginate) and the concept page.

Statistics shown are the run's active mined statistics (on `concepts` and
`concept_model_stats`); images, histograms, neighbours and defect IoU come from the run's
active mining generation. What a card shows of a mine (firing per model, top thumbnails) is
read as one precomputed `concept_cards` row per concept, written by the mine; labels and tags
are read from their own tables on every request, so an edit shows at once.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, func, or_, select
from sqlalchemy.orm import Session

from app.models import (
    CamImage,
    Concept,
    ConceptCardData,
    ConceptDefectIoU,
    ConceptHistogram,
    ConceptModelStats,
    ConceptNeighbour,
    ConceptTag,
    ConceptTopImage,
    Image,
    LabelHistory,
    Run,
    RunModel,
)
from app.params import DB_INT_MAX
from app.schemas.concepts import (
    BrowserCard,
    BrowserPage,
    ConceptCard,
    ConceptDetail,
    ConceptFilters,
    ConceptPage,
    DefectIoU,
    MinedCard,
    ModelColumn,
    ModelFiring,
    Neighbour,
    Thumb,
)
from app.services import card_html
from app.services.concept_order import ordered_ids
from app.services.labels import label_history
from app.services.runs_view import run_summary

UNIVERSAL_ENTROPY = 0.8
"""A live concept with firing entropy at least this is 'universal' (fires across models)."""
NEIGHBOURS_SHOWN = 5

_SORT_COLUMNS = {
    "energy": Concept.energy,
    "entropy": Concept.firing_entropy,
    "cofire": Concept.cofire,
    "frequency": Concept.frequency,
    "index": Concept.index,
}


def fair_share(n_models: int) -> float:
    """A model's share of a concept's firings were they spread evenly over the run's models."""
    return 1.0 / n_models


def mostly_in(shares: Sequence[tuple[str, float]], n_models: int) -> list[str]:
    """The models a model-specific concept is "mostly in": every model holding at least its fair
    share of the concept's firings, largest share first (ties in the run's model order). One
    rule for the badge and for the browser's "Mostly in model" filter, so a concept badged
    "mostly A + B" is what that filter finds for A and for B. Never empty for a concept that
    fires: the largest share is at least the fair one. `shares` is (model, share) in model order."""
    fair = fair_share(n_models)
    named = [(share, position, model) for position, (model, share) in enumerate(shares) if share >= fair]
    return [model for _, _, model in sorted(named, key=lambda item: (-item[0], item[1]))]


def order_by(filters: ConceptFilters) -> tuple[Any, ...]:
    """The view's order: its sort key in the view's direction, ties by concept number. A
    statistic highest first breaks ties lowest number first, as its index (migration 0003:
    run_id, dead, the statistic descending, index) holds them; lowest first is that list exactly
    reversed (ties highest number first), so the database walks the same index backwards."""
    column = _SORT_COLUMNS[filters.sort]
    if filters.sort == "index":
        return (column.asc() if filters.direction == "asc" else column.desc(),)
    if filters.direction == "desc":
        return column.desc(), Concept.index.asc()
    return column.asc(), Concept.index.desc()


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def conditions(run: Run, filters: ConceptFilters, scope: Collection[int] | None) -> list[ColumnElement[bool]]:
    """WHERE clauses of the concepts of `run` a view shows: its filters, within `scope`."""
    where: list[ColumnElement[bool]] = [Concept.run_id == run.id]
    if scope is not None:
        where.append(Concept.index.in_(sorted(scope)))
    if filters.show_dead == "only":
        where.append(Concept.dead.is_(True))
    elif not filters.show_dead:
        where.append(Concept.dead.is_(False))
    if filters.min_entropy is not None:
        where.append(Concept.firing_entropy >= filters.min_entropy)
    if filters.max_entropy is not None:
        where.append(Concept.firing_entropy < filters.max_entropy)
    if filters.mostly:
        model_id = next((m.id for m in run.models if m.name == filters.mostly), -1)
        # The badge's rule (`mostly_in`): model-specific, and the model has its fair share or more.
        # IN (subquery) rather than a correlated EXISTS: the matching ids come from one index range.
        where.append(Concept.firing_entropy < UNIVERSAL_ENTROPY)
        where.append(Concept.id.in_(select(ConceptModelStats.concept_id).where(
            ConceptModelStats.run_model_id == model_id,
            ConceptModelStats.share >= fair_share(len(run.models)))))
    if filters.labelled == "labelled":
        where.append(Concept.label != "")
    elif filters.labelled == "unlabelled":
        where.append(Concept.label == "")
    if filters.tag:
        where.append(Concept.id.in_(select(ConceptTag.concept_id).where(ConceptTag.tag == filters.tag)))
    if filters.q.strip():
        q = filters.q.strip()
        pattern = f"%{_escape_like(q.lower())}%"
        matches = [func.lower(Concept.label).like(pattern, escape="\\"),
                   func.lower(Concept.description).like(pattern, escape="\\")]
        number = q.removeprefix("#")
        if number.isascii() and number.isdigit() and int(number) <= DB_INT_MAX:  # "110" or "#110": that concept too
            matches.append(Concept.index == int(number))
        where.append(or_(*matches))
    return where


# What a card shows of a concept; plain columns (no ORM objects) keep the browser fast.
_CARD_COLUMNS = (Concept.id, Concept.index, Concept.label, Concept.energy, Concept.firing_entropy, Concept.cofire,
                 Concept.frequency, Concept.dead)


def _order_key(session: Session, run: Run, filters: ConceptFilters, scope: Collection[int] | None, *,
               after_label_edits: bool = False) -> tuple | None:
    """Concept lists are paged from a cached id list under this key: the database, the run's
    active generation and the view, its page aside (app/services/concept_order.py). A list that
    filters on labels, tags or search text changes with every edit: None, unless
    `after_label_edits` keys it by the newest edit too (every label, description or tag edit adds
    a history row and ids are never reused), so walking such a list does not read it whole on
    every concept page."""
    by_labels = bool(filters.q.strip() or filters.tag or filters.labelled != "any")
    if by_labels and not after_label_edits:
        return None
    # A digest, not the view itself: a cached key then weighs the same whatever the search text
    # or the share's concept list, so keys cannot grow memory past the cache's budget.
    same = {"q": filters.q.strip(), "tag": filters.tag or None, "mostly": filters.mostly or None}  # one key per list
    view = (sorted({**filters.model_dump(exclude={"page", "per_page"}), **same}.items()),
            None if scope is None else sorted(scope))
    return (session.get_bind(), run.id, run.active_generation_id, hashlib.sha256(repr(view).encode()).digest(),
            session.scalar(_NEWEST_LABEL_EDIT) if by_labels else None)


def _view_ids(session: Session, key: tuple, filters: ConceptFilters, where: list[ColumnElement[bool]]):
    """The view's concept ids in its order, kept under `key` (app/services/concept_order.py).
    Core, not ORM, execution: a whole run's ids are read (about 15 ms for 32,768, ORM 21)."""
    return ordered_ids(key, lambda: session.connection().execute(
        select(Concept.id).where(*where).order_by(*order_by(filters))).scalars().all())


_CARD_ROWS = select(*_CARD_COLUMNS).where(Concept.id.in_(bindparam("ids", expanding=True)))


def _page_rows(session: Session, run: Run, filters: ConceptFilters, scope: Collection[int] | None,
               where: list[ColumnElement[bool]]) -> tuple[int, list[Any]]:
    """(matching concepts, this page's card rows in browser order)."""
    order = order_by(filters)
    offset = (filters.page - 1) * filters.per_page
    key = _order_key(session, run, filters, scope)
    if key is not None:
        ids = _view_ids(session, key, filters, where)
        page_ids = ids[offset:offset + filters.per_page].tolist()
        by_id = {row.id: row for row in session.execute(_CARD_ROWS, {"ids": page_ids})} if page_ids else {}
        return len(ids), [by_id[i] for i in page_ids if i in by_id]
    total = session.scalar(select(func.count()).select_from(Concept).where(*where)) or 0
    rows = session.execute(select(*_CARD_COLUMNS).where(*where).order_by(*order)
                           .limit(filters.per_page).offset(offset)).all()
    return total, list(rows)


def _browse(session: Session, run: Run, filters: ConceptFilters,
            scope: Collection[int] | None) -> tuple[int, int, list[Any], list[str]]:
    """(matching concepts, pages, this page's card rows, tags in use) of a browser view."""
    where = conditions(run, filters, scope)
    total, rows = _page_rows(session, run, filters, scope, where)
    return total, max(1, math.ceil(total / filters.per_page)), rows, run_tags(session, run_id=run.id, scope=scope)


def browse_concepts(session: Session, *, run: Run, filters: ConceptFilters,
                    scope: Collection[int] | None = None) -> ConceptPage:
    """One page of concepts matching `filters`, within `scope` (a share's concept indices)."""
    total, pages, rows, tags = _browse(session, run, filters, scope)
    return ConceptPage(run=run_summary(run), filters=filters, total=total, pages=pages,
                       concepts=concept_cards(session, run=run, concepts=rows), tags=tags)


def browse_page(session: Session, *, run: Run, filters: ConceptFilters,
                scope: Collection[int] | None = None) -> BrowserPage:
    """The same page as `browse_concepts`, as the browser page shows it (stored card markup)."""
    total, pages, rows, tags = _browse(session, run, filters, scope)
    run_max = run_max_frequency(session, run) if scope is None else None
    hidden_dead = 0
    if total == 0 and not filters.show_dead:  # would the dead ones match? (only worth asking when nothing does)
        hidden_dead = session.scalar(select(func.count()).select_from(Concept).where(
            *conditions(run, filters.model_copy(update={"show_dead": True}), scope)))
    return BrowserPage(run=run_summary(run), filters=filters, total=total, pages=pages,
                       concepts=browser_cards(session, run=run, concepts=rows), tags=tags,
                       run_max_frequency=run_max,
                       hidden_dead=hidden_dead)


def run_max_frequency(session: Session, run: Run) -> float | None:
    """The run's most frequent model-concept pair: the one scale of every firing bar, so a bar
    means the same on every page. Recorded by the mine; read from the statistics for a run
    mined before it was recorded (None before any mine)."""
    recorded = (run.metrics or {}).get("max_frequency")
    if isinstance(recorded, (int, float)):
        return float(recorded)
    return session.scalar(select(func.max(ConceptModelStats.frequency))
                          .join(Concept, Concept.id == ConceptModelStats.concept_id).where(Concept.run_id == run.id))


def run_tags(session: Session, *, run_id: int, scope: Collection[int] | None = None) -> list[str]:
    """Tags in use. Driven from the (small) tag table: a run has far more concepts than tags."""
    in_run = select(Concept.id).where(Concept.id == ConceptTag.concept_id, Concept.run_id == run_id)
    if scope is not None:
        in_run = in_run.where(Concept.index.in_(sorted(scope)))
    return list(session.scalars(select(ConceptTag.tag).where(in_run.exists()).distinct().order_by(ConceptTag.tag)))


# The per-request queries of the browser and the concept page, built once with bound
# parameters: building and cache-keying a statement costs more Python time than SQLite
# takes to run most of these.
_CARD_PAYLOADS = select(ConceptCardData.concept_id, ConceptCardData.payload).where(
    ConceptCardData.concept_id.in_(bindparam("ids")), ConceptCardData.generation_id == bindparam("gen"))
_BROWSER_CARDS = select(ConceptCardData.concept_id, ConceptCardData.thumbs_html, ConceptCardData.firing_html,
                        ConceptCardData.html_format, ConceptCardData.max_frequency).where(
    ConceptCardData.concept_id.in_(bindparam("ids")), ConceptCardData.generation_id == bindparam("gen"))
_FAIR_SHARES = (select(ConceptModelStats.concept_id, ConceptModelStats.run_model_id, ConceptModelStats.share)
                .where(ConceptModelStats.concept_id.in_(bindparam("ids")), ConceptModelStats.share >= bindparam("fair")))
_TOP_IMAGES = (select(ConceptTopImage.run_model_id, ConceptTopImage.rank, ConceptTopImage.activation,
                      ConceptTopImage.heatmap_path, Image.thumbnail_path, Image.view_path, Image.image_key)
               .join(Image, Image.id == ConceptTopImage.image_id)
               .where(ConceptTopImage.concept_id == bindparam("concept"),
                      ConceptTopImage.generation_id == bindparam("gen")))
_TAGS = (select(ConceptTag.concept_id, ConceptTag.tag).where(ConceptTag.concept_id.in_(bindparam("ids")))
         .order_by(ConceptTag.tag))
_NEWEST_LABEL_EDIT = select(func.max(LabelHistory.id))
_CONCEPT = select(Concept).where(Concept.run_id == bindparam("run"), Concept.index == bindparam("index"))
_HISTOGRAMS = select(ConceptHistogram).where(ConceptHistogram.concept_id == bindparam("concept"),
                                             ConceptHistogram.generation_id == bindparam("gen"))
_CAMS = select(CamImage.run_model_id, CamImage.file_path, CamImage.params).where(
    CamImage.concept_id == bindparam("concept"))
_NEIGHBOURS = (select(ConceptNeighbour.run_model_id, ConceptNeighbour.cosine, Concept.index, Concept.label)
               .join(Concept, Concept.id == ConceptNeighbour.neighbour_id)
               .where(ConceptNeighbour.concept_id == bindparam("concept"),
                      ConceptNeighbour.generation_id == bindparam("gen"))
               .order_by(ConceptNeighbour.run_model_id, ConceptNeighbour.rank))
_DEFECT_IOU = (select(ConceptDefectIoU.defect_type, ConceptDefectIoU.run_model_id, ConceptDefectIoU.iou)
               .where(ConceptDefectIoU.concept_id == bindparam("concept"),
                      ConceptDefectIoU.generation_id == bindparam("gen"))
               .order_by(ConceptDefectIoU.defect_type, ConceptDefectIoU.run_model_id))


def card_ranks(n_models: int) -> int:
    """Top images per model on a card: four thumbnails in all for one or two models, else one each."""
    return {1: 4, 2: 2}.get(n_models, 1)


def _card_tags(session: Session, ids: list[int]) -> dict[int, list[str]]:
    tags: dict[int, list[str]] = defaultdict(list)
    for concept_id, tag in session.execute(_TAGS, {"ids": ids}):
        tags[concept_id].append(tag)
    return tags


def concept_cards(session: Session, *, run: Run, concepts: Sequence[Any]) -> list[ConceptCard]:
    """Cards for `concepts` (rows or Concept objects with the `_CARD_COLUMNS` attributes). A
    concept without a card row of the active generation (a run not mined yet) has no firing
    statistics and no thumbnails, as it has no rows in the tables the card is made from."""
    ids = [c.id for c in concepts]
    mined = {concept_id: MinedCard.model_validate_json(payload)
             for concept_id, payload in session.execute(_CARD_PAYLOADS, {"ids": ids, "gen": run.active_generation_id})}
    tags = _card_tags(session, ids)
    named = _mostly_in(session, run, [c.id for c in concepts if not c.dead and not _universal(c)])
    empty = MinedCard(firing=[], thumbs=[])
    cards = []
    for c in concepts:
        card = mined.get(c.id, empty)
        cards.append(ConceptCard(
            index=c.index, label=c.label, tags=tags.get(c.id, []), energy=c.energy, firing_entropy=c.firing_entropy,
            cofire=c.cofire, frequency=c.frequency, dead=c.dead, universal=_universal(c),
            mostly_in=named.get(c.id, []), firing=card.firing, thumbs=card.thumbs))
    return cards


def _universal(c: Any) -> bool:
    return not c.dead and c.firing_entropy >= UNIVERSAL_ENTROPY


_Stored = tuple[str, str, float]
"""A card's mined part on the browser page: thumbnails and firing-bar markup, largest frequency."""


def browser_cards(session: Session, *, run: Run, concepts: Sequence[Any]) -> list[BrowserCard]:
    """The browser page's cards for `concepts` (rows with the `_CARD_COLUMNS` attributes):
    stored markup as is; a row of another fragment template, of a mine before migration 0006,
    or a concept without a row (a run not mined yet) is made from its JSON now, so the page
    always shows current markup and only its speed waits for the next mine."""
    ids = [c.id for c in concepts]
    gen = run.active_generation_id
    stored: dict[int, _Stored] = {
        concept_id: (thumbs, firing, fmax)
        for concept_id, thumbs, firing, fmt, fmax in session.execute(_BROWSER_CARDS, {"ids": ids, "gen": gen})
        if fmt == card_html.FORMAT and fmax is not None}
    stale = [i for i in ids if i not in stored]
    if stale:
        mined = {concept_id: MinedCard.model_validate_json(payload)
                 for concept_id, payload in session.execute(_CARD_PAYLOADS, {"ids": stale, "gen": gen})}
        for concept_id in stale:
            card = mined.get(concept_id) or MinedCard(firing=[], thumbs=[])
            stored[concept_id] = (*card_html.render(card, len(run.models)), card_html.max_frequency(card))
    tags = _card_tags(session, ids)
    named = _mostly_in(session, run, [c.id for c in concepts if not c.dead and not _universal(c)])
    return [BrowserCard(concept=c, tags=tags.get(c.id, []), universal=_universal(c),
                        mostly_in=named.get(c.id, []), thumbs_html=thumbs, firing_html=firing, max_frequency=fmax)
            for c in concepts for thumbs, firing, fmax in (stored[c.id],)]


def _mostly_in(session: Session, run: Run, ids: list[int]) -> dict[int, list[str]]:
    """`mostly_in` of the concepts `ids`, read from the statistics rows at or over the fair share."""
    if not ids:
        return {}
    models = {m.id: m.name for m in run.models}  # in model order
    position = {model_id: i for i, model_id in enumerate(models)}
    shares: dict[int, list[tuple[int, str, float]]] = defaultdict(list)
    for concept_id, model_id, share in session.execute(
            _FAIR_SHARES, {"ids": ids, "fair": fair_share(len(run.models))}):
        shares[concept_id].append((position[model_id], models[model_id], share))
    return {concept_id: mostly_in([(name, share) for _, name, share in sorted(rows)], len(run.models))
            for concept_id, rows in shares.items()}


def _top_images(session: Session, run: Run, concept: Concept) -> list[Thumb]:
    """Every top image of the concept in the active generation, by model order then rank."""
    names = {m.id: m.name for m in run.models}
    order = {m.id: m.position for m in run.models}
    rows = session.execute(_TOP_IMAGES, {"concept": concept.id, "gen": run.active_generation_id})
    return [Thumb(model=names[model_id], rank=rank, activation=activation, heatmap=heatmap, thumbnail=thumbnail,
                  view=view, image_key=key)
            for model_id, rank, activation, heatmap, thumbnail, view, key
            in sorted(rows, key=lambda row: (order[row[0]], row[1]))]


def get_concept(session: Session, *, run_id: int, index: int) -> Concept | None:
    return session.scalar(_CONCEPT, {"run": run_id, "index": index})


def _trim_histogram(edges: list[float], counts: list[int]) -> tuple[list[float], list[int]]:
    """Drop empty bins at both ends (mining uses one wide geometric range for every concept)."""
    nonzero = [i for i, n in enumerate(counts) if n > 0]
    if not nonzero:
        return [], []
    first, last = nonzero[0], nonzero[-1]
    return [float(e) for e in edges[first:last + 2]], [int(n) for n in counts[first:last + 1]]


def _neighbours(session: Session, run: Run, concept: Concept,
                scope: Collection[int] | None) -> dict[int, list[Neighbour]]:
    if run.active_generation_id is None:
        return {}
    rows = session.execute(_NEIGHBOURS, {"concept": concept.id, "gen": run.active_generation_id})
    found: dict[int, list[Neighbour]] = defaultdict(list)
    for model_id, cosine, index, label in rows:
        if (scope is None or index in scope) and len(found[model_id]) < NEIGHBOURS_SHOWN:
            found[model_id].append(Neighbour(index=index, label=label, cosine=cosine))
    return found


def _neighbour_indices(scoped: bool) -> Select:
    """The previous and next concept index of the run (within a share's concepts when
    `scoped`), as one statement: each side is one probe of the (run_id, index) key."""
    def side(bound: Any, other: Any) -> Any:
        where = [Concept.run_id == bindparam("run"), bound]
        if scoped:
            where.append(Concept.index.in_(bindparam("scope", expanding=True)))
        return select(other).where(*where).scalar_subquery()

    return select(side(Concept.index < bindparam("index"), func.max(Concept.index)),
                  side(Concept.index > bindparam("index"), func.min(Concept.index)))


_PREV_NEXT = {scoped: _neighbour_indices(scoped) for scoped in (False, True)}


def _prev_next(session: Session, run: Run, index: int, scope: Collection[int] | None) -> tuple[int | None, int | None]:
    params: dict[str, Any] = {"run": run.id, "index": index}
    if scope is not None:
        params["scope"] = sorted(scope)
    prev, nxt = session.execute(_PREV_NEXT[scope is not None], params).one()
    return prev, nxt


def _in_view(session: Session, run: Run, concept: Concept, view: ConceptFilters,
             scope: Collection[int] | None) -> tuple[int | None, int | None, int, int] | None:
    """(previous index, next index, 1-based place, length) of `concept` in the browser list
    `view`, read as the browser pages it (the cached order of a statistics-only view); None when
    the concept is not in that list (an edit took it out of a label search, say)."""
    where = conditions(run, view, scope)
    key = _order_key(session, run, view, scope, after_label_edits=True)
    ids = _view_ids(session, key, view, where)
    try:
        place = ids.index(concept.id)
    except ValueError:
        return None
    prev_id = ids[place - 1] if place > 0 else None
    next_id = ids[place + 1] if place + 1 < len(ids) else None
    wanted = [i for i in (prev_id, next_id) if i is not None]
    index_of = dict(session.execute(select(Concept.id, Concept.index).where(Concept.id.in_(wanted))).all()) \
        if wanted else {}
    return index_of.get(prev_id), index_of.get(next_id), place + 1, len(ids)


def concept_detail(session: Session, *, run: Run, concept: Concept, scope: Collection[int] | None = None,
                   view: ConceptFilters | None = None) -> ConceptDetail:
    """Everything the concept page shows; neighbours and prev/next stay inside `scope`, and
    prev/next follow the browser list `view` when the page was opened from one."""
    card = concept_cards(session, run=run, concepts=[concept])[0]
    top_images = _top_images(session, run, concept)
    gen = run.active_generation_id
    histograms = {h.run_model_id: h for h in session.scalars(_HISTOGRAMS, {"concept": concept.id, "gen": gen})}
    cams = {model_id: (path, params) for model_id, path, params in session.execute(_CAMS, {"concept": concept.id})}
    neighbours = _neighbours(session, run, concept, scope)
    firing = {f.model: f for f in card.firing}
    columns = []
    for model in run.models:
        hist = histograms.get(model.id)
        edges, counts = _trim_histogram(hist.bin_edges, hist.counts) if hist else ([], [])
        columns.append(ModelColumn(
            model=model.name, family=model.family,
            firing=firing.get(model.name) or ModelFiring(model=model.name, fire_count=0, frequency=0.0, share=0.0,
                                                         cofire=0.0, max_activation=0.0),
            top_images=[t for t in top_images if t.model == model.name],
            histogram_edges=edges, histogram_counts=counts,
            cam_image=cams[model.id][0] if model.id in cams else None,
            cam_activation=cams[model.id][1].get("final") if model.id in cams else None,
            cam_peak=cams[model.id][1].get("peak") if model.id in cams else None,
            neighbours=neighbours.get(model.id, []),
        ))
    listed = _in_view(session, run, concept, view, scope) if view is not None else None
    if listed is None:
        prev_index, next_index = _prev_next(session, run, concept.index, scope)
        position = total = None
    else:
        prev_index, next_index, position, total = listed
    return ConceptDetail(
        run=run_summary(run), card=card, description=concept.description, version=concept.version,
        updated_at=concept.updated_at, columns=columns, history=label_history(session, concept_id=concept.id),
        defect_iou=_defect_iou(session, run, concept), prev_index=prev_index, next_index=next_index,
        view_position=position, view_total=total,
    )


def _defect_iou(session: Session, run: Run, concept: Concept) -> list[DefectIoU]:
    names = {m.id: m.name for m in run.models}
    rows = session.execute(_DEFECT_IOU, {"concept": concept.id, "gen": run.active_generation_id})
    return [DefectIoU(defect_type=defect_type, model=names[model_id], iou=iou) for defect_type, model_id, iou in rows]


def strongest_images(session: Session, run: Run, concept_ids: dict[int, int],
                      models: dict[int, str]) -> dict[tuple[int, str], Thumb]:
    """(concept index, model name) -> the concept's strongest image in that model (rank 0 of
    the active mine), for the concepts and models given (concept id -> index, model id -> name)."""
    if not concept_ids or run.active_generation_id is None:
        return {}
    rows = session.execute(
        select(ConceptTopImage.concept_id, ConceptTopImage.run_model_id, ConceptTopImage.activation,
               ConceptTopImage.heatmap_path, Image.thumbnail_path, Image.image_key)
        .join(Image, Image.id == ConceptTopImage.image_id)
        .where(ConceptTopImage.generation_id == run.active_generation_id, ConceptTopImage.rank == 0,
               ConceptTopImage.concept_id.in_(concept_ids), ConceptTopImage.run_model_id.in_(models)))
    return {(concept_ids[concept_id], models[model_id]):
            Thumb(model=models[model_id], rank=0, activation=activation, heatmap=heatmap, thumbnail=thumbnail,
                  image_key=key)
            for concept_id, model_id, activation, heatmap, thumbnail, key in rows}
