"""`usae serve --workers N`: one listening socket per worker process (SO_REUSEPORT).

A real server in a subprocess: connections are spread over the workers (with one shared socket a
burst of clients could land on one worker), a second server on the same port is refused with a
clear message, a dead worker is replaced, and SIGTERM leaves no process behind; with a real CAM
job running in the server's job worker, SIGTERM stops that worker too and after SIGKILL the
server's processes stop by themselves."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT") or not Path("/proc/net/tcp").exists(),
                                reason="needs Linux (SO_REUSEPORT, /proc)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _get(port: int, connection: http.client.HTTPConnection | None = None) -> int:
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/login")
    response = connection.getresponse()
    response.read()
    return response.status


def _wait_until(predicate, timeout: float = 90, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def _connections_per_worker(port: int, pids: list[int]) -> dict[int, int]:
    """Established server-side connections on `port`, counted per worker pid."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            inodes.add(fields[9])
    counts = {}
    for pid in pids:
        held = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            held += target.startswith("socket:[") and target[8:-1] in inodes
        counts[pid] = held
    return counts


def test_workers_each_listen_and_share_the_clients(tmp_path):
    port = _free_port()
    server = _serve(port, tmp_path / "data")
    try:
        _wait_until(lambda: _get(port) == 200, what="the server")
        _wait_until(lambda: len(_workers(server.pid)) == 2, what="two workers")
        workers = _workers(server.pid)

        # 40 clients connecting at once, as a burst of users (or the load benchmark) does. Spread
        # by hash, fewer than 9 land on one worker in ~2 of 10,000 runs; one shared socket gave
        # 0 / 24, 24 / 0 and 3 / 21 for 24 clients.
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(40)]
        barrier = threading.Barrier(len(connections))
        statuses = []

        def client(c: http.client.HTTPConnection) -> None:
            barrier.wait()
            statuses.append(_get(port, c))

        threads = [threading.Thread(target=client, args=(c,)) for c in connections]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * len(connections)
        counts = _connections_per_worker(port, workers)
        assert sum(counts.values()) == len(connections), counts
        assert min(counts.values()) >= 9, f"connections piled onto one worker: {counts}"
        for c in connections:
            c.close()

        second = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port),
                                 "--data-dir", str(tmp_path / "other")], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr

        os.kill(workers[0], signal.SIGKILL)
        _wait_until(lambda: len(_workers(server.pid)) == 2 and workers[0] not in _workers(server.pid),
                    what="a replacement worker")
        _wait_until(lambda: _get(port) == 200, what="the server after a worker died")

        everyone = [server.pid, *_workers(server.pid)]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        _wait_until(lambda: not any(Path(f"/proc/{pid}").exists() and
                                    "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in everyone),
                    timeout=30, what="every server process to exit")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_access_log_never_holds_an_audit_link_token(tmp_path):
    """Served for real (worker processes, uvicorn's own access log): a share URL is logged with
    the start of its token's hash, the form `share_links.token_hash` stores, never the token."""
    from app.services.shares import hash_token

    port, token = _free_port(), "SecretShareToken-" + "x" * 26
    log = tmp_path / "access.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port),
                                   "--no-job-worker", "--data-dir", str(tmp_path / "data")], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            _wait_until(lambda: _get(port) == 200, what="the server")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", f"/s/{token}/runs/1?x=1")
            assert connection.getresponse().status == 404  # no such link; the request is logged all the same
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    text = log.read_text()
    assert f"/s/#{hash_token(token)[:8]}/runs/1" in text, text[-2000:]
    assert token not in text


# Stopping the server stops its job worker. The worker `usae serve` starts takes CAM jobs from
# the queue; one left running after the server is gone (re-parented to PID 1) kept taking them,
# beside the next server's worker, on the old code.

