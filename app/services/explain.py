"""Explain an uploaded image: which concepts each model's tokens light up, and where.

The upload is validated (size, type, pixel count, decodable) before any model sees it. Each
model of the run runs its backbone (`usae_core.backbones`, by the registry name the store
recorded) on a square made of the image (`Framing`: its centre square, as extraction crops
every image, or the whole image padded with the model's mean colour); the tokens are resampled to the run's grid, encoded by
the run's USAE, and the strongest concepts are drawn as heatmaps over the image. A model whose
backbone cannot be loaded is reported with the reason; the others are still explained.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Concept, Run, RunModel
from app.schemas.explain import ExplainedConcept, ExplainedModel, Explanation
from usae_core.backbones.base import IMAGENET_MEAN
from usae_core.errors import UsaeError
from usae_core.extract import resample_grid
from usae_core.images import square_view, to_rgb
from usae_core.model import USAE
from usae_core.render import heatmap_overlay

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
MAX_PIXELS = 40_000_000
MIN_SIDE = 16
VIEW_SIZE = 320
CONCEPTS_PER_MODEL = 5
FRAMINGS = ("centre", "whole")
"""How a non-square upload becomes the square the models see: its centre square (as extraction
cut the run's images: the edges are not seen), or the whole image padded to a square (nothing
cut, at a lower resolution)."""


class UploadRejected(Exception):
    """A one-line reason the upload cannot be explained."""


def validate_upload(data: bytes, *, max_bytes: int) -> Image.Image:
    """Decoded upright RGB image, or UploadRejected saying what is wrong with the file."""
    if not data:
        raise UploadRejected("The file is empty.")
    if len(data) > max_bytes:
        raise UploadRejected(f"The file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB.")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind = probe.format
            width, height = probe.size
            if kind not in ACCEPTED_FORMATS:
                raise UploadRejected(f"{kind or 'This'} files are not accepted; upload a PNG, JPEG or WebP image.")
            if width * height > MAX_PIXELS:
                raise UploadRejected(f"The image is {width}x{height} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels.")
            if min(width, height) < MIN_SIDE:
                raise UploadRejected(f"The image is only {width}x{height} pixels; it needs at least {MIN_SIDE} on each side.")
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(img)
    except UploadRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise UploadRejected("This file is not a readable image (or it is damaged).") from None


def _data_url(img: Image.Image, kind: str = "JPEG") -> str:
    buffer = io.BytesIO()
    img.save(buffer, format=kind, quality=88)
    mime = "image/jpeg" if kind == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


@dataclass
class _Loaded:
    usae: USAE
    backbones: dict[str, object]
    """Model name -> Backbone, or the error message saying why it is unavailable."""


class ModelCache:
    """Loaded USAEs and backbones, kept between requests (loading takes seconds)."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str, float], _Loaded] = {}
        self._lock = threading.Lock()

    def get(self, run: Run) -> _Loaded:
        run_dir = Path(run.run_dir)
        weights = run_dir / "usae.safetensors"
        if not weights.is_file():
            raise UsaeError(f"the weights of run {run.name!r} are not at {run_dir} any more")
        key = (str(run_dir.resolve()), weights.stat().st_mtime)
        with self._lock:
            if key not in self._runs:
                self._runs[key] = _Loaded(USAE.from_pretrained(run_dir).eval(),
                                          {m.name: load_backbone(m.name, m.info) for m in run.models})
            return self._runs[key]


def load_backbone(model: str, info: dict) -> object:
    """A run model's backbone as its store recorded it (`info`: the store's model info), or a
    message saying why not."""
    name = info.get("registry_name")
    if not name:
        return (f"The store does not record which backbone produced {model} (its activations were imported), "
                "so new images cannot be run through it.")
    try:
        from usae_core.backbones import recorded_backbone

        # The weights file the extraction read, where it read a local one: the hub's or cache's
        # copy of the name may be other weights, or missing offline.
        return recorded_backbone(model, info)
    except (UsaeError, ImportError, OSError, RuntimeError) as exc:
        log.warning("backbone %s for %s unavailable: %s", name, model, exc)
        return f"The backbone {name} could not be loaded: {exc}"


