"""The background job queue: Huey with its SQLite storage in the data directory.

The `jobs` table is what pages and the API show (status, progress, outcome, who started it);
the queue only carries "run job N" messages to a worker process, `usae worker` (which `usae
serve` starts for you unless told `--no-job-worker`). Jobs run outside the web server's processes
because they are long and CPU- or GPU-heavy: a CAM job must not slow down page serving.

A job is enqueued after its row is committed, so the worker always finds it. A running job's
row is touched every few seconds (a heartbeat); a worker that dies mid-job stops touching it,
and the next worker to start marks such rows failed ("interrupted"), so nothing stays
`running` forever.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from huey import SqliteHuey
from huey.api import TaskWrapper

from app.settings import Settings

log = logging.getLogger(__name__)
QUEUE_FILE = "jobs-queue.sqlite"


@dataclass(frozen=True)
class JobQueue:
    huey: SqliteHuey
    run_job: TaskWrapper
    """Calling it with a job id enqueues that job."""


def job_queue(settings: Settings) -> JobQueue:
    """The queue of the data directory, with its one task registered. The web app (which
    enqueues) and `usae worker` (which runs) each build it from the same settings."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    huey = SqliteHuey("usae-jobs", filename=str(settings.data_dir / QUEUE_FILE), results=False, utc=True)

    @huey.task(name="run_job")
    def run_job(job_id: int) -> None:
        from app.services.job_runner import run_job as run

        run(settings, job_id)

    return JobQueue(huey, run_job)


def enqueue_job(settings: Settings, job_id: int) -> None:
    """Hand a committed job row to the workers."""
    job_queue(settings).run_job(job_id)


SHUTDOWN_TIMEOUT_S = 30
"""How long SIGTERM lets the jobs in hand run on before the worker stops anyway."""
ALIVE_FILE = "jobs-worker.alive"
ALIVE_EVERY_S = 10.0
ALIVE_WITHIN_S = 45.0


def worker_alive(settings: Settings) -> bool:
    """Whether some `usae worker` of this data directory showed signs of life lately (it touches
    ALIVE_FILE every ALIVE_EVERY_S seconds), so pages can say why queued jobs do not start."""
    try:
        return time.time() - (settings.data_dir / ALIVE_FILE).stat().st_mtime < ALIVE_WITHIN_S
    except OSError:
        return False


def _keep_alive(settings: Settings, stop: threading.Event) -> None:
    path = settings.data_dir / ALIVE_FILE
    while True:
        try:
            path.touch()
        except OSError:
            log.warning("cannot touch %s", path, exc_info=True)
        if stop.wait(ALIVE_EVERY_S):
            return


def run_worker(settings: Settings, threads: int = 1) -> None:
    """Run jobs until stopped. SIGTERM lets the jobs in hand finish (up to SHUTDOWN_TIMEOUT_S),
    SIGINT stops at once; a job still running then is marked failed, never left 'running'."""
    from app.db import session_factory
    from app.migrations import upgrade_database
    from app.services.job_runner import fail_jobs_in_hand
    from app.services.jobs import fail_interrupted_jobs

    upgrade_database(settings.db_url)
    with session_factory(settings.db_url)() as session:
        for job in fail_interrupted_jobs(session):
            log.warning("job %s (%s) was interrupted: marked failed", job.id, job.kind)
        session.commit()
    consumer = job_queue(settings).huey.create_consumer(workers=threads, worker_type="thread", periodic=False,
                                                   graceful_signal="TERM", shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    stop = threading.Event()
    threading.Thread(target=_keep_alive, args=(settings, stop), name="worker-alive", daemon=True).start()
    try:
        consumer.run()
    finally:
        stop.set()
        for job_id in fail_jobs_in_hand(settings):
            log.warning("job %s was still running when the worker stopped: marked failed", job_id)


RESTARTS_WITHOUT_PROGRESS = 5
"""A worker that keeps dying within a minute of starting is given up after this many restarts."""


@contextmanager
def worker_process(settings: Settings) -> Iterator[Callable[[], subprocess.Popen]]:
    """`usae worker` for the data directory as a child process, replaced when it dies, stopped
    (after its job in hand, up to SHUTDOWN_TIMEOUT_S) when the block ends. What `usae serve`
    and `usae demo` run beside the server. Yields a function returning the current process."""
    # Half the cores for jobs: the server beside it keeps the rest, so pages stay fast while a
    # CAM job runs on a CPU-only machine.
    command = [sys.executable, "-m", "app.cli", "worker", "--data-dir", str(settings.data_dir.resolve()),
               "--torch-threads", str(max(1, (os.cpu_count() or 2) // 2))]
    current = [subprocess.Popen(command)]
    stop = threading.Event()

    def supervise() -> None:
        started, quick_deaths = time.monotonic(), 0
        while not stop.wait(1.0):
            if current[0].poll() is None:
                continue
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < 60 else 1
            if quick_deaths > RESTARTS_WITHOUT_PROGRESS:
                log.error("the job worker keeps exiting (code %s); jobs will wait until it is started again",
                          current[0].returncode)
                return
            log.warning("the job worker exited with code %s; starting another", current[0].returncode)
            current[0], started = subprocess.Popen(command), time.monotonic()

    supervisor = threading.Thread(target=supervise, name="job-worker-supervisor", daemon=True)
    supervisor.start()
    try:
        yield lambda: current[0]
    finally:
        stop.set()
        supervisor.join()
        worker = current[0]
        worker.terminate()
        try:
            worker.wait(timeout=SHUTDOWN_TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
