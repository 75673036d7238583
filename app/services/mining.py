"""Writing a mined run into the database and the media directory, crash-safely.

A mine builds a new `MiningGeneration`: rendered files go under its own media folder, and its
rows (top images, histograms, neighbours, defect IoU and each concept's precomputed browser
card) are written one transaction per batch of concepts. Nothing of it is visible until one
final transaction points the run at it and swaps in the new concept statistics; only then is
the previous generation deleted. A crash or kill at any earlier point leaves the previous
generation as it was; the half-built one is cleaned up by the next mine.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker
from tqdm.auto import tqdm

from app.db import session_factory
from app.models import (
    Concept,
    ConceptCardData,
    ConceptDefectIoU,
    ConceptHistogram,
    ConceptModelStats,
    ConceptNeighbour,
    ConceptTopImage,
    Image,
    MiningGeneration,
    Run,
    utcnow,
)
from app.schemas.concepts import MinedCard, ModelFiring
from app.schemas.images import Thumb
from app.services import card_html
from app.services.concepts import card_ranks
from app.services.runs import register_run, run_media_folders, training_curve
from app.services.runs_view import mining_owner
from usae_core import render
from usae_core.atomic import atomic_path
from usae_core.devices import resolve_device
from usae_core.mining import DefectMasks, MiningConfig, MiningResult, NoDefectMasks, mine_store, top_image_heatmaps

log = logging.getLogger(__name__)

LAYER_SIZE = 64
"""Pixels of a heatmap layer: a transparent colour map the explorer stacks over the thumbnail."""
THUMBNAIL_SIZE = 224
"""Pixels of an image's thumbnail (one per image, shared by every concept it is a top image of)."""
VIEW_SIZE = 512
"""Most pixels of an image's enlarged view, written only where the source is larger than the thumbnail."""
ProgressCallback = Callable[[float, str], None]
_GENERATION_FOLDER = re.compile(r"g[0-9]+")
"""The name of a generation's media folder (`_media_prefix`)."""


@dataclass
class MineOutcome:
    run_id: int
    generation_id: int
    n_concepts: int
    n_top_images: int
    seconds: float


@dataclass
class _RunIds:
    run_id: int
    generation_id: int
    media_prefix: str
    models: list[int]
    """run_models.id in the USAE's model order."""
    model_names: list[str]
    """Model names in the USAE's model order."""
    display_order: list[int]
    """Positions in the USAE's model order, listed in the run's model order (the explorer's)."""
    concepts: dict[int, int]
    """concept index -> concepts.id."""
    previous_status: str
    """The run's status before this mine, which an interrupted re-mine leaves it in."""


class _StoredImage(NamedTuple):
    """An `images` row of the generation being built."""

    id: int
    key: str
    thumbnail: str


def mine_run(url: str, media_dir: Path, run_dir: Path, store, model, *, cfg: MiningConfig | None = None,
             device: str = "cpu", batch_concepts: int = 64, progress: bool = False,
             on_progress: ProgressCallback | None = None) -> MineOutcome:
    """Mine `model` (the USAE of `run_dir`) over `store` into the database at `url`."""
    cfg = cfg or MiningConfig()
    started = time.monotonic()
    model.to(resolve_device(device))  # once: the library hands a model back where it found it
    Session = session_factory(url)
    ids = _start_generation(Session, media_dir, run_dir, store, model, cfg)
    report = on_progress or (lambda fraction, message: None)
    try:
        report(0.0, "streaming over the store")
        result = mine_store(model, store, cfg, device=device, masks=store_defect_masks(store), progress=progress)
        report(0.5, "rendering top images")
        n_top = _write_concept_batches(Session, media_dir, ids, store, model, result, cfg, device, batch_concepts,
                                       progress, report)
        # Rendered files were renamed into place without per-file fsync (hundreds of
        # thousands of them); make them durable once, before the database points at them.
        os.sync()
        old_generation = _activate(Session, ids, result, cfg, training_curve(run_dir))
    except BaseException as exc:
        _record_failure(Session, media_dir, ids, exc)
        raise
    _drop_generations(Session, media_dir, [old_generation] if old_generation else [])
    # The concept browser's query plans depend on table statistics, which a mine changes wholesale.
    with Session() as s:
        s.execute(text("ANALYZE"))
        s.commit()
    report(1.0, "done")
    return MineOutcome(ids.run_id, ids.generation_id, result.n_concepts, n_top, time.monotonic() - started)


