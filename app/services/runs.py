"""Registering a trained run (a run directory plus the store it is mined on) in the database."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Run, RunModel
from usae_core.errors import UsaeError
from usae_core.model import CONFIG_FILE
from usae_core.train import read_training_log


def read_run_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UsaeError(f"{run_dir} is not a USAE run (no {CONFIG_FILE}); train one with `usae train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsaeError(f"{path} is not valid JSON: {exc}") from None


def image_set_name(store) -> str:
    """What the explorer calls the store's images: its image folder, else the store's name."""
    meta = store.meta
    if meta.get("image_set"):
        return str(meta["image_set"])
    if meta.get("image_root"):
        return Path(meta["image_root"]).name
    return Path(store.root).resolve().name


def register_run(session: Session, run_dir: Path, store, *, name: str | None = None) -> Run:
    """Create or update the run row named after `run_dir` (and its models) for `store`.

    Re-registering the same directory refreshes its config and models; a different directory
    under a name already taken is refused rather than silently merged."""
    run_dir = Path(run_dir).resolve()
    config = read_run_config(run_dir)
    dims = config.get("usae", {}).get("model_dims", {})
    if dims != store.dims:
        raise UsaeError(f"run {run_dir.name} was trained on models {dims}, but store {store.root} has {store.dims}")
    name = name or run_dir.name
    run = session.scalar(select(Run).where(Run.name == name))
    if run is not None and Path(run.run_dir) != run_dir:
        raise UsaeError(f"a run named {name!r} is already registered from {run.run_dir}")
    if run is None:
        run = Run(name=name)
        session.add(run)
    run.run_dir = str(run_dir)
    run.store_dir = str(Path(store.root).resolve())
    run.image_set = image_set_name(store)
    run.n_images = store.n_images
    run.n_tokens = store.n_tokens
    run.n_concepts = int(config["usae"]["n_concepts"])
    run.k = int(config["usae"]["k"])
    run.config = config
    _sync_models(run, store)
    session.flush()
    return run


def _sync_models(run: Run, store) -> None:
    existing = {m.name: m for m in run.models}
    grid_h, grid_w = store.grid
    rows = []
    for position, name in enumerate(store.model_names):
        info = store.model_info(name)
        row = existing.get(name) or RunModel(name=name)
        row.position, row.dim, row.grid_h, row.grid_w = position, store.dims[name], grid_h, grid_w
        row.family = str(info.get("family", ""))
        row.info = info
        rows.append(row)
    run.models = rows


TRAINING_CURVE_POINTS = 300
"""Logged steps kept for the overview's training charts (evenly spaced, the last always)."""


def training_curve(run_dir: str | Path) -> dict | None:
    """`{"step": [...], "loss": [...], "r2": {model: [...]}}` from the run's training log, thinned
    to at most TRAINING_CURVE_POINTS records; None when the run has no log."""
    records = read_training_log(run_dir)
    if not records:
        return None
    n = len(records)
    keep = sorted({round(i * (n - 1) / (TRAINING_CURVE_POINTS - 1)) for i in range(TRAINING_CURVE_POINTS)}) \
        if n > TRAINING_CURVE_POINTS else range(n)
    kept = [records[i] for i in keep]
    models = list(kept[-1].get("r2", {}))

    def number(value) -> float | None:
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    return {"step": [r["step"] for r in kept], "loss": [number(r.get("loss")) for r in kept],
            "r2": {m: [number(r.get("r2", {}).get(m)) for r in kept] for m in models}}
