"""Job rows: created by an analyst, claimed and advanced by a worker, cancelled by an analyst.

Every transition is one conditional UPDATE (`... WHERE status IN (...)`), so a worker and an
analyst acting at the same moment cannot both win: a cancelled job is never claimed, and a
finished one is never cancelled.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from app.models import Job, Run, User, utcnow

HEARTBEAT_S = 10.0
"""How often a running job's row is touched while it runs."""
INTERRUPTED_AFTER_S = 120.0
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


def _transition(session: Session, job_id: int, from_states: tuple[str, ...], *conditions: ColumnElement[bool],
                **values: Any) -> bool:
    result = session.execute(update(Job).where(Job.id == job_id, Job.status.in_(from_states), *conditions)
                             .values(updated_at=utcnow(), **values).execution_options(synchronize_session=False))
    return result.rowcount == 1


def claim_job(session: Session, job_id: int) -> Job | None:
    """queued -> running; None when the job is gone, cancelled or already taken."""
    if not _transition(session, job_id, ("queued",), status="running", started_at=utcnow(), message="Starting.",
                       worker=worker_identity()):
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


def fail_job(session: Session, job_id: int, message: str, error: str | None = None,
             conditions: tuple[ColumnElement[bool], ...] = ()) -> bool:
    """queued or running -> failed (where `conditions` hold too). `message` is what analysts read
    (the CAM panel, /jobs): what went wrong and what to do; `error` the technical detail (an
    exception), `message` when there is none."""
    return _transition(session, job_id, ACTIVE, *conditions, status="failed", message=message,
                       error=error or message, finished_at=utcnow())


def cancel_job(session: Session, job_id: int) -> bool:
    """queued or running -> cancelled (a running job stops at its next progress report)."""
    return _transition(session, job_id, ACTIVE, status="cancelled", message="Cancelled.", finished_at=utcnow())


def worker_identity() -> str:
    """This process as `host/boot/pid-namespace/pid`: a worker whose identity starts with the same
    `host/boot/pid-namespace` can look the process up. The boot id tells machines apart where host
    names repeat (cloned machines, `hostname:` in compose) and the initial PID namespace looks
    alike on every Linux machine; the namespace tells containers of one machine apart. Off Linux
    it is `?`, and no worker looks another up."""
    return f"{_this_machine()}/{os.getpid()}"


@cache
def _this_machine() -> str:
    """Read once per process: every claim and every sweep's look-up needs it."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return f"{socket.gethostname()}/?"
    return f"{socket.gethostname()}/{boot}/{namespace}"


def _process_gone(worker: str | None) -> bool:
    """Whether `worker` (a `worker_identity`) names a process of this machine and PID namespace
    that no longer exists."""
    machine, _, pid = (worker or "").rpartition("/")
    if machine != _this_machine() or machine.endswith("/?") or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by someone else
        return False
    return False


@dataclass
class HeartbeatWatch:
    """One worker's memory of the running jobs' heartbeats: each job's last `updated_at` and when,
    on this worker's own monotonic clock, it first saw that value. A heartbeat that has not moved
    for INTERRUPTED_AFTER_S by this clock means the job's worker died. Comparing the timestamp,
    written by the running worker's clock, with this worker's clock would fail healthy jobs of
    any machine whose clock is more than that behind."""

    clock: Callable[[], float] = time.monotonic
    seen: dict[int, tuple[dt.datetime, float]] = field(default_factory=dict)


def fail_interrupted_jobs(session: Session, watch: HeartbeatWatch) -> list[Job]:
    """Running jobs whose worker died -> failed, and those returned: at once where the worker was
    a process of this machine that is gone, else once `watch` has seen its heartbeat stand still
    for INTERRUPTED_AFTER_S. Every worker looks, so two may find the same job: one fails it, and
    a job whose heartbeat moves meanwhile is left running."""
    now = watch.clock()
    running = session.execute(select(Job.id, Job.updated_at, Job.worker).where(Job.status == "running")).all()
    running_ids = {row.id for row in running}
    watch.seen = {job_id: seen for job_id, seen in watch.seen.items() if job_id in running_ids}
    failed = []
    for job_id, beat, worker in running:
        if not _process_gone(worker):
            last_beat, since = watch.seen.get(job_id, (None, now))
            if last_beat != beat:
                watch.seen[job_id] = (beat, now)
                continue
            if now - since < INTERRUPTED_AFTER_S:
                continue
        if fail_job(session, job_id, f"Interrupted: the job worker running this job stopped without ending it (it was "
                                     f"killed, or its machine restarted). Start the job again; if this keeps "
                                     f"happening, tell your administrator (job {job_id}).",
                    conditions=(Job.updated_at == beat,)):
            watch.seen.pop(job_id, None)
            failed.append(session.get(Job, job_id, populate_existing=True))
    return failed


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