# --------------------------------------------------------------------------- start


def _start_generation(Session: sessionmaker, media_dir: Path, run_dir: Path, store, model,
                      cfg: MiningConfig) -> _RunIds:
    with Session.begin() as s:
        run = register_run(s, run_dir, store)
        others = select(MiningGeneration.id).where(MiningGeneration.run_id == run.id)
        if run.active_generation_id is not None:
            others = others.where(MiningGeneration.id != run.active_generation_id)
        leftovers = list(s.scalars(others))
    # Half-built or retired generations of earlier mines that were interrupted.
    _drop_generations(Session, media_dir, leftovers)
    _remove_orphaned_media(Session, media_dir, run.id)
    with Session.begin() as s:
        run = s.get(Run, run.id)
        previous_status = run.status
        run.status, run.error = "mining", None
        generation = MiningGeneration(run_id=run.id, status="building", media_prefix="", params={
            "top_n": cfg.top_n, "tau": cfg.tau, "hist_bins": cfg.hist_bins, "neighbours": cfg.neighbours,
            "heatmap_size": LAYER_SIZE, "thumbnail_size": THUMBNAIL_SIZE,
            "owner": mining_owner(),
        })
        s.add(generation)
        s.flush()
        generation.media_prefix = _media_prefix(run.id, generation.id)
        _ensure_concepts(s, run.id, model.cfg.n_concepts)
        by_name = {m.name: m for m in run.models}
        return _RunIds(
            run_id=run.id,
            generation_id=generation.id,
            media_prefix=generation.media_prefix,
            models=[by_name[n].id for n in model.names],
            model_names=list(model.names),
            display_order=sorted(range(len(model.names)), key=lambda i: by_name[model.names[i]].position),
            concepts=dict(s.execute(select(Concept.index, Concept.id).where(Concept.run_id == run.id)).all()),
            previous_status=previous_status,
        )


def _ensure_concepts(s: Session, run_id: int, n_concepts: int) -> None:
    """Concept rows carry the labels, so they outlive mines: add only the missing indices."""
    have = set(s.scalars(select(Concept.index).where(Concept.run_id == run_id)))
    missing = [{"run_id": run_id, "index": i} for i in range(n_concepts) if i not in have]
    if missing:
        s.execute(insert(Concept), missing)


# --------------------------------------------------------------------------- per concept batch


def store_defect_masks(store) -> DefectMasks | None:
    """Defect masks of a demo image set, when the store's images are one."""
    try:
        return DefectMasks.from_store(store)
    except NoDefectMasks:  # not a demo set: mined without masks (a broken one is an error)
        return None


class _ImageViews:
    """An image's thumbnail and, where the source is larger, its enlarged view: both the same
    centre square, so one heatmap layer fits either."""

    def __init__(self, store):
        self._root = store.meta.get("image_root")
        self._ids = store.image_ids
        self._warned = False

    def squares(self, index: int) -> tuple[PILImage.Image, PILImage.Image | None]:
        from usae_core.images import load_image, square_view

        if self._root:
            try:
                image = load_image(Path(self._root) / self._ids[index])
            except (OSError, ValueError) as exc:
                if not self._warned:
                    log.warning("cannot read image %s (%s); drawing heatmaps on grey", self._ids[index], exc)
                    self._warned = True
            else:
                side = min(image.size)
                view = square_view(image, min(side, VIEW_SIZE)) if side > THUMBNAIL_SIZE else None
                return square_view(image, THUMBNAIL_SIZE), view
        return render.placeholder(THUMBNAIL_SIZE), None


