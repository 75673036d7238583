"""CAM jobs: one coordinated-activation-maximisation image per model of a run, for one concept.

The run's USAE and backbones are loaded as the explain page loads them (a model whose
backbone is unavailable is skipped and named in the result), `usae_core.cam` optimises the
images, and the outcome lands atomically: each PNG is written to a temporary file and renamed
into `media/cam/run-R/concept-C/`, then one transaction replaces the concept's CAM rows and
marks the job done. Files of the replaced images are removed only after that commit, so a
crash at any point leaves the previous images or the new ones in place, never a mixture of
rows and missing files.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.formatting import measure
from app.models import CamImage, Job, RunModel
from app.services.concepts import get_concept
from app.services.explain import load_backbones
from app.services.jobs import JobCancelled, finish_job
from app.services.runs import run_media_folders
from app.services.runs_view import get_run
from app.settings import Settings
from usae_core.atomic import atomic_write_bytes
from usae_core.errors import UsaeError
from usae_core.store import check_model_name

log = logging.getLogger(__name__)
KIND = "cam"


class CamRequest(BaseModel):
    """What an analyst may choose for a CAM job (the rest are `usae_core.cam.CamConfig` defaults)."""

    steps: int = Field(128, ge=8, le=2048, description="Optimisation steps per model")
    image_size: int = Field(224, ge=64, le=512, description="Side of each image in pixels")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Same seed, same images")


def cam_unavailable(models: Iterable[RunModel]) -> str | None:
    """Why no CAM image can be made for a run, or None. Only the recorded backbone names are
    read here (loading the networks takes seconds, so a backbone that fails to load is found
    by the job, which skips it and says so)."""
    if any(m.info.get("registry_name") for m in models):
        return None
    return ("CAM images need the networks themselves, and none of this run's models records the backbone "
            "that produced its activations (they were imported). Extract them with the `usae extract` "
            "command to make CAM images.")


def cam_dir(run_id: int, concept_index: int) -> str:
    """Where a concept's CAM images live, relative to the media directory."""
    return f"{run_media_folders(run_id)[1]}/concept-{concept_index}"


def run_cam_job(settings: Settings, sessions: sessionmaker[Session], job: Job, progress) -> str:
    """Make the images, then in one transaction replace the concept's CAM rows and finish the job."""
    import torch

    from usae_core.cam import CamConfig, coordinated_activation_maximization
    from usae_core.model import USAE
    from usae_core.devices import resolve_device

    request = CamRequest.model_validate(job.params)
    index = job.concept_index
    with sessions() as session:
        run = get_run(session, run_id=job.run_id) if job.run_id is not None else None
        if run is None:
            raise UsaeError("the run of this job no longer exists")
        if index is None or get_concept(session, run_id=run.id, index=index) is None:
            raise UsaeError(f"run {run.name} has no concept {index}")
        models: list[RunModel] = list(run.models)
        for model in models:  # names become file names below: never a path (a hand-edited manifest)
            check_model_name(model.name)
        run_dir, run_id = Path(run.run_dir), run.id
    progress(0.0, "Loading the USAE and the backbones.")
    device = resolve_device(settings.device)
    usae = USAE.from_pretrained(run_dir).eval().to(device)
    backbones, skipped = load_backbones({m.name: m.info for m in models})
    backbones = {name: backbone.to(device) for name, backbone in backbones.items()}
    if not backbones:
        raise UsaeError("no model of this run has a backbone to optimise images for: " + " ".join(skipped.values()))

    names = list(backbones)

    def on_step(model: str, step: int, total: int) -> None:
        done = names.index(model) + step / max(total, 1)
        progress(done / len(names), f"Optimising the image for {model} (step {step} of {total}).")

    cfg = CamConfig(steps=request.steps, image_size=request.image_size, seed=request.seed, device=str(device))
    with torch.inference_mode(False):
        results = coordinated_activation_maximization(
            usae, backbones, index, cfg, grids={m.name: (m.grid_h, m.grid_w) for m in models if m.name in backbones},
            on_step=on_step)

    relative_dir = cam_dir(run_id, index)
    written: dict[str, str] = {}
    try:
        for name, result in results.items():
            relative = f"{relative_dir}/{name}-job{job.id}.png"
            buffer = io.BytesIO()
            Image.fromarray(result.image).save(buffer, format="PNG")
            atomic_write_bytes(settings.media_dir / relative, buffer.getvalue())
            written[name] = relative
        message, replaced = _swap_in_cam_images(sessions, job, request, run_id, index, models, results, written,
                                                skipped)
    except BaseException:  # cancelled, the concept gone, a database error: no row points at these files
        for path in written.values():
            (settings.media_dir / path).unlink(missing_ok=True)
        raise
    for path in replaced:
        if path not in written.values():
            (settings.media_dir / path).unlink(missing_ok=True)
    return message


def _swap_in_cam_images(sessions: sessionmaker[Session], job: Job, request: CamRequest, run_id: int, index: int,
                        models: list[RunModel], results: dict, written: dict[str, str],
                        skipped: dict[str, str]) -> tuple[str, list[str]]:
    """One transaction: replace the concept's CAM rows by the new images and finish the job.
    Returns (the job's message, files of the replaced rows); raises JobCancelled when the job
    was cancelled meanwhile (then nothing changed)."""
    # start/final: the mean pre-TopK response CAM climbs; peak: the code after TopK at the image's
    # strongest token, the number the concept's top images carry.
    activations = {name: {"start": r.start_activation, "final": r.final_activation, "peak": r.final_peak_code}
                   for name, r in results.items()}
    summary = " · ".join(f"{n} {measure(a['start'])} → {measure(a['final'])}" for n, a in activations.items())
    message = f"Made {len(written)} image{'s' if len(written) != 1 else ''}. Mean response over the image, start → end: {summary}."
    if skipped:
        message += f" Skipped {', '.join(skipped)} (no backbone)."
    result = {"images": written, "activations": activations, "skipped": skipped}
    model_ids = {m.name: m.id for m in models}
    with sessions.begin() as session:
        concept = get_concept(session, run_id=run_id, index=index)
        if concept is None:
            raise UsaeError(f"concept {index} was removed while its images were made")
        these = (CamImage.concept_id == concept.id, CamImage.run_model_id.in_([model_ids[n] for n in written]))
        replaced = list(session.scalars(select(CamImage.file_path).where(*these)))
        session.execute(delete(CamImage).where(*these))
        session.add_all(CamImage(concept_id=concept.id, run_model_id=model_ids[name], file_path=path, job_id=job.id,
                                 params={**request.model_dump(), **activations[name]})
                        for name, path in written.items())
        finished = finish_job(session, job.id, result, message)
        if not finished:  # cancelled while the last step ran: keep nothing of it
            session.rollback()
    if not finished:
        raise JobCancelled()
    return message, replaced
