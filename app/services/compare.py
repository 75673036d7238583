"""Two models of a run side by side: cross R², shared concepts and those only in one model
(`unique_a`, `unique_b`; "Only in A" on the page), frequency scatter.

With pA = fA / (fA + fB) the part of a concept's firing frequency that is model A's:
shared means 0.25 <= pA <= 0.75, only in A means pA >= 0.9 and only in B pA <= 0.1.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from app.models import Concept, ConceptModelStats, Run
from app.schemas.compare import Comparison, PairConcept
from app.services.concepts import strongest_images
from app.services.runs_view import run_summary
from usae_core.errors import UsaeError

SHARED_BAND = (0.25, 0.75)
UNIQUE_SHARE = 0.9
LIST_LENGTH = 15
"""Concepts a list shows at first: its most frequent."""
LIST_MAX = 1000
"""Concepts a list shows when asked for all of it (`show`): a page of thumbnails stays loadable."""
GROUPS = ("shared", "only_a", "only_b")
SCATTER_MAX_POINTS = 1500


def _r2(run: Run, source: int, target: int) -> float | None:
    r2 = run.metrics.get("r2") or []
    try:
        return float(r2[source][target])
    except (IndexError, TypeError, ValueError):
        return None


def pair_group(frequency_a: float, frequency_b: float) -> str:
    """Where a concept stands between models A and B (see the module's docstring)."""
    part_a = frequency_a / (frequency_a + frequency_b)
    if SHARED_BAND[0] <= part_a <= SHARED_BAND[1]:
        return "shared"
    if part_a >= UNIQUE_SHARE:
        return "only_a"
    if part_a <= 1 - UNIQUE_SHARE:
        return "only_b"
    return ""


def compare_models(session: Session, *, run: Run, model_a: str, model_b: str, show: str | None = None) -> Comparison:
    """`show`, one of GROUPS, lists that group's concepts in full (up to LIST_MAX), not its first LIST_LENGTH."""
    if show is not None and show not in GROUPS:
        raise UsaeError(f"show must be one of {', '.join(GROUPS)}, not {show!r}")
    models = {m.name: m for m in run.models}
    for name in (model_a, model_b):
        if name not in models:
            raise UsaeError(f"run {run.name!r} has no model {name!r}")
    if model_a == model_b:
        raise UsaeError("pick two different models")
    a, b = models[model_a], models[model_b]
    position = {m.name: i for i, m in enumerate(run.models)}  # rows and columns of the R² matrix
    stats_a, stats_b = aliased(ConceptModelStats), aliased(ConceptModelStats)
    rows = session.execute(
        select(Concept.id, Concept.index, Concept.label, Concept.energy, stats_a.frequency, stats_b.frequency)
        .join(stats_a, (stats_a.concept_id == Concept.id) & (stats_a.run_model_id == a.id))
        .join(stats_b, (stats_b.concept_id == Concept.id) & (stats_b.run_model_id == b.id))
        .where(Concept.run_id == run.id, (stats_a.frequency > 0) | (stats_b.frequency > 0))
    ).all()
    pairs = [PairConcept(index=i, label=label, energy=e, frequency_a=fa, frequency_b=fb, group=pair_group(fa, fb))
             for _, i, label, e, fa, fb in rows]
    shared = sorted((p for p in pairs if p.group == "shared"), key=lambda p: (-(p.frequency_a + p.frequency_b), p.index))
    unique_a = sorted((p for p in pairs if p.group == "only_a"), key=lambda p: (-p.frequency_a, p.index))
    unique_b = sorted((p for p in pairs if p.group == "only_b"), key=lambda p: (-p.frequency_b, p.index))
    n_shared, n_unique_a, n_unique_b = len(shared), len(unique_a), len(unique_b)
    length = {group: LIST_MAX if group == show else LIST_LENGTH for group in GROUPS}
    shared, unique_a, unique_b = shared[:length["shared"]], unique_a[:length["only_a"]], unique_b[:length["only_b"]]
    listed = {p.index for p in (*shared, *unique_a, *unique_b)}
    images = strongest_images(session, run, {cid: i for cid, i, *_ in rows if i in listed},
                               {a.id: model_a, b.id: model_b})

    def with_images(listing: list[PairConcept]) -> list[PairConcept]:
        return [p.model_copy(update={"image_a": images.get((p.index, model_a)),
                                     "image_b": images.get((p.index, model_b))}) for p in listing]

    by_frequency = sorted(pairs, key=lambda p: (-(p.frequency_a + p.frequency_b), p.index))
    return Comparison(
        run=run_summary(run), model_a=model_a, model_b=model_b,
        r2_a_to_b=_r2(run, position[model_a], position[model_b]),
        r2_b_to_a=_r2(run, position[model_b], position[model_a]),
        shared=with_images(shared), unique_a=with_images(unique_a), unique_b=with_images(unique_b),
        n_shared=n_shared, n_unique_a=n_unique_a, n_unique_b=n_unique_b,
        points=by_frequency[:SCATTER_MAX_POINTS], points_total=len(pairs), shown_in_full=show,
    )
