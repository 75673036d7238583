"""Job rows: created by an analyst, claimed and advanced by a worker, cancelled by an analyst.

Every transition is one conditional UPDATE (`... WHERE status IN (...)`), so a worker and an
analyst acting at the same moment cannot both win: a cancelled job is never claimed, and a
finished one is never cancelled.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import Job, Run, User, utcnow

HEARTBEAT_S = 10.0
"""How often a running job's row is touched while it runs."""
INTERRUPTED_AFTER = dt.timedelta(minutes=2)
"""A running job untouched this long has lost its worker."""
ACTIVE = ("queued", "running")


QUEUED_MESSAGE = "Queued: starts when the job worker is free."


class JobCancelled(Exception):
    """Raised inside a running job once an analyst has cancelled it."""


def create_job(session: Session, *, kind: str, params: dict[str, Any], run_id: int | None, user: User,
               concept_index: int | None = None) -> Job:
    job = Job(kind=kind, params=params, run_id=run_id, concept_index=concept_index, created_by=user.id,
              message=QUEUED_MESSAGE)
    session.add(job)
    session.flush()
    return job


def _transition(session: Session, job_id: int, from_states: tuple[str, ...], **values: Any) -> bool:
    result = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(from_states))
                             .values(updated_at=utcnow(), **values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def claim_job(session: Session, job_id: int) -> Job | None:
    """queued -> running; None when the job is gone, cancelled or already taken."""
    if not _transition(session, job_id, ("queued",), status="running", started_at=utcnow(), message="Starting."):
        return None
    return session.get(Job, job_id, populate_existing=True)


def report_progress(session: Session, job_id: int, fraction: float, message: str) -> None:
    """Record progress of a running job; raises JobCancelled once it was cancelled."""
    fraction = min(max(fraction, 0.0), 1.0)
    if not _transition(session, job_id, ("running",), progress=fraction, message=message):
        raise JobCancelled()


def touch_job(session: Session, job_id: int) -> bool:
    """A running job's heartbeat (see `fail_interrupted_jobs`)."""
    return _transition(session, job_id, ("running",))


def finish_job(session: Session, job_id: int, result: dict[str, Any], message: str) -> bool:
    return _transition(session, job_id, ("running",), status="done", progress=1.0, message=message,
                       result=result, finished_at=utcnow())


def fail_job(session: Session, job_id: int, message: str, error: str | None = None) -> bool:
    """queued or running -> failed. `message` is what analysts read (the CAM panel, /jobs): what
    went wrong and what to do; `error` the technical detail (an exception), `message` when there
    is none."""
    return _transition(session, job_id, ACTIVE, status="failed", message=message, error=error or message,
                       finished_at=utcnow())


def cancel_job(session: Session, job_id: int) -> bool:
    """queued or running -> cancelled (a running job stops at its next progress report)."""
    return _transition(session, job_id, ACTIVE, status="cancelled", message="Cancelled.", finished_at=utcnow())


def fail_interrupted_jobs(session: Session, *, now: dt.datetime | None = None) -> list[Job]:
    """Running jobs whose heartbeat stopped (their worker died) -> failed; those this call failed
    (every worker looks for them, so two may find the same job: one fails it)."""
    cutoff = (now or utcnow()) - INTERRUPTED_AFTER
    stale = list(session.scalars(select(Job).where(Job.status == "running", Job.updated_at < cutoff)))
    return [job for job in stale if fail_job(
        session, job.id, f"Interrupted: the job worker running this job stopped without ending it (it was killed, or "
                         f"its machine restarted). Start the job again; if this keeps happening, tell your "
                         f"administrator (job {job.id}).")]


def list_jobs(session: Session, *, limit: int = 100) -> list[Job]:
    return list(session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))


def job_run_names(session: Session, jobs: list[Job]) -> dict[int, str]:
    """The names of the runs `jobs` are about, by run id, in one query (a job list names the run
    of each concept)."""
    run_ids = {job.run_id for job in jobs if job.run_id is not None}
    if not run_ids:
        return {}
    return {run_id: name for run_id, name in session.execute(select(Run.id, Run.name).where(Run.id.in_(run_ids)))}


def latest_job(session: Session, *, kind: str, run_id: int, concept_index: int) -> Job | None:
    """The newest job of `kind` for one concept of a run."""
    return session.scalar(select(Job).where(Job.run_id == run_id, Job.concept_index == concept_index, Job.kind == kind)
                          .order_by(Job.id.desc()).limit(1))