def load_backbones(models: dict[str, dict]) -> tuple[dict[str, object], dict[str, str]]:
    """`{model: store info}` -> (the backbones that load, {model: why not} for the others)."""
    loaded, missing = {}, {}
    for name, info in models.items():
        backbone = load_backbone(name, info)
        if isinstance(backbone, str):
            missing[name] = backbone
        else:
            loaded[name] = backbone
    return loaded, missing


def framed_square(image: Image.Image, framing: str, fill: tuple[float, float, float]) -> Image.Image:
    """The square a model sees of `image`: its centre square, or the whole image centred on a
    square of colour `fill` (RGB in [0, 1]: a model's mean, which its normalisation turns into
    zeros, so the padding adds as little as an input can)."""
    if framing not in FRAMINGS:
        raise UploadRejected(f"Unknown framing {framing!r}; use one of: {', '.join(FRAMINGS)}.")
    width, height = image.size
    if framing == "centre" or width == height:
        return image  # square_view (preprocessing and the shown view) takes the centre square
    side = max(width, height)
    square = Image.new("RGB", (side, side), tuple(round(255 * c) for c in fill))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def framing_note(image: Image.Image, framing: str) -> str | None:
    """What part of a non-square upload the models saw (None for a square one)."""
    width, height = image.size
    if width == height:
        return None
    if framing == "centre":
        side = min(width, height)
        return (f"The models saw the centre {side}×{side} square of this {width}×{height} image, as the run's images "
                "were cut when they were extracted; the edges were not seen. Choose “the whole image” to include them.")
    return (f"The models saw the whole {width}×{height} image, padded to a square (grey bands), at a lower "
            "resolution than a centre square would have.")


@torch.no_grad()
def _token_codes(usae: USAE, backbone, model: RunModel, image: Image.Image) -> torch.Tensor:
    """Dense concept codes `[grid_h * grid_w, n_concepts]` of the image's tokens in one model."""
    native = backbone(backbone.preprocess(image)[None])  # [1, h*w, dim] on the backbone's own grid
    tokens = resample_grid(native, backbone.native_grid, (model.grid_h, model.grid_w))[0]  # as extraction did
    return usae.concept_codes(tokens, model.name)


def explain_image(session: Session, *, run: Run, image: Image.Image, cache: ModelCache,
                  framing: str = "centre") -> Explanation:
    view = square_view(framed_square(image, framing, IMAGENET_MEAN), VIEW_SIZE)  # an unknown framing: refused first
    loaded = cache.get(run)
    explained: list[ExplainedModel] = []
    for model in run.models:
        backbone = loaded.backbones[model.name]
        if isinstance(backbone, str):
            explained.append(ExplainedModel(model=model.name, concepts=[], error=backbone))
            continue
        codes = _token_codes(loaded.usae, backbone, model, framed_square(image, framing, backbone.mean))
        peak = codes.max(dim=0).values
        top = torch.topk(peak, k=min(CONCEPTS_PER_MODEL, peak.numel()))
        labels = dict(session.execute(select(Concept.index, Concept.label).where(
            Concept.run_id == run.id, Concept.index.in_(top.indices.tolist()))).all())
        concepts = []
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            if value <= 0:
                break
            heat = codes[:, index].reshape(model.grid_h, model.grid_w).numpy().astype(np.float32)
            concepts.append(ExplainedConcept(index=index, label=labels.get(index, ""), max_activation=value,
                                             heatmap_data_url=_data_url(heatmap_overlay(view, heat, vmax=value))))
        explained.append(ExplainedModel(model=model.name, concepts=concepts))
    return Explanation(run_id=run.id, image_data_url=_data_url(view), framing=framing,
                       framing_note=framing_note(image, framing), models=explained)
