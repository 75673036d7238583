"""The concepts a browser view matches, as one CSV table: every page of it, for a spreadsheet
or an audit file.

One row per concept, in the view's order: its label, description and tags, whether it is
universal or model-specific and then which models it is mostly in (the badge), its run-wide
statistics, per model its frequency, share of firings, co-fire and largest activation, and
per defect type its best overlap (IoU) with the defect's masks over the models.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Collection, Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Concept, ConceptDefectIoU, ConceptModelStats, ConceptTag, Run
from app.schemas.concepts import ConceptFilters
from app.services.concepts import UNIVERSAL_ENTROPY, conditions, mostly_in, order_by

_CHUNK = 2000
"""Concepts per query of their statistics: IN lists far below every database's limit."""

EXCEL_BOM = "\ufeff"
"""Put before a CSV file's text: without the byte-order mark Excel reads UTF-8 as a legacy code
page, and labels in any language come out garbled."""

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""A text cell starting with one of these is a formula to Excel and LibreOffice."""


def _text(value: str) -> str:
    """User text as a cell that a spreadsheet shows as text, never runs as a formula (OWASP
    "CSV injection": a leading apostrophe)."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def _number(value: float) -> str:
    return f"{value:.6g}"


def concept_table(session: Session, *, run: Run, filters: ConceptFilters,
                  scope: Collection[int] | None = None) -> Iterable[list[str]]:
    """The header, then one row per concept matching `filters` (all pages), within `scope`."""
    models = sorted(run.models, key=lambda m: m.position)
    gen = run.active_generation_id
    defects = list(session.scalars(select(ConceptDefectIoU.defect_type).where(ConceptDefectIoU.generation_id == gen)
                                   .distinct().order_by(ConceptDefectIoU.defect_type))) if gen else []
    yield (["concept", "label", "description", "tags", "status", "mostly in", "energy", "firing entropy", "co-fire", "frequency"]
           + [f"{m.name} {stat}" for m in models
              for stat in ("frequency", "share of firings", "co-fire", "max activation")]
           + [f"{d} best IoU" for d in defects])
    concepts = session.execute(select(Concept.id, Concept.index, Concept.label, Concept.description, Concept.dead,
                                      Concept.energy, Concept.firing_entropy, Concept.cofire, Concept.frequency)
                               .where(*conditions(run, filters, scope)).order_by(*order_by(filters))).all()
    for start in range(0, len(concepts), _CHUNK):
        chunk = concepts[start:start + _CHUNK]
        ids = [c.id for c in chunk]
        tags: dict[int, list[str]] = defaultdict(list)
        for concept_id, tag in session.execute(select(ConceptTag.concept_id, ConceptTag.tag)
                                               .where(ConceptTag.concept_id.in_(ids)).order_by(ConceptTag.tag)):
            tags[concept_id].append(tag)
        stats = {(s.concept_id, s.run_model_id): s for s in session.execute(
            select(ConceptModelStats.concept_id, ConceptModelStats.run_model_id, ConceptModelStats.frequency,
                   ConceptModelStats.share, ConceptModelStats.cofire, ConceptModelStats.max_activation)
            .where(ConceptModelStats.concept_id.in_(ids)))}
        iou = {(concept_id, defect): best for concept_id, defect, best in session.execute(
            select(ConceptDefectIoU.concept_id, ConceptDefectIoU.defect_type, func.max(ConceptDefectIoU.iou))
            .where(ConceptDefectIoU.concept_id.in_(ids), ConceptDefectIoU.generation_id == gen)
            .group_by(ConceptDefectIoU.concept_id, ConceptDefectIoU.defect_type))} if defects else {}
        for c in chunk:
            status = "dead" if c.dead else "universal" if c.firing_entropy >= UNIVERSAL_ENTROPY else "model-specific"
            named = mostly_in([(m.name, stats[c.id, m.id].share) for m in models if (c.id, m.id) in stats],
                              len(models)) if status == "model-specific" else []
            row = [str(c.index), _text(c.label), _text(c.description), _text("; ".join(tags.get(c.id, []))), status,
                   _text(" + ".join(named)), _number(c.energy), _number(c.firing_entropy), _number(c.cofire), _number(c.frequency)]
            for m in models:
                s = stats.get((c.id, m.id))
                row += ([_number(s.frequency), _number(s.share), _number(s.cofire), _number(s.max_activation)]
                        if s else ["", "", "", ""])
            row += [_number(iou[c.id, d]) if (c.id, d) in iou else "" for d in defects]
            yield row


def concept_csv(session: Session, *, run: Run, filters: ConceptFilters, scope: Collection[int] | None = None) -> str:
    """`concept_table` as CSV text (RFC 4180: quoted where needed, CRLF line ends)."""
    out = io.StringIO()
    csv.writer(out).writerows(concept_table(session, run=run, filters=filters, scope=scope))
    return out.getvalue()
