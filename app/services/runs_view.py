"""Reading runs for the pages: the list and one run's summary."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.models import Run
from app.schemas.runs import ModelInfo, RunSummary


def run_summary(run: Run) -> RunSummary:
    return RunSummary(
        id=run.id, name=run.name, image_set=run.image_set, status=run.status, created_at=run.created_at,
        mined_at=run.mined_at, n_images=run.n_images, n_concepts=run.n_concepts,
        models=[ModelInfo(name=m.name, family=m.family, dim=m.dim, grid=(m.grid_h, m.grid_w)) for m in run.models],
    )


def list_runs(session: Session) -> list[RunSummary]:
    runs = session.scalars(select(Run).options(selectinload(Run.models)).order_by(Run.created_at.desc(), Run.id.desc()))
    return [run_summary(r) for r in runs]


def get_run(session: Session, *, run_id: int) -> Run | None:
    return session.scalar(select(Run).options(selectinload(Run.models)).where(Run.id == run_id))