def _slow_cam_job(data_dir: Path) -> tuple[Path, int]:
    """A data directory holding one run whose model has a real backbone (MobileNetV2) and a queued
    CAM job that runs for minutes (2,048 steps at 224 px): the job a stopped server has in hand.
    Its settings and the job's id."""
    import torch

    from app.db import get_engine, session_factory
    from app.jobs import enqueue_job
    from app.migrations import upgrade_database
    from app.models import Concept, Run, RunModel
    from app.services.jobs import create_job
    from app.settings import Settings
    from tests.app.seed import create_analyst
    from usae_core.backbones import create_backbone
    from usae_core.config import USAEConfig
    from usae_core.model import USAE

    settings = Settings(data_dir=data_dir, database_url=None)
    upgrade_database(settings.db_url)
    torch.manual_seed(0)
    dim = create_backbone("mobilenet_v2").dim
    run_dir = data_dir.parent / "run"
    USAE(USAEConfig(model_dims={"mnet": dim}, n_concepts=8, k=2, encoder="linear")).save_pretrained(run_dir)
    with session_factory(settings.db_url).begin() as session:
        run = Run(name="cam-run", run_dir=str(run_dir), store_dir="", n_concepts=8, k=2, status="mined")
        run.models = [RunModel(position=0, name="mnet", family="torchvision", dim=dim, grid_h=7, grid_w=7,
                               info={"registry_name": "mobilenet_v2"})]
        session.add(run)
        session.flush()
        session.add_all(Concept(run_id=run.id, index=i) for i in range(8))
        job_id = create_job(session, kind="cam", params={"steps": 2048, "image_size": 224, "seed": 0}, run_id=run.id,
                            concept_index=3, user=create_analyst(session)).id
    enqueue_job(settings, job_id)
    get_engine(settings.db_url).dispose()
    return data_dir, job_id


def _job(data_dir: Path, job_id: int):
    from app.db import session_factory
    from app.models import Job
    from app.settings import Settings

    with session_factory(Settings(data_dir=data_dir, database_url=None).db_url)() as session:
        return session.get(Job, job_id)


def _job_worker_of(parent: int) -> int | None:
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"app.cli" in cmdline and b"worker" in cmdline:
            return int(child)
    return None


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody reaped counts as gone: it runs nothing)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


def _serve_with_a_running_job(tmp_path: Path, workers: int) -> tuple[subprocess.Popen, int, Path, int]:
    """`usae serve` (its output in tmp_path/serve.log) whose job worker is running a slow CAM job:
    the server process, the job worker's pid, the data directory and the job id."""
    data_dir, job_id = _slow_cam_job(tmp_path / "data")
    port = _free_port()
    with open(tmp_path / "serve.log", "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", str(workers), "--port",
                                  str(port), "--data-dir", str(data_dir)], cwd=ROOT, stdout=out,
                                 stderr=subprocess.STDOUT)
    _wait_until(lambda: _get(port) == 200, what="the server")
    _wait_until(lambda: _job(data_dir, job_id).status == "running", timeout=180, what="the job to run")
    worker = _job_worker_of(server.pid)
    assert worker is not None
    return server, worker, data_dir, job_id


