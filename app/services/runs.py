"""Registering a trained run (a run directory plus the store it is mined on) in the database,
and removing one from it."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.models import CamImage, Concept, Job, LabelHistory, Run, RunModel, ShareLink, utcnow
from app.services.jobs import ACTIVE
from app.services.runs_view import effective_status
from usae_core.errors import UsaeError
from usae_core.model import CONFIG_FILE, not_a_run_message
from usae_core.train import read_training_log


def read_run_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UsaeError(not_a_run_message(run_dir))
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
        raise UsaeError(f"a run named {name!r} is already registered from {run.run_dir}; remove that one first "
                        f"with `usae runs delete {name}` (its labels go with it)")
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


def find_run(session: Session, key: str) -> Run:
    """The run named `key`, else the run with id `key`; a clear error naming the runs there are."""
    run = session.scalar(select(Run).where(Run.name == key))
    if run is None and key.isascii() and key.isdigit() and len(key) < 19:
        run = session.get(Run, int(key))
    if run is None:
        names = list(session.scalars(select(Run.name).order_by(Run.id)))
        known = f"the runs are {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}" if names else "there are no runs"
        raise UsaeError(f"no run named {key!r} is in the database ({known}; `usae runs list` shows them)")
    return run


@dataclass(frozen=True)
class RunContents:
    """What removing a run from the database takes with it."""

    concepts: int
    labelled: int
    label_edits: int
    cam_images: int
    audit_links: int
    """Links not revoked and not expired: people who can open the run now."""


def run_contents(session: Session, *, run: Run) -> RunContents:
    in_run = select(Concept.id).where(Concept.run_id == run.id)
    links = select(func.count()).select_from(ShareLink).where(
        ShareLink.run_id == run.id, ShareLink.revoked_at.is_(None),
        or_(ShareLink.expires_at.is_(None), ShareLink.expires_at > utcnow()))
    return RunContents(
        concepts=session.scalar(select(func.count()).select_from(Concept).where(Concept.run_id == run.id)) or 0,
        labelled=session.scalar(select(func.count()).select_from(Concept)
                                .where(Concept.run_id == run.id, Concept.label != "")) or 0,
        label_edits=session.scalar(select(func.count()).select_from(LabelHistory)
                                   .where(LabelHistory.concept_id.in_(in_run))) or 0,
        cam_images=session.scalar(select(func.count()).select_from(CamImage)
                                  .where(CamImage.concept_id.in_(in_run))) or 0,
        audit_links=session.scalar(links) or 0)


def run_media_folders(run_id: int) -> tuple[str, str]:
    """The run's folders under the media directory: its mining generations and its CAM images.
    Mining and CAM jobs write inside them; `delete_run` removes them."""
    return f"runs/{run_id}", f"cam/run-{run_id}"


def delete_run(session: Session, *, run: Run, media_dir: Path) -> None:
    """Remove the run from the database (concepts, labels and their history, mined data, CAM
    images, audit links, finished jobs) in one committed transaction, then its media folders.
    The run directory and the store are the user's files and stay. Refused while a mine or a
    job of the run is under way, which would fail half-way.

    A process killed between the commit and the file removal leaves folders no run points at;
    `remove_orphaned_run_media` deletes them, and run ids are never reused (migration 0011)."""
    if effective_status(session, run) == "mining":
        raise UsaeError(f"run {run.name} is being mined right now; wait for the mine to finish (or stop it) first")
    busy = session.scalar(select(func.count()).select_from(Job).where(Job.run_id == run.id, Job.status.in_(ACTIVE)))
    if busy:
        raise UsaeError(f"run {run.name} has {busy} CAM job{'s' if busy != 1 else ''} queued or running; "
                        "cancel them on the Jobs page, or wait for them to finish, first")
    run_id = run.id
    session.execute(delete(Job).where(Job.run_id == run_id))
    # The run's active generation points back at it: unlink before the cascade deletes both.
    session.execute(update(Run).where(Run.id == run_id).values(active_generation_id=None))
    session.execute(delete(Run).where(Run.id == run_id))
    session.commit()
    session.expunge_all()
    for folder in run_media_folders(run_id):
        shutil.rmtree(media_dir / folder, ignore_errors=True)


def remove_orphaned_run_media(session: Session, *, media_dir: Path) -> list[str]:
    """Delete media folders of runs no longer in the database (a `delete_run` killed after its
    commit); returns them, relative to the media directory. Folders are listed before the runs
    are read, and a mine commits its run before it makes any folder, so a new run's folder is
    never taken for an orphan."""
    candidates: dict[int, list[str]] = {}
    for parent, prefix in (("runs", ""), ("cam", "run-")):
        for folder in sorted((media_dir / parent).iterdir()) if (media_dir / parent).is_dir() else []:
            number = folder.name.removeprefix(prefix)
            if folder.is_dir() and folder.name.startswith(prefix) and number.isascii() and number.isdigit():
                candidates.setdefault(int(number), []).append(f"{parent}/{folder.name}")
    known = set(session.scalars(select(Run.id).where(Run.id.in_(candidates)))) if candidates else set()
    removed = [path for run_id, paths in candidates.items() if run_id not in known for path in paths]
    for path in removed:
        shutil.rmtree(media_dir / path, ignore_errors=True)
    return removed