def _write_concept_batches(Session: sessionmaker, media_dir: Path, ids: _RunIds, store, model, result: MiningResult,
                           cfg: MiningConfig, device: str, batch_concepts: int, progress: bool,
                           report: ProgressCallback) -> int:
    views = _ImageViews(store)
    images: dict[int, _StoredImage] = {}  # store index -> its row, for the images written so far
    model_stats = _ModelStatistics(result)
    vmax = result.top_values[:, :, 0]
    n_top = 0
    concepts = list(range(result.n_concepts))
    batches = [concepts[i : i + batch_concepts] for i in range(0, len(concepts), batch_concepts)]

    def write_squares(img: int) -> tuple[str, str | None]:
        """Write image `img`'s thumbnail (and enlarged view, if any); their paths."""
        thumb, view = views.squares(img)
        paths = f"{ids.media_prefix}/thumbs/{img}.jpg", f"{ids.media_prefix}/views/{img}.jpg" if view else None
        write_image(media_dir / paths[0], thumb)
        if view is not None:
            write_image(media_dir / paths[1], view)
        return paths

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for done, batch in enumerate(tqdm(batches, desc="render", unit="batch", disable=not progress)):
            heat = top_image_heatmaps(model, store, result, batch, cfg, device=device)
            new_images = sorted({int(result.top_images[i, c, r]) for i, c, r in heat} - set(images))
            files = {key: f"{ids.media_prefix}/heatmaps/{model.names[key[0]]}/{key[1]}/{key[2]}.png" for key in heat}
            layers = pool.map(lambda key: write_image(media_dir / files[key], render.heatmap_layer(
                heat[key], vmax[key[0], key[1]], LAYER_SIZE)), heat)
            squares = dict(zip(new_images, pool.map(write_squares, new_images)))
            list(layers)
            with Session.begin() as s:
                if new_images:
                    rows = s.execute(insert(Image).returning(Image.store_index, Image.id, Image.image_key,
                                                             Image.thumbnail_path), [
                        {"generation_id": ids.generation_id, "store_index": img, "image_key": store.image_ids[img],
                         "thumbnail_path": squares[img][0], "view_path": squares[img][1]} for img in new_images])
                    images.update({index: _StoredImage(*row) for index, *row in rows})
                n_top += _insert_concept_rows(s, ids, result, model_stats, batch, heat, files, images)
            report(0.5 + 0.5 * (done + 1) / len(batches), f"rendered {min((done + 1) * batch_concepts, len(concepts))}"
                   f" of {len(concepts)} concepts")
    return n_top


def _insert_concept_rows(s: Session, ids: _RunIds, result: MiningResult, model_stats: _ModelStatistics,
                         batch: list[int], heat: dict, files: dict, images: dict[int, _StoredImage]) -> int:
    gen = ids.generation_id
    tops, hists, neighbours, ious, cards = [], [], [], [], []
    edges = result.hist_edges
    for c in batch:
        cid = ids.concepts[c]
        card = _mined_card(ids, result, model_stats, c, heat, files, images)
        cards.append({"generation_id": gen, "concept_id": cid, **card_html.stored_row(card, len(ids.models))})
        for i, model_id in enumerate(ids.models):
            common = {"generation_id": gen, "concept_id": cid, "run_model_id": model_id}
            for r in range(result.top_images.shape[2]):
                if (i, c, r) in heat:
                    tops.append({**common, "rank": r, "image_id": images[int(result.top_images[i, c, r])].id,
                                 "activation": float(result.top_values[i, c, r]),
                                 "max_token": int(result.top_tokens[i, c, r]), "heatmap_path": files[(i, c, r)]})
            counts = result.hist_counts[i, c]
            used = np.flatnonzero(counts)
            lo, hi = (used[0], used[-1] + 1) if used.size else (0, 0)
            hists.append({**common, "bin_edges": edges[lo : hi + 1].tolist() if used.size else [],
                          "counts": counts[lo:hi].tolist(), "n_zero": int(result.stats.n_tokens - counts.sum())})
            for rank, (n, cos) in enumerate(zip(result.neighbours[i, c], result.neighbour_cosine[i, c])):
                neighbours.append({**common, "rank": rank, "neighbour_id": ids.concepts[int(n)], "cosine": float(cos)})
            if result.defect_iou is not None:
                ious += [{**common, "defect_type": kind, "iou": float(result.defect_iou[i, c, d])}
                         for d, kind in enumerate(result.defect_types)]
    for table, rows in ((ConceptTopImage, tops), (ConceptHistogram, hists), (ConceptNeighbour, neighbours),
                        (ConceptDefectIoU, ious), (ConceptCardData, cards)):
        if rows:
            s.execute(insert(table), rows)
    return len(tops)


