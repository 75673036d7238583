"""Serving rendered files (thumbnails, heatmaps, CAM images) without ever leaving the media
directory, and deciding which of them a share-link holder may fetch."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from app.models import CamImage, Concept, ConceptTopImage, Image, MiningGeneration, Run
from app.viewer import ShareGrant

SERVED_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})


def clean_relative_path(raw: str) -> str | None:
    """'a/b.png' stays; anything absolute, with '..', backslashes, NUL or an unserved type is None."""
    if not raw or "\\" in raw or "\x00" in raw:
        return None
    path = PurePosixPath(raw)
    if path.is_absolute() or any(part in ("..", ".", "") for part in raw.split("/")):
        return None
    if path.suffix.lower() not in SERVED_SUFFIXES:
        return None
    return str(path)


def resolve_media_file(media_dir: Path, relative: str, *, follow_links: bool = True) -> Path | None:
    """The file under `media_dir`, or None if it is missing or resolves outside (symlinks too).

    Without `follow_links` a path through any symbolic link inside the media directory is None
    as well: a share's scope is decided on the path's text, so the text must be the file."""
    root = media_dir.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    if not follow_links and candidate != root / relative:
        return None
    return candidate


def share_may_fetch(session: Session, *, grant: ShareGrant, relative: str) -> bool:
    """A run link may fetch its run's active rendered files and CAM images; a concept link only
    the top images, heatmaps and CAM images of its concepts."""
    run = session.get(Run, grant.run_id)
    if run is None:
        return False
    concepts = select(Concept.id).where(Concept.run_id == run.id)
    if grant.concept_indices is not None:
        concepts = concepts.where(Concept.index.in_(sorted(grant.concept_indices)))
    is_cam = session.scalar(select(exists().where(CamImage.concept_id.in_(concepts), CamImage.file_path == relative)))
    if is_cam:
        return True
    if run.active_generation_id is None:
        return False
    if grant.concept_indices is None:
        prefix = session.scalar(select(MiningGeneration.media_prefix)
                                .where(MiningGeneration.id == run.active_generation_id))
        return bool(prefix) and relative.startswith(prefix.rstrip("/") + "/")
    tops = (select(ConceptTopImage.heatmap_path, Image.thumbnail_path, Image.view_path)
            .join(Image, Image.id == ConceptTopImage.image_id)
            .where(ConceptTopImage.generation_id == run.active_generation_id,
                   ConceptTopImage.concept_id.in_(concepts)))
    return any(relative in row for row in session.execute(tops))
