"""A small synthetic mined run written straight into the app database, with real PNG files.

Until a real mine is cheap enough for every web test, this is the explorer's test data. It
fills every table the pages read (run, models, generation, images, concepts with per-model
statistics, top images with heatmaps, histograms, neighbours, defect IoU, the browser's card
rows, one CAM image) with
values whose meaning the tests know: concept 0 is universal, concept 1 fires only in the first
model, the last two concepts are dead, and so on (see `SeedRun`).

The benchmark reuses `seed_run` with `write_files=False` to build a 32k-concept run quickly.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.models import (
    CamImage,
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
    RunModel,
    User,
)
from app.schemas.concepts import MinedCard, ModelFiring
from app.schemas.images import Thumb
from app.security import hash_password
from app.services import card_html
from app.services.concepts import card_ranks

MODEL_SPECS = [("vit_s", "vit", 384), ("cnn_m", "resnet", 512), ("clip_b", "clip", 768)]
DEFECTS = ["crack", "scratch"]
PASSWORD = "correct horse battery"
HIST_EDGES = np.geomspace(1e-3, 1e3, 25).tolist()


@dataclass
class SeedRun:
    run_id: int
    name: str
    models: list[str]
    n_concepts: int
    universal: list[int] = field(default_factory=list)
    """Concepts firing evenly in every model (entropy ~ 1)."""
    only_first: list[int] = field(default_factory=list)
    """Concepts firing only in the first model (entropy 0, share 1 there)."""
    dead: list[int] = field(default_factory=list)
    media_prefix: str = ""
    cam_path: str | None = None


def _png(path: Path, rgb: tuple[int, int, int], size: int = 48, spot: bool = False) -> None:
    """A small solid image; `spot` paints a bright square where a 'heatmap' lights up."""
    a = np.empty((size, size, 3), dtype=np.uint8)
    a[:] = rgb
    if spot:
        a[size // 4: size // 2, size // 4: size // 2] = (250, 200, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(a).save(path)


def _firing_pattern(index: int, n_concepts: int, n_models: int) -> np.ndarray | None:
    """Per-model firing frequency of concept `index`; None for a dead concept."""
    if index >= n_concepts - 2:
        return None
    if index % 3 == 1:  # model-specific: only the first model
        return np.array([0.02 / (1 + index)] + [0.0] * (n_models - 1))
    base = 0.05 / (1 + index)
    return np.array([base * (1 + 0.05 * m) for m in range(n_models)])  # universal, nearly even


def _concept_row(run_id: int, c: int, n_concepts: int, n_tokens: int) -> dict:
    freq = _firing_pattern(c, n_concepts, len(MODEL_SPECS))
    dead = freq is None
    freq = np.zeros(len(MODEL_SPECS)) if freq is None else freq
    share = freq[freq > 0] / freq.sum() if freq.sum() > 0 else np.zeros(0)
    entropy = float(-(share * np.log(share)).sum() / math.log(len(MODEL_SPECS))) if len(share) else 0.0
    return {"run_id": run_id, "index": c, "energy": float(freq.sum() * 2.0), "firing_entropy": entropy,
            "cofire": 0.0 if dead or c % 3 == 1 else 0.6, "fire_count": int(freq.sum() * n_tokens),
            "frequency": float(freq.mean()), "dead": dead, "label": "", "description": "", "version": 1}


def _detail_rows(concepts: range, concept_ids: dict[int, int], gen_id: int, model_ids: list[int], n_images: int,
                 n_tokens: int, top_n: int, prefix: str, image_ids: dict[int, int],
                 rng: np.random.Generator) -> dict[type, list[dict]]:
    """Per-model statistics, histograms, top images, neighbours and defect IoU of `concepts`."""
    rows: dict[type, list[dict]] = {ConceptModelStats: [], ConceptHistogram: [], ConceptTopImage: [],
                                    ConceptNeighbour: [], ConceptDefectIoU: []}
    n_concepts = len(concept_ids)
    for c in concepts:
        cid = concept_ids[c]
        freq = _firing_pattern(c, n_concepts, len(model_ids))
        freq = np.zeros(len(model_ids)) if freq is None else freq
        total = freq.sum()
        for mi, model_id in enumerate(model_ids):
            common = {"concept_id": cid, "run_model_id": model_id}
            rows[ConceptModelStats].append({**common, "fire_count": int(freq[mi] * n_tokens), "frequency": float(freq[mi]),
                                            "share": float(freq[mi] / total) if total else 0.0,
                                            "cofire": 0.6 if freq[mi] > 0 and c % 3 != 1 else 0.0,
                                            "mean_activation": float(freq[mi]), "max_activation": float(30 * freq[mi])})
            common["generation_id"] = gen_id
            for rank, other in enumerate((c + d) % n_concepts for d in (1, 2, 3)):
                rows[ConceptNeighbour].append({**common, "rank": rank, "cosine": 0.9 - 0.1 * rank,
                                               "neighbour_id": concept_ids[other]})
            if freq[mi] == 0:
                continue
            counts = np.zeros(len(HIST_EDGES) - 1, dtype=int)
            counts[10:16] = rng.integers(1, 50, size=6)
            rows[ConceptHistogram].append({**common, "bin_edges": HIST_EDGES, "counts": counts.tolist(), "n_zero": 100})
            for rank in range(top_n):
                rows[ConceptTopImage].append({
                    **common, "rank": rank, "image_id": image_ids[(c * 7 + mi * 3 + rank) % n_images],
                    "activation": float(5.0 / (1 + rank)), "max_token": 5,
                    "heatmap_path": f"{prefix}/heatmaps/{c}/{MODEL_SPECS[mi][0]}-{rank}.png"})
        if c < len(DEFECTS) * 2:
            rows[ConceptDefectIoU].append({"generation_id": gen_id, "concept_id": cid, "run_model_id": model_ids[0],
                                           "defect_type": DEFECTS[c % len(DEFECTS)], "iou": 0.2 + 0.1 * c})
    return rows


def _card_rows(rows: dict[type, list[dict]], gen_id: int, model_names: dict[int, str],
               images: dict[int, tuple[str, str]]) -> list[dict]:
    """The browser card of each concept in `rows`, as a mine writes it (`images`: images.id ->
    (image key, thumbnail path)). Rows are in model order, top images by rank."""
    per_card = card_ranks(len(model_names))
    cards: dict[int, MinedCard] = {}
    for stats in rows[ConceptModelStats]:
        card = cards.setdefault(stats["concept_id"], MinedCard(firing=[], thumbs=[]))
        card.firing.append(ModelFiring(model=model_names[stats["run_model_id"]], **{
            key: stats[key] for key in ("fire_count", "frequency", "share", "cofire", "max_activation")}))
    for top in rows[ConceptTopImage]:
        if top["rank"] < per_card:
            key, thumbnail = images[top["image_id"]]
            cards[top["concept_id"]].thumbs.append(Thumb(
                model=model_names[top["run_model_id"]], rank=top["rank"], activation=top["activation"],
                heatmap=top["heatmap_path"], thumbnail=thumbnail, image_key=key))
    return [{"generation_id": gen_id, "concept_id": concept_id, **card_html.stored_row(card, len(model_names))}
            for concept_id, card in cards.items()]


def create_analyst(session: Session, username: str = "alice", password: str = PASSWORD) -> User:
    user = User(username=username, password_hash=hash_password(password))
    session.add(user)
    session.flush()
    return user


def seed_run(session: Session, media_dir: Path, *, name: str = "demo-run", n_concepts: int = 30,
             n_images: int = 24, top_n: int = 4, write_files: bool = True, n_tokens: int = 24 * 16,
             seed: int = 0, chunk: int = 2000) -> SeedRun:
    """Write one mined run (in chunks of `chunk` concepts); returns what the tests need to know."""
    rng = np.random.default_rng(seed)
    now = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    m = len(MODEL_SPECS)
    r2 = [[0.9 if i == j else 0.6 + 0.05 * (i + j) for j in range(m)] for i in range(m)]
    run = Run(name=name, run_dir=str(media_dir.parent / "runs" / name), store_dir=str(media_dir.parent / "stores" / name),
              image_set="synthetic-textures", n_images=n_images, n_tokens=n_tokens, n_concepts=n_concepts, k=8,
              config={}, metrics={"r2": r2, "r2_self": 0.9, "r2_cross": float(np.mean([r2[i][j] for i in range(m) for j in range(m) if i != j])),
                                  "tau": 0.1, "l0": [8.0] * m, "dead_fraction": 2 / n_concepts, "n_tokens": n_tokens},
              status="mined", created_at=now, mined_at=now)
    run.models = [RunModel(position=i, name=n, family=f, dim=d, grid_h=4, grid_w=4, info={"family": f, "registry_name": f"seeded:{n}"})
                  for i, (n, f, d) in enumerate(MODEL_SPECS)]
    session.add(run)
    session.flush()
    gen = MiningGeneration(run_id=run.id, status="active", params={"top_n": top_n},
                           media_prefix=f"runs/{run.id}/generation-1", started_at=now, finished_at=now)
    session.add(gen)
    session.flush()
    run.active_generation_id = gen.id
    prefix = gen.media_prefix
    info = SeedRun(run_id=run.id, name=name, models=[s[0] for s in MODEL_SPECS], n_concepts=n_concepts,
                   media_prefix=prefix)

    image_rows = [{"generation_id": gen.id, "store_index": i, "image_key": f"images/{i:05d}.png",
                   "thumbnail_path": f"{prefix}/thumbs/{i:05d}.png",
                   # odd images are "small sources": no enlarged view, the thumbnail is enlarged
                   "view_path": f"{prefix}/views/{i:05d}.png" if i % 2 == 0 else None} for i in range(n_images)]
    session.execute(insert(Image), image_rows)
    image_ids = dict(session.execute(select(Image.store_index, Image.id).where(Image.generation_id == gen.id)).all())
    images = {image_ids[i]: (row["image_key"], row["thumbnail_path"]) for i, row in enumerate(image_rows)}
    model_names = {rm.id: rm.name for rm in run.models}
    if write_files:
        for i in range(n_images):
            _png(media_dir / image_rows[i]["thumbnail_path"], (40 + 8 * i % 200, 90, 140))
            if image_rows[i]["view_path"]:
                _png(media_dir / image_rows[i]["view_path"], (40 + 8 * i % 200, 90, 140))

    for c in range(n_concepts):
        (info.dead if c >= n_concepts - 2 else info.only_first if c % 3 == 1 else info.universal).append(c)
    model_ids = [rm.id for rm in run.models]
    session.execute(insert(Concept), [_concept_row(run.id, c, n_concepts, n_tokens) for c in range(n_concepts)])
    concept_ids = dict(session.execute(select(Concept.index, Concept.id).where(Concept.run_id == run.id)).all())
    for start in range(0, n_concepts, chunk):
        rows = _detail_rows(range(start, min(n_concepts, start + chunk)), concept_ids, gen.id, model_ids, n_images,
                            n_tokens, top_n, prefix, image_ids, rng)
        rows[ConceptCardData] = _card_rows(rows, gen.id, model_names, images)
        for table, table_rows in rows.items():
            if table_rows:
                session.execute(insert(table), table_rows)
        if write_files:
            for top in rows[ConceptTopImage]:
                shade = model_ids.index(top["run_model_id"])
                _png(media_dir / top["heatmap_path"], (30 + 60 * shade, 60 + 20 * top["rank"], 90), spot=True)
    if write_files:
        info.cam_path = f"cam/{run.id}/0-{MODEL_SPECS[0][0]}.png"
        _png(media_dir / info.cam_path, (200, 100, 50))
        session.add(CamImage(concept_id=concept_ids[0], run_model_id=model_ids[0], file_path=info.cam_path))
    session.flush()
    return info
