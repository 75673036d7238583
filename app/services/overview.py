"""The run overview: R² matrix, concept kinds, entropy histogram, co-fire vs energy, defects, and the
labelled concepts with each model's firing (what an auditor asks: which concepts does each model rely on)."""

from __future__ import annotations

import math

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Concept, ConceptDefectIoU, Run
from app.schemas.runs import (ConceptRef, DefectBest, DefectInModel, HistogramData, LabelledConcept, RunOverview, ScatterConcept,
                              TrainingCurve)
from app.services.concepts import UNIVERSAL_ENTROPY, concept_cards, run_max_frequency, strongest_images
from app.services.runs_view import effective_status, run_summary

ENTROPY_BINS = 20
SCATTER_MAX_POINTS = 1500
LABELLED_SHOWN = 40


def _finite_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _r2_matrix(run: Run) -> list[list[float | None]]:
    r2 = run.metrics.get("r2") or []
    m = len(run.models)
    return [[_finite_or_none(r2[i][j]) if i < len(r2) and j < len(r2[i]) else None for j in range(m)]
            for i in range(m)]


def run_overview(session: Session, *, run: Run) -> RunOverview:
    live = (Concept.run_id == run.id) & Concept.dead.is_(False)
    n_dead = session.scalar(select(func.count()).where(Concept.run_id == run.id, Concept.dead.is_(True))) or 0
    entropies = np.array(session.scalars(select(Concept.firing_entropy).where(live)).all(), dtype=np.float64)
    counts, edges = np.histogram(entropies, bins=ENTROPY_BINS, range=(0.0, 1.0))
    n_universal = int((entropies >= UNIVERSAL_ENTROPY).sum())
    strongest = session.execute(
        select(Concept.index, Concept.label, Concept.energy, Concept.cofire, Concept.firing_entropy)
        .where(live).order_by(Concept.energy.desc(), Concept.index).limit(SCATTER_MAX_POINTS))
    return RunOverview(
        run=run_summary(run, effective_status(session, run)), r2=_r2_matrix(run),
        r2_self=_finite_or_none(run.metrics.get("r2_self")), r2_cross=_finite_or_none(run.metrics.get("r2_cross")),
        universal_threshold=UNIVERSAL_ENTROPY, n_universal=n_universal,
        n_model_specific=len(entropies) - n_universal, n_dead=n_dead,
        entropy_histogram=HistogramData(edges=edges.tolist(), counts=counts.tolist()),
        cofire_energy=[ScatterConcept(index=i, label=label, energy=e, cofire=c, firing_entropy=h)
                       for i, label, e, c, h in strongest],
        cofire_energy_total=len(entropies), best_per_defect=_best_per_defect(session, run),
        labelled=[LabelledConcept(index=c.index, label=c.label, tags=c.tags, frequency=c.frequencies(),
                                  images={t.model: t for t in c.thumbs if t.rank == 0})
                  for c in concept_cards(session, run=run, concepts=list(session.scalars(
                      select(Concept).where(live, Concept.label != "").order_by(Concept.energy.desc(), Concept.index)
                      .limit(LABELLED_SHOWN))))],
        labelled_total=session.scalar(select(func.count()).where(live, Concept.label != "")) or 0,
        max_frequency=run_max_frequency(session, run),
        training=TrainingCurve(**run.metrics["training"]) if run.metrics.get("training") else None,
    )


def _best_per_defect(session: Session, run: Run) -> list[DefectBest]:
    """For each defect type, the concept (and model) whose firing overlaps its masks most, and
    each model's own best: which concept a model relies on for a crack, a stain, a dent."""
    if run.active_generation_id is None:
        return []
    gen = run.active_generation_id
    best = (select(ConceptDefectIoU.defect_type, ConceptDefectIoU.run_model_id,
                   func.max(ConceptDefectIoU.iou).label("iou"))
            .where(ConceptDefectIoU.generation_id == gen)
            .group_by(ConceptDefectIoU.defect_type, ConceptDefectIoU.run_model_id).subquery())
    rows = session.execute(
        select(ConceptDefectIoU.defect_type, ConceptDefectIoU.iou, ConceptDefectIoU.run_model_id,
               Concept.id, Concept.index, Concept.label)
        .join(best, (best.c.defect_type == ConceptDefectIoU.defect_type)
              & (best.c.run_model_id == ConceptDefectIoU.run_model_id) & (best.c.iou == ConceptDefectIoU.iou))
        .join(Concept, Concept.id == ConceptDefectIoU.concept_id)
        .where(ConceptDefectIoU.generation_id == gen)
        .order_by(ConceptDefectIoU.defect_type, Concept.index))
    names = {m.id: m.name for m in run.models}
    # (defect, model) -> its first row: ties go to the lowest concept number
    winners: dict[tuple[str, int], tuple] = {}
    for defect, iou, model_id, concept_id, index, label in rows:
        winners.setdefault((defect, model_id), (iou, concept_id, index, label))
    # Each concept's strongest image in its model: what the concept looks like there.
    images = strongest_images(session, run, {concept_id: index for _, concept_id, index, _ in winners.values()},
                              names)
    position = {m.id: i for i, m in enumerate(run.models)}
    by_defect: dict[str, list[DefectInModel]] = {}
    for (defect, model_id), (iou, _, index, label) in sorted(winners.items(), key=lambda w: (w[0][0], position[w[0][1]])):
        by_defect.setdefault(defect, []).append(DefectInModel(
            model=names[model_id], concept=ConceptRef(index=index, label=label), iou=iou,
            image=images.get((index, names[model_id]))))
    overall = []
    for defect in sorted(by_defect):
        top = min(by_defect[defect], key=lambda cell: (-cell.iou, cell.concept.index))
        overall.append(DefectBest(defect_type=defect, concept=top.concept, model=top.model, iou=top.iou,
                                  image=top.image, by_model=by_defect[defect]))
    return overall