class _ModelStatistics:
    """A concept's statistics in one model, as `concept_model_stats` stores them and its card
    shows them (one computation for both, so they are the same numbers)."""

    def __init__(self, result: MiningResult):
        self._stats = result.stats
        self._max_activation = result.max_activation
        self._totals = result.stats.fire_counts.sum(0)
        self._n_tokens = max(result.stats.n_tokens, 1)

    def of(self, concept: int, model: int) -> dict[str, int | float]:
        stats, c, i = self._stats, concept, model
        fires, total = stats.fire_counts[i, c], self._totals[c]
        return {"fire_count": int(fires), "frequency": float(fires / self._n_tokens),
                "share": float(fires / total) if total else 0.0, "cofire": float(stats.cofire[i, c]),
                "mean_activation": float(stats.code_sums[i, c] / self._n_tokens),
                "max_activation": float(self._max_activation[i, c])}


def _mined_card(ids: _RunIds, result: MiningResult, model_stats: _ModelStatistics, c: int, heat: dict, files: dict,
                images: dict[int, _StoredImage]) -> MinedCard:
    """Concept `c`'s card as the browser shows it: firing and the first top images of each model."""
    firing, thumbs = [], []
    for i in ids.display_order:
        name = ids.model_names[i]
        stats = model_stats.of(c, i)
        firing.append(ModelFiring(model=name, fire_count=stats["fire_count"], frequency=stats["frequency"],
                                  share=stats["share"], cofire=stats["cofire"],
                                  max_activation=stats["max_activation"]))
        for r in range(min(card_ranks(len(ids.models)), result.top_images.shape[2])):
            if (i, c, r) in heat:
                image = images[int(result.top_images[i, c, r])]
                thumbs.append(Thumb(model=name, rank=r, activation=float(result.top_values[i, c, r]),
                                    heatmap=files[(i, c, r)], thumbnail=image.thumbnail, image_key=image.key))
    return MinedCard(firing=firing, thumbs=thumbs)


def write_image(path: Path, image: PILImage.Image) -> None:
    """Write a PNG (or a JPEG for a `.jpg` path) under a temporary name and rename it into
    place (never a half file)."""
    buf = io.BytesIO()
    if path.suffix == ".jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=88)
    else:
        image.save(buf, format="PNG", compress_level=1)
    with atomic_path(path, durable=False) as tmp:
        tmp.write_bytes(buf.getvalue())


# --------------------------------------------------------------------------- flip and cleanup


def _activate(Session: sessionmaker, ids: _RunIds, result: MiningResult, cfg: MiningConfig,
              training: dict | None) -> int | None:
    """One transaction: new concept statistics, the run points at the new generation."""
    stats = result.stats
    n_models = len(result.models)
    total = stats.fire_counts.sum(0)
    model_stats = _ModelStatistics(result)
    concept_table = Concept.__table__
    with Session.begin() as s:
        s.execute(
            update(concept_table).where(concept_table.c.id == bindparam("cid")).values(
                energy=bindparam("energy"), firing_entropy=bindparam("entropy"), cofire=bindparam("cof"),
                fire_count=bindparam("fires"), frequency=bindparam("freq"), dead=bindparam("is_dead")),
            [{"cid": ids.concepts[c], "energy": float(stats.energy[c]), "entropy": float(stats.firing_entropy[c]),
              "cof": float(stats.cofire[:, c].mean()), "fires": int(total[c]),
              "freq": float(total[c] / max(stats.n_tokens * n_models, 1)), "is_dead": bool(stats.dead[c])}
             for c in range(result.n_concepts)],
        )
        s.execute(delete(Concept).where(Concept.run_id == ids.run_id, Concept.index >= result.n_concepts))
        concept_ids = select(Concept.id).where(Concept.run_id == ids.run_id)
        s.execute(delete(ConceptModelStats).where(ConceptModelStats.concept_id.in_(concept_ids)))
        stats_rows = [{"concept_id": ids.concepts[c], "run_model_id": model_id, **model_stats.of(c, i)}
                      for c in range(result.n_concepts) for i, model_id in enumerate(ids.models)]
        s.execute(insert(ConceptModelStats), stats_rows)
        run = s.get(Run, ids.run_id)
        old = run.active_generation_id
        if old is not None:
            s.get(MiningGeneration, old).status = "retired"
        generation = s.get(MiningGeneration, ids.generation_id)
        if generation is None:
            raise RuntimeError(f"mining generation {ids.generation_id} vanished; was the run mined twice at once?")
        generation.status, generation.finished_at = "active", utcnow()
        run.active_generation_id = generation.id
        run.status, run.error, run.mined_at = "mined", None, utcnow()
        run.metrics = _json_safe({**stats.summary(), "top_n": cfg.top_n, "training": training,
                                  # the browser's firing bars share this one scale on every page
                                  "max_frequency": max((r["frequency"] for r in stats_rows), default=0.0)})
    return old


