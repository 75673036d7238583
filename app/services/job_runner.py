"""What a worker does with "run job N": claim the row, run the job's kind, record the outcome.

The row is touched every `HEARTBEAT_S` seconds while the job runs, so a job whose worker died
can be told from a slow one (`fail_interrupted_jobs`). Progress is written at most once a
second; every write also tells the job whether an analyst cancelled it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from app.db import session_factory
from app.models import Job
from app.services.jobs import HEARTBEAT_S, JobCancelled, claim_job, fail_job, report_progress, touch_job
from app.settings import Settings
from usae_core.errors import UsaeError

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
"""progress(fraction, message); raises JobCancelled once the job was cancelled."""


Runner = Callable[[Settings, sessionmaker[Session], Job, Progress], str]
"""runner(settings, sessions, job, progress) -> a one-line outcome for the log. A runner finishes
its job itself (`finish_job`), in the transaction that stores what it made."""


_in_hand: set[int] = set()
"""Jobs this process has claimed and not yet ended: what `fail_jobs_in_hand` fails when the worker stops."""


def _runners() -> dict[str, Runner]:
    from app.services.cam import run_cam_job

    return {"cam": run_cam_job}


def run_job(settings: Settings, job_id: int) -> None:
    sessions = session_factory(settings.db_url)
    with sessions() as session:
        job = claim_job(session, job_id)
        session.commit()
    if job is None:
        log.info("job %s: nothing to do (cancelled, taken or gone)", job_id)
        return
    _in_hand.add(job_id)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(sessions, job_id, stop), name=f"job-{job_id}-heartbeat",
                     daemon=True).start()
    try:
        runner = _runners().get(job.kind)
        if runner is None:
            raise ValueError(f"no runner for jobs of kind {job.kind!r}")
        message = runner(settings, sessions, job, _throttled_progress(sessions, job_id))
        log.info("job %s (%s) done: %s", job_id, job.kind, message)
    except JobCancelled:
        log.info("job %s (%s) cancelled", job_id, job.kind)
    except UsaeError as exc:  # raised on purpose: its message says what is wrong, in words
        log.warning("job %s (%s) failed: %s", job_id, job.kind, exc)
        with sessions.begin() as session:
            fail_job(session, job_id, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure is the job's outcome, shown to the analyst
        log.exception("job %s (%s) failed", job_id, job.kind)  # the traceback, for the administrator
        with sessions.begin() as session:
            fail_job(session, job_id, server_problem(job_id), f"{type(exc).__name__}: {exc}")
    finally:
        stop.set()
        _in_hand.discard(job_id)


def server_problem(job_id: int) -> str:
    """What an analyst reads about a job that failed on an error the code did not raise on
    purpose (a bug, a broken install): not their doing, what to do, and what to tell the admin,
    whose log has the traceback under the job's number."""
    return (f"A problem on the server stopped this job, not anything you chose. Try again; if it fails again, tell "
            f"your administrator (job {job_id}: the server's log has the details).")


def fail_jobs_in_hand(settings: Settings) -> list[int]:
    """Mark failed the jobs this process is still running, when the worker stops before they end
    (their threads die with the process); the ids of those it failed."""
    failed = []
    with session_factory(settings.db_url).begin() as session:
        for job_id in sorted(_in_hand):
            if fail_job(session, job_id, "Interrupted: the job worker stopped before this job ended (it, or the "
                                         "server that runs it, was stopped or restarted). Start the job again."):
                failed.append(job_id)
    return failed


def _throttled_progress(sessions: sessionmaker[Session], job_id: int, every_s: float = 1.0) -> Progress:
    last = [0.0]

    def progress(fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - last[0] < every_s and fraction < 1.0:
            return
        last[0] = now
        with sessions.begin() as session:
            report_progress(session, job_id, fraction, message)

    return progress


def _heartbeat(sessions: sessionmaker[Session], job_id: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            with sessions.begin() as session:
                touch_job(session, job_id)
        except Exception:  # noqa: BLE001 - a missed beat is retried; the job itself goes on
            log.warning("job %s: heartbeat failed", job_id, exc_info=True)