def _log(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text()[-3000:]


def _sigterm_stops_both_in_time(tmp_path, to_worker_too: bool) -> None:
    """SIGTERM to a `usae serve` whose worker runs a CAM job (and to the worker too): the server
    exits 0, the worker is gone within `docker stop`'s 10 s, and its job failed saying why."""
    server, worker, data_dir, job_id = _serve_with_a_running_job(tmp_path, workers=1)
    try:
        sent = time.monotonic()
        for pid in (worker, server.pid) if to_worker_too else (server.pid,):
            os.kill(pid, signal.SIGTERM)
        assert server.wait(timeout=30) == 0, _log(tmp_path)
        assert _gone(worker), f"the job worker {worker} outlived the server: " + _log(tmp_path)
        assert time.monotonic() - sent < 10, _log(tmp_path)
    finally:
        for pid in (server.pid, worker):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        server.wait()
    job = _job(data_dir, job_id)
    assert job.status == "failed" and "worker stopped" in job.message and "again" in job.message, job.message
    assert "terminate called" not in _log(tmp_path)  # the worker left its job's thread without an abort


@pytest.mark.slow
def test_sigterm_stops_the_servers_job_worker_too(tmp_path):
    """`kill PID` (what `docker stop` and supervisors send) stops the job worker as Ctrl+C does: at
    once, its job marked failed with a message saying why, well within the 10 s that `docker stop`
    waits before it kills. One server process (uvicorn's own signal handling) was the case that
    left the worker behind."""
    _sigterm_stops_both_in_time(tmp_path, to_worker_too=False)


@pytest.mark.slow
def test_sigterm_to_server_and_worker_together_stops_both_at_once(tmp_path):
    """systemd stops a service by sending SIGTERM to all of its processes together: the worker,
    which on its own SIGTERM would let its job run on for SHUTDOWN_TIMEOUT_S (and, waiting, only
    note the server's SIGINT), stops at once and fails its job, before the server gives up on it."""
    _sigterm_stops_both_in_time(tmp_path, to_worker_too=True)


@pytest.mark.slow
def test_a_killed_server_leaves_no_process_taking_jobs(tmp_path):
    """SIGKILL (the OOM killer, `kill -9`) gives the server no chance to stop anything: its job
    worker and server processes notice their parent is gone and stop by themselves, the worker
    failing the job in hand with a message, instead of taking jobs (and requests) on old code."""
    server, worker, data_dir, job_id = _serve_with_a_running_job(tmp_path, workers=2)
    children = [worker, *_workers(server.pid)]
    assert len(children) == 3
    try:
        server.kill()
        server.wait()
        _wait_until(lambda: all(_gone(pid) for pid in children), timeout=15,
                    what="the server's processes to stop after it was killed")
    finally:
        for pid in children:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    job = _job(data_dir, job_id)
    assert job.status == "failed" and "worker stopped" in job.message, job.message


def test_the_job_worker_leaves_out_the_queues_start_up_lines(tmp_path):
    """Every `usae serve` and `usae demo` start printed Huey's INFO lines ("Periodic tasks are
    disabled.", "The following commands are available: + app.jobs.run_job"). The worker, taking
    a job whose row is gone, still logs what it did with it."""
    from app.jobs import enqueue_job
    from app.migrations import upgrade_database
    from app.settings import Settings
    from tests.conftest import restore_ctrl_c

    settings = Settings(data_dir=tmp_path / "data", database_url=None)
    upgrade_database(settings.db_url)
    enqueue_job(settings, 424242)  # no such job row: the worker takes it and says there is nothing to do
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--data-dir", str(settings.data_dir)],
                                  cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=restore_ctrl_c)
    try:
        _wait_until(lambda: "job 424242: nothing to do" in log.read_text(), what="the worker to take the job")
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = log.read_text()
    for line in ("Huey consumer started", "Periodic tasks are", "The following commands are available"):
        assert line not in text, text


def test_serve_says_when_its_data_directory_is_new_with_nobody_to_sign_in(tmp_path):
    """`usae serve` outside the folder holding the demo's ./usae-data made a new, empty data
    directory and served it without a word, where the demo's login then failed with only "user
    name and password do not match". It still serves (a new deployment starts so), and says why
    nothing is there and how to fix it."""
    new, port = tmp_path / "new" / "usae-data", _free_port()
    with open(tmp_path / "serve.log", "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", "1", "--no-job-worker",
                                   "--port", str(port), "--data-dir", str(new)], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        _wait_until(lambda: _get(port) == 200, what="the server")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    flat = " ".join(_log(tmp_path).split())
    assert (f"warning: the new data directory {new} has no runs and no analyst accounts (nobody can sign in). "
            "For `usae demo`'s results, run `usae serve` in the folder the demo ran in, or pass --data-dir") in flat
    assert f"`usae user add NAME --data-dir {new}` (an analyst)" in flat


def test_the_warning_says_what_is_missing_and_nothing_once_there_is_a_run_and_an_analyst(tmp_path):
    from app.commands.web import empty_explorer_warning
    from app.db import session_factory
    from app.migrations import upgrade_database
    from app.models import Run
    from app.settings import Settings
    from tests.app.seed import create_analyst

    settings = Settings(data_dir=tmp_path / "data", database_url=None)
    upgrade_database(settings.db_url)
    where = settings.data_dir.resolve()
    assert empty_explorer_warning(settings, new=False).startswith(
        f"warning: the data directory {where} has no runs and no analyst accounts (nobody can sign in)")
    with session_factory(settings.db_url).begin() as session:
        session.add(Run(name="r", run_dir=str(tmp_path / "run"), store_dir="", n_concepts=8, k=2, status="mined"))
    assert empty_explorer_warning(settings, new=False) == (
        f"warning: the data directory {where} has no analyst accounts, so nobody can sign in: add one with "
        f"`usae user add NAME --data-dir {where}`")
    with session_factory(settings.db_url).begin() as session:
        create_analyst(session)
    assert empty_explorer_warning(settings, new=False) is None