def _json_safe(value):
    """`value` with NaN / infinity as None: Postgres rejects them in JSON (a one-model run has
    no cross R², a constant target no R² at all), and readers treat None as "not defined"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _record_failure(Session: sessionmaker, media_dir: Path, ids: _RunIds, exc: BaseException) -> None:
    """Best effort: note how the mine ended on the run and drop the half-built generation (the
    next mine drops it anyway if this process cannot)."""
    try:
        with Session.begin() as s:
            run = s.get(Run, ids.run_id)
            if run.active_generation_id == ids.generation_id:
                return  # interrupted after the switch: the new generation is complete
            run.status, run.error = _status_after_stopping(run, ids, exc)
        _drop_generations(Session, media_dir, [ids.generation_id])
    except Exception:  # noqa: BLE001 - the original error matters more than this note
        log.exception("could not clean up after the failed mine of run %s", ids.run_id)


def _status_after_stopping(run: Run, ids: _RunIds, exc: BaseException) -> tuple[str, str]:
    """(status, error) of a run whose mine stopped before its switch. A re-mine interrupted by
    the user (Ctrl-C) leaves the run's status as it was: its active generation is intact and
    still shown, so only the error notes the interruption. A first mine, and a mine that failed
    with an error, mark the run failed."""
    if not isinstance(exc, KeyboardInterrupt):
        return "failed", f"{type(exc).__name__}: {exc}"[:2000]
    if run.active_generation_id is None:
        return "failed", "the first mine was interrupted (KeyboardInterrupt); mine the run again"
    log.warning("mine of run %s interrupted; it still shows its previous mine", run.name)
    # "mining" was a mine killed before this one: the run shows what it showed then, a finished mine.
    status = "mined" if ids.previous_status == "mining" else ids.previous_status
    return status, "a re-mine was interrupted (KeyboardInterrupt); the previous mine is still shown"


def _run_media(run_id: int) -> str:
    """The folder of a run's generation media folders, relative to the media directory."""
    return run_media_folders(run_id)[0]


def _media_prefix(run_id: int, generation_id: int) -> str:
    """A generation's media folder, relative to the media directory."""
    return f"{_run_media(run_id)}/g{generation_id}"


def _drop_generations(Session: sessionmaker, media_dir: Path, generation_ids: list[int]) -> None:
    """Delete generations (their rows cascade) and then their rendered files; a generation
    that is some run's active one is never dropped. A process killed between the two leaves
    a folder no row points at, which `_remove_orphaned_media` deletes at the next mine."""
    for gid in generation_ids:
        with Session.begin() as s:
            generation = s.get(MiningGeneration, gid)
            if generation is None or s.scalar(select(Run.id).where(Run.active_generation_id == gid)):
                continue
            prefix = generation.media_prefix
            s.delete(generation)
        if prefix:
            shutil.rmtree(media_dir / prefix, ignore_errors=True)


def _remove_orphaned_media(Session: sessionmaker, media_dir: Path, run_id: int) -> None:
    """Delete the run's generation media folders that no generation row points at any more
    (left by a mine killed after deleting a generation's rows, before its files). The active
    generation always has its row, so its folder is never touched."""
    with Session() as s:
        kept = set(s.scalars(select(MiningGeneration.media_prefix).where(MiningGeneration.run_id == run_id)))
    run_media = media_dir / _run_media(run_id)
    for folder in run_media.iterdir() if run_media.is_dir() else []:
        if _GENERATION_FOLDER.fullmatch(folder.name) and f"{_run_media(run_id)}/{folder.name}" not in kept:
            shutil.rmtree(folder, ignore_errors=True)
