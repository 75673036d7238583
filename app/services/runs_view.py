"""Reading runs for the pages: the list and one run's summary."""

from __future__ import annotations

import os
import socket

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, joinedload, selectinload

from app.models import MiningGeneration, Run
from app.schemas.runs import ModelInfo, RunSummary


def mining_owner() -> dict:
    """Who is mining, recorded on the generation being built so readers can tell a live mine
    from one whose process died (SIGKILL, power loss) before it could note a failure."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _owner_is_gone(owner: dict | None) -> bool:
    """True only when the owner ran on this host and its process no longer exists; a mine on
    another machine (a shared Postgres) cannot be checked and counts as live."""
    if not owner or owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, OSError):  # no permission to signal it: it exists
        return False
    return False


def effective_status(session: Session, run: Run) -> str:
    """The run's status, with "interrupted" for a "mining" run whose mining process is gone."""
    if run.status != "mining":
        return run.status
    owners = session.scalars(select(MiningGeneration.params).where(
        MiningGeneration.run_id == run.id, MiningGeneration.status == "building"))
    building = [p.get("owner") for p in owners]
    return "interrupted" if building and all(_owner_is_gone(o) for o in building) else "mining"


def run_summary(run: Run, status: str | None = None) -> RunSummary:
    return RunSummary(
        id=run.id, name=run.name, image_set=run.image_set, status=status or run.status, created_at=run.created_at,
        mined_at=run.mined_at, n_images=run.n_images, n_concepts=run.n_concepts,
        models=[ModelInfo(name=m.name, family=m.family, dim=m.dim, grid=(m.grid_h, m.grid_w)) for m in run.models],
    )


def list_runs(session: Session) -> list[RunSummary]:
    runs = session.scalars(select(Run).options(selectinload(Run.models)).order_by(Run.created_at.desc(), Run.id.desc()))
    return [run_summary(r, effective_status(session, r)) for r in runs]


_RUN = select(Run).options(joinedload(Run.models)).where(Run.id == bindparam("run"))
"""Every page of a run starts with this: one statement, built once."""


def get_run(session: Session, *, run_id: int) -> Run | None:
    return session.execute(_RUN, {"run": run_id}).unique().scalar_one_or_none()
