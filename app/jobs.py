"""The background job queue: Huey with its SQLite storage in the data directory.

The `jobs` table is what pages and the API show (status, progress, outcome, who started it);
the queue only carries "run job N" messages to a worker process, `usae worker` (which `usae
serve` starts for you unless told `--no-job-worker`). Jobs run outside the web server's processes
because they are long and CPU- or GPU-heavy: a CAM job must not slow down page serving.

A job is enqueued after its row is committed, so the worker always finds it. A running job's
row is touched every few seconds (a heartbeat); a worker that dies mid-job stops touching it,
and every running worker looks for such rows (as it starts, then every ALIVE_EVERY_S seconds)
and marks them failed ("interrupted"), so nothing stays `running` forever: at once where the
dead worker was a process of the same machine, else after two minutes of a still heartbeat, timed
by the looking worker's own clock (machines' clocks may differ).

The worker `usae serve` starts never outlives the server: stopping the server (Ctrl+C or
SIGTERM) stops it at once, and a worker whose server was killed (SIGKILL) notices within a
second that its parent process is gone and stops by itself.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from huey import SqliteHuey
from huey.api import TaskWrapper

from app.settings import Settings

if TYPE_CHECKING:
    from app.services.jobs import HeartbeatWatch

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


def _fail_interrupted_jobs(settings: Settings, watch: HeartbeatWatch) -> None:
    """Fail the running jobs whose worker died, whichever worker ran them."""
    from app.db import session_factory
    from app.services.jobs import fail_interrupted_jobs

    with session_factory(settings.db_url).begin() as session:
        for job in fail_interrupted_jobs(session, watch):
            log.warning("job %s (%s) was interrupted (its worker stopped without ending it): marked failed",
                        job.id, job.kind)


def _keep_alive(settings: Settings, watch: HeartbeatWatch, stop: threading.Event) -> None:
    """Say this worker is alive, and fail the jobs of workers that died: not only as a worker
    starts, since one killed mid-job (SIGKILL after `docker stop`'s grace period, the OOM killer)
    may die after the next worker started, and its job would stay 'running' (and block new CAM
    jobs of its concept) until some later worker start."""
    path = settings.data_dir / ALIVE_FILE
    while True:
        try:
            path.touch()
        except OSError:
            log.warning("cannot touch %s", path, exc_info=True)
        try:
            _fail_interrupted_jobs(settings, watch)
        except Exception:  # noqa: BLE001 - the database may be away for a moment; tried again next time
            log.warning("cannot look for interrupted jobs", exc_info=True)
        if stop.wait(ALIVE_EVERY_S):
            return


PARENT_CHECK_S = 1.0
"""How often a process started by `usae serve` checks that the server is still there."""


def stop_with_parent(parent_pid: int, sig: signal.Signals, what: str) -> None:
    """Send this process `sig` once its parent `parent_pid` is gone (it was killed, SIGKILL, so
    it could not stop its children): checked every PARENT_CHECK_S seconds in a daemon thread.
    An orphan is re-parented (to PID 1 or a subreaper), so `os.getppid()` changes; also when
    the parent died before this started. Portable, unlike Linux's PR_SET_PDEATHSIG, which also
    fires when the parent *thread* that started the process ends (the worker supervisor's)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_S)
        log.warning("%s: the server that started it (process %s) is gone; stopping", what, parent_pid)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_worker(settings: Settings, threads: int = 1, parent_pid: int | None = None) -> list[int]:
    """Run jobs until stopped. SIGTERM lets the jobs in hand finish (up to SHUTDOWN_TIMEOUT_S),
    SIGINT stops at once; a job still running then is marked failed, never left 'running'.
    With `parent_pid` (the server that started this worker) SIGTERM stops it at once too, and
    it stops as on SIGINT once that process is gone. Returns the jobs it failed so (their
    threads may still be running)."""
    from app.migrations import upgrade_database
    from app.services.job_runner import fail_jobs_in_hand
    from app.services.jobs import HeartbeatWatch

    if threading.current_thread() is threading.main_thread():
        # Until the consumer installs its own handlers: Ctrl+C stops the migration and the
        # start-up sweep also where the worker was started with SIGINT ignored (`usae serve &`).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if parent_pid is not None:
        stop_with_parent(parent_pid, signal.SIGINT, "job worker")
    upgrade_database(settings.db_url)
    watch = HeartbeatWatch()
    _fail_interrupted_jobs(settings, watch)
    consumer = job_queue(settings).huey.create_consumer(workers=threads, worker_type="thread", periodic=False,
                                                   graceful_signal="TERM", shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    if parent_pid is not None:
        # A server's worker stops at once on SIGTERM too: systemd sends SIGTERM to every process
        # of the service together, and during huey's graceful wait the server's SIGINT would only
        # be noted, so the server killed the worker at STOP_WAIT_S before it failed its job.
        # huey >= 3.5.4 keeps its signal table here (pyproject.toml asks for that); should a later
        # version move it, the worker still stops, after huey's graceful wait.
        if hasattr(consumer, "_signal_actions"):
            consumer._signal_actions[signal.SIGTERM] = (False, False)  # (restart, graceful)
        else:
            log.warning("this huey has no _signal_actions: on SIGTERM the job worker waits for its job "
                        "(up to %d s) instead of stopping at once", SHUTDOWN_TIMEOUT_S)
    stop = threading.Event()
    threading.Thread(target=_keep_alive, args=(settings, watch, stop), name="worker-alive", daemon=True).start()
    try:
        consumer.run()
    finally:
        stop.set()
        failed = fail_jobs_in_hand(settings)
        for job_id in failed:
            log.warning("job %s was still running when the worker stopped: marked failed", job_id)
    return failed


RESTARTS_WITHOUT_PROGRESS = 5
"""A worker that keeps dying within a minute of starting is given up after this many restarts."""
STOP_WAIT_S = 15
"""How long a stopping server waits for its worker (which stops at once) before killing it."""


@contextmanager
def _sigterm_ends_the_block() -> Iterator[Callable[[], None]]:
    """SIGTERM raises SystemExit(0) in the main thread while the block runs, so the block's
    `finally` runs as it does for Ctrl+C's KeyboardInterrupt. By default SIGTERM ended the
    process on the spot, and uvicorn (one server process) re-raises it after its own shutdown:
    the job worker was left running. Yields a function that makes further SIGTERMs do nothing
    (call it as the stopping starts, so that a second `kill` cannot cut it short)."""
    stopping = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # only the main thread has signals
        yield stopping.set
        return

    def on_sigterm(signum, frame) -> None:
        if not stopping.is_set():
            stopping.set()
            raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stopping.set
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def worker_process(settings: Settings) -> Iterator[Callable[[], subprocess.Popen]]:
    """`usae worker` for the data directory as a child process, replaced when it dies, stopped
    when the block ends, also by SIGTERM. What `usae serve` and `usae demo` run beside the
    server. Yields a function returning the current process.

    Stopping sends the worker SIGINT, as Ctrl+C at a terminal does: it stops at once and marks
    its job in hand failed (so an analyst can start it again), within the 10 s `docker stop`
    waits before it kills. The worker is told the server's pid and stops by itself when the
    server is killed (SIGKILL) without a chance to stop it."""
    # Half the cores for jobs: the server beside it keeps the rest, so pages stay fast while a
    # CAM job runs on a CPU-only machine.
    command = [sys.executable, "-m", "app.cli", "worker", "--data-dir", str(settings.data_dir.resolve()),
               "--torch-threads", str(max(1, (os.cpu_count() or 2) // 2)), "--parent-pid", str(os.getpid())]
    with _sigterm_ends_the_block() as stopping:
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
            stopping()
            stop.set()
            supervisor.join()
            worker = current[0]
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)
            try:
                worker.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("the job worker did not stop within %s s; killing it", STOP_WAIT_S)
                worker.kill()
                worker.wait()
