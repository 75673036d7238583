"""A browser card's mined part (top thumbnails, firing bars) as HTML, rendered once by the
mine and stored with the card row instead of on every page: those two loops were the larger
part of the browser template's time (docs/benchmarks.md, 2026-12-03).

Rows carry the `FORMAT` they were rendered with, a hash of the fragment template and of the
number and name formatting it uses (`templating._percent`, `formatting.measure`,
`formatting.short_name`); a row of an
older template (or of a mine before migration 0005) is rendered from its JSON when shown, so a
page always has the current markup and only the speed waits for the next mine. Media links are
an analyst's; `templating.stored_html` gives a share-link holder theirs.
"""

from __future__ import annotations

import hashlib
import inspect
import math

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import ConceptCardData, MiningGeneration, RunModel
from app.schemas.concepts import MinedCard
from app import formatting, templating
from app.templating import TEMPLATES_DIR, templates
from app.urls import ANALYST_URLS

FRAGMENT = "concepts/_card_mined.html"


def card_columns(n_models: int) -> int:
    """Thumbnail columns of a card: four for one or two models (several images each), one per
    model for three or four, and two rows for more (five to eight models: three or four
    columns; beyond, rows of four): every model keeps a thumbnail."""
    if n_models <= 2:
        return 4
    return n_models if n_models <= 4 else min(math.ceil(n_models / 2), 4)


def max_frequency(mined: MinedCard) -> float:
    """The card's longest firing bar: without the run's scale (a link to some concepts, which
    sees only theirs), a page's bars are scaled to the largest over its cards."""
    return max((f.frequency for f in mined.firing), default=0.0)


def stored_row(mined: MinedCard, n_models: int) -> dict[str, object]:
    """The `concept_cards` columns a mine writes for one card, besides its keys: the JSON (for
    the API and the concept page), the markup and what the browser page reads beside it
    (migration 0006), so a browser page needs no JSON parsed for a card of the current FORMAT."""
    thumbs_html, firing_html = render(mined, n_models)
    return {"payload": mined.model_dump_json(), "thumbs_html": thumbs_html, "firing_html": firing_html,
            "html_format": FORMAT, "max_frequency": max_frequency(mined)}


def render(mined: MinedCard, n_models: int) -> tuple[str, str]:
    """(thumbnails, firing bars) of one card, with an analyst's media links."""
    fragment = templates.env.get_template(FRAGMENT).module
    cols = card_columns(n_models)
    slots = cols * math.ceil(max(cols, n_models) / cols)  # whole rows: 5 models on 3 columns leave one blank
    return str(fragment.thumbs(mined, cols, slots, ANALYST_URLS)), str(fragment.firing(mined))


FORMAT = hashlib.sha256((TEMPLATES_DIR / FRAGMENT).read_bytes() + b"".join(
    inspect.getsource(f).encode()
    for f in (templating._percent, formatting.measure, formatting.short_name, card_columns, render))
).hexdigest()[:16]
"""The markup's version: a hash of the fragment template and the Python that lays it out."""


def refresh_stale_cards(sessions: sessionmaker[Session], batch: int = 2000) -> int:
    """Re-render the stored markup of shown cards that an older fragment template rendered (an
    app upgrade that changed the card), as their next mine would; returns how many. Until then
    the browser renders those cards on every page: correct, but at 32 clients on a 32,768-concept
    run it took the page's p95 from ~170 to ~260 ms (docs/benchmarks.md). `usae serve` runs this
    once before its workers start. Each batch commits alone and every row is rewritten whole,
    so an interrupted refresh leaves each card in one format or the other."""
    stale = (select(ConceptCardData, MiningGeneration.run_id)
             .join(MiningGeneration, MiningGeneration.id == ConceptCardData.generation_id)
             .where(MiningGeneration.status == "active", ConceptCardData.html_format.is_distinct_from(FORMAT))
             .limit(batch))
    done = 0
    with sessions() as session:
        n_models = dict(session.execute(select(RunModel.run_id, func.count()).group_by(RunModel.run_id)).all())
        while rows := session.execute(stale).all():
            for card, run_id in rows:
                for column, value in stored_row(MinedCard.model_validate_json(card.payload), n_models[run_id]).items():
                    setattr(card, column, value)
            session.commit()
            done += len(rows)
    return done
