"""Background jobs: row transitions on SQLite and Postgres, the CAM endpoints' rules, a CAM
job run end to end by a real `usae worker` process on a real backbone, what a CAM job does with
its images (rows swapped, cached pages replaced, nothing kept when cancelled at the end, no path
from a model name), how `usae serve` starts its worker and a stopped worker leaves its job, what
analysts read about a failed job, and the CAM panel's steps."""

from __future__ import annotations

import datetime as dt
import io
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import delete, func, select

from app.db import session_factory
from app.jobs import ALIVE_FILE, job_queue
from app.models import CamImage, Concept, Job, Run, RunModel, User
from app.services.cam import cam_dir, run_cam_job
from app.services.jobs import (
    INTERRUPTED_AFTER_S,
    HeartbeatWatch,
    JobCancelled,
    cancel_job,
    claim_job,
    create_job,
    fail_interrupted_jobs,
    fail_job,
    finish_job,
    report_progress,
    touch_job,
    worker_identity,
)
from tests.app.seed import create_analyst
from tests.app.webapp import csrf_from
from usae_core.errors import UsaeError

HX = {"HX-Request": "true"}
"""What the concept page's script sends when it loads or polls its CAM panel."""


def test_job_rows_move_through_their_states_once(db_url):
    with session_factory(db_url)() as session:
        user = create_analyst(session)
        first = create_job(session, kind="cam", params={}, run_id=None, user=user)
        second = create_job(session, kind="cam", params={}, run_id=None, user=user)
        session.commit()

        assert claim_job(session, first.id).status == "running"
        assert claim_job(session, first.id) is None  # a second worker does not get it
        report_progress(session, first.id, 0.5, "half way")
        assert session.get(Job, first.id, populate_existing=True).progress == 0.5
        assert cancel_job(session, first.id)
        with pytest.raises(JobCancelled):
            report_progress(session, first.id, 0.6, "more")
        assert not finish_job(session, first.id, {}, "done")  # a cancelled job stays cancelled
        assert not cancel_job(session, first.id)

        assert cancel_job(session, second.id)
        assert claim_job(session, second.id) is None  # cancelled while queued: never starts
        session.commit()



class _Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gone_process_identity() -> str:
    """The `worker_identity` of a process of this machine that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return worker_identity().rpartition("/")[0] + f"/{child.pid}"


def test_a_still_heartbeat_fails_a_job_by_the_sweeping_workers_own_clock(db_url):
    """A job's worker on another machine died: its heartbeat stands still. The sweep times that on
    its own clock; it never compares the row's timestamp, written by the other machine's clock,
    with its own (a machine 5 minutes behind had every healthy job failed within a sweep)."""
    with session_factory(db_url)() as session:
        user = create_analyst(session)
        job = create_job(session, kind="cam", params={}, run_id=None, user=user)
        session.commit()
        claim_job(session, job.id)
        job = session.get(Job, job.id, populate_existing=True)
        assert job.worker == worker_identity()
        # Claimed on a machine whose clock is 5 minutes behind, by a worker this one cannot look up.
        job.updated_at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
        job.worker = "other-host/pid:[4026531836]/123"
        session.commit()
        clock = _Clock()
        watch = HeartbeatWatch(clock=clock)
        assert fail_interrupted_jobs(session, watch) == []  # first seen now, whatever its timestamp says
        clock.now += INTERRUPTED_AFTER_S - 1
        assert fail_interrupted_jobs(session, watch) == []
        assert touch_job(session, job.id)  # a heartbeat: the wait starts again
        session.commit()
        clock.now += 2
        assert fail_interrupted_jobs(session, watch) == []
        clock.now += INTERRUPTED_AFTER_S - 1
        assert fail_interrupted_jobs(session, watch) == []
        clock.now += 1
        assert [j.id for j in fail_interrupted_jobs(session, watch)] == [job.id]
        session.commit()
        job = session.get(Job, job.id, populate_existing=True)
        assert job.status == "failed" and "Interrupted" in job.error
        assert watch.seen == {}


def test_a_job_whose_worker_process_is_gone_fails_at_once_and_a_live_ones_does_not(db_url):
    """On the worker's own machine the sweep looks the process up: a job of a process that has
    ended fails in the first sweep; one of a live process (this one) waits for its heartbeat."""
    with session_factory(db_url)() as session:
        user = create_analyst(session)
        dead, alive = (create_job(session, kind="cam", params={}, run_id=None, user=user) for _ in range(2))
        session.commit()
        for job in (dead, alive):
            claim_job(session, job.id)
        session.get(Job, dead.id, populate_existing=True).worker = _gone_process_identity()
        session.commit()
        # Another machine with the same host name (and the initial PID namespace, alike on every
        # Linux machine) differs in its boot id: its process is not looked up here.
        host, boot, namespace, pid = _gone_process_identity().split("/")
        twin = create_job(session, kind="cam", params={}, run_id=None, user=user)
        session.commit()
        claim_job(session, twin.id)
        session.get(Job, twin.id, populate_existing=True).worker = f"{host}/another-boot/{namespace}/{pid}"
        session.commit()
        watch = HeartbeatWatch(clock=_Clock())
        assert [j.id for j in fail_interrupted_jobs(session, watch)] == [dead.id]
        assert session.get(Job, twin.id, populate_existing=True).status == "running"
        session.commit()
        assert session.get(Job, alive.id, populate_existing=True).status == "running"
        assert sorted(watch.seen) == sorted([alive.id, twin.id])


def test_a_heartbeat_between_the_look_and_the_failing_keeps_the_job(db_url):
    """Two workers sweep at once, or the job's worker touches it just as the sweep decides: the
    failing is conditional on the heartbeat the sweep saw, so a job that moved stays running."""
    with session_factory(db_url)() as session:
        user = create_analyst(session)
        job = create_job(session, kind="cam", params={}, run_id=None, user=user)
        session.commit()
        claim_job(session, job.id)
        session.commit()
        seen = session.get(Job, job.id, populate_existing=True).updated_at
        assert touch_job(session, job.id)
        session.commit()
        assert not fail_job(session, job.id, "x", conditions=(Job.updated_at == seen,))
        now = session.get(Job, job.id, populate_existing=True).updated_at
        assert now != seen and session.get(Job, job.id).status == "running"
        assert fail_job(session, job.id, "x", conditions=(Job.updated_at == now,))


def _api_headers(client) -> dict[str, str]:
    return {"X-CSRF-Token": client.get("/api/auth/csrf").json()["csrf_token"]}


def test_starting_cam_jobs_needs_an_analyst_and_queues_once(web_client, seeded):
    run_id = seeded.run.run_id
    url = f"/api/runs/{run_id}/concepts/3/cam"
    assert web_client.post(url, json={"steps": 16}).status_code == 403  # no CSRF token
    r = web_client.post(url, json={"steps": 16}, headers=_api_headers(web_client))
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["status"], job["kind"], job["concept_index"], job["params"]["steps"]) == ("queued", "cam", 3, 16)
    assert job_queue(seeded.settings).huey.pending_count() == 1  # handed to the workers

    again = web_client.post(url, json={"steps": 16}, headers=_api_headers(web_client))
    assert again.status_code == 409 and "already being made" in again.json()["detail"]
    assert web_client.post(f"/api/runs/{run_id}/concepts/99999/cam", json={},
                           headers=_api_headers(web_client)).status_code == 404
    assert web_client.post(url.replace("/3/", "/4/"), json={"steps": 3},
                           headers=_api_headers(web_client)).status_code == 422
    assert [j["id"] for j in web_client.get("/api/jobs").json()] == [job["id"]]

    panel = web_client.get(f"/runs/{run_id}/concepts/3/cam", headers=HX)
    assert "queued" in panel.text and 'hx-trigger="every 2s"' in panel.text and "Cancel" in panel.text
    assert "No job worker is running" in panel.text and "No job worker" in web_client.get("/jobs").text
    (seeded.data_dir / ALIVE_FILE).touch()  # what a running `usae worker` does every few seconds
    assert "No job worker" not in web_client.get(f"/runs/{run_id}/concepts/3/cam", headers=HX).text
    assert "No job worker" not in web_client.get("/jobs").text
    cancelled = web_client.post(f"/api/jobs/{job['id']}/cancel", headers=_api_headers(web_client)).json()
    assert cancelled["status"] == "cancelled"
    panel = web_client.get(f"/runs/{run_id}/concepts/3/cam", headers=HX).text
    assert "Make CAM images" in panel
    jobs_page = web_client.get("/jobs").text
    assert "CAM images of" in jobs_page and "cancelled" in jobs_page
    assert 'concept 3</a> of <span class="nowrap">demo-run</span>' in jobs_page  # which run's concept 3: runs share concept numbers

    # The page's form (no JavaScript): queue, then back to the concept; cancel goes back there too.
    r = web_client.post(f"/runs/{run_id}/concepts/3/cam", data={"csrf_token": csrf_from(panel), "steps": "64"},
                        follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("/concepts/3#cam")
    form_job = web_client.get("/api/jobs").json()[0]
    assert form_job["params"]["steps"] == 64 and form_job["status"] == "queued"
    for back, target in ((f"/runs/{run_id}/concepts/3#cam", f"/runs/{run_id}/concepts/3#cam"),
                         ("//evil.example/x", "/jobs")):
        r = web_client.post(f"/jobs/{form_job['id']}/cancel", data={"csrf_token": csrf_from(panel), "back": back},
                            follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == target
    assert web_client.get(f"/api/jobs/{form_job['id']}").json()["status"] == "cancelled"

    # The panel's address opened in a browser (a copied link, a reload) shows the page it belongs to.
    r = web_client.get(f"/runs/{run_id}/concepts/3/cam", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/runs/{run_id}/concepts/3#cam"

    web_client.cookies.clear()
    assert web_client.post(url, json={}).status_code == 401
    assert web_client.get("/api/jobs").status_code == 401
    page = web_client.get(f"/runs/{run_id}/concepts/3/cam", follow_redirects=False)
    assert page.status_code == 303 and "/login" in page.headers["location"]


def test_cam_is_refused_upfront_for_a_run_of_imported_activations(web_client, seeded):
    """Without a recorded backbone there is no network to optimise for: say so before queueing."""
    run_id = seeded.run.run_id
    with session_factory(seeded.settings.db_url)() as session:
        for model in session.get(Run, run_id).models:
            model.info = {"family": model.family}  # what `usae import-activations` records
        session.commit()
    panel = web_client.get(f"/runs/{run_id}/concepts/3/cam", headers=HX).text
    assert "records the backbone" in panel and "Make CAM images" not in panel and "<form" not in panel
    r = web_client.post(f"/api/runs/{run_id}/concepts/3/cam", json={"steps": 16}, headers=_api_headers(web_client))
    assert r.status_code == 422 and "imported" in r.json()["detail"]
    r = web_client.post(f"/runs/{run_id}/concepts/3/cam", data={"csrf_token": csrf_from(web_client.get(
        f"/runs/{run_id}/concepts/3").text), "steps": "64"}, follow_redirects=False)
    assert r.status_code == 422
    assert web_client.get("/api/jobs").json() == [] and job_queue(seeded.settings).huey.pending_count() == 0


@pytest.mark.slow
def test_a_worker_makes_cam_images_for_every_model_with_a_backbone(web_client, seeded, tmp_path):
    """mobilenet_v2 (real weights) plus a model whose activations were imported (no backbone):
    a real `usae worker` process optimises an image for the first and says why not for the second."""
    from usae_core.backbones import create_backbone
    from usae_core.config import USAEConfig
    from usae_core.model import USAE

    torch.manual_seed(0)
    dim = create_backbone("mobilenet_v2").dim
    usae = USAE(USAEConfig(model_dims={"mnet": dim, "imported": 8}, n_concepts=16, k=4, encoder="linear")).eval()
    usae.save_pretrained(tmp_path / "run")
    with session_factory(seeded.settings.db_url)() as session:
        run = Run(name="cam-run", run_dir=str(tmp_path / "run"), store_dir="", n_concepts=16, k=4, status="mined")
        run.models = [RunModel(position=0, name="mnet", family="torchvision", dim=dim, grid_h=7, grid_w=7,
                               info={"registry_name": "mobilenet_v2"}),
                      RunModel(position=1, name="imported", family="", dim=8, grid_h=7, grid_w=7, info={})]
        session.add(run)
        session.flush()
        session.add_all(Concept(run_id=run.id, index=i) for i in range(16))
        session.commit()
        run_id = run.id

    page = web_client.get(f"/runs/{run_id}/concepts/5")
    assert page.status_code == 200 and "No CAM image yet" in page.text
    r = web_client.post(f"/api/runs/{run_id}/concepts/5/cam", json={"steps": 12, "image_size": 64},
                        headers=_api_headers(web_client))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--data-dir", str(seeded.data_dir)])
    try:
        deadline = time.monotonic() + 240
        while (job := web_client.get(f"/api/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            assert worker.poll() is None, "the worker exited"
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert job["status"] == "done", job
    assert time.time() - (seeded.data_dir / ALIVE_FILE).stat().st_mtime < 30  # the worker said it was alive
    assert set(job["result"]["images"]) == {"mnet"} and "imported" in job["result"]["skipped"]
    activation = job["result"]["activations"]["mnet"]
    assert activation["final"] > activation["start"]

    detail = web_client.get(f"/api/runs/{run_id}/concepts/5").json()
    cam = {c["model"]: c["cam_image"] for c in detail["columns"]}
    assert cam["imported"] is None and cam["mnet"] == job["result"]["images"]["mnet"]
    assert [c["cam_activation"] for c in detail["columns"]] == [pytest.approx(activation["final"]), None]
    assert [c["cam_peak"] for c in detail["columns"]] == [pytest.approx(activation["peak"]), None]
    png = web_client.get(f"/media/{cam['mnet']}")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
    page = web_client.get(f"/runs/{run_id}/concepts/5")
    assert f"/media/{cam['mnet']}" in page.text  # the cached page was replaced
    polled = web_client.get(f"/runs/{run_id}/concepts/5/cam?polling=1", headers=HX)
    assert polled.headers.get("HX-Refresh") == "true" and "Make new CAM images" in polled.text
    assert "csrf_token" in polled.text and csrf_from(polled.text)


class _Loaded:
    """Stands in for a loaded USAE or backbone: the CAM job only moves it to the device."""

    def eval(self):
        return self

    def to(self, _device):
        return self


def _fake_cam(monkeypatch, on_run=None) -> None:
    """run_cam_job with the optimisation replaced by solid images: what the job does with them
    (files, rows, the job's outcome) is what these tests check."""
    import usae_core.cam
    from app.services import cam as cam_service
    from usae_core.cam import CamResult
    from usae_core.model import USAE

    def optimise(usae, backbones, concept, cfg, grids=None, on_step=None):
        if on_run is not None:
            on_run()
        return {name: CamResult(model=name, image=np.full((8, 8, 3), 128, np.uint8), start_activation=0.0,
                                final_activation=1.0) for name in backbones}

    monkeypatch.setattr(USAE, "from_pretrained", classmethod(lambda cls, run_dir: _Loaded()))
    monkeypatch.setattr(cam_service, "load_backbones", lambda models: ({n: _Loaded() for n in models}, {}))
    monkeypatch.setattr(usae_core.cam, "coordinated_activation_maximization", optimise)


def _run_cam(settings, run_id: int, index: int) -> int:
    """Create, claim and run one CAM job in this process; its id."""
    sessions = session_factory(settings.db_url)
    with sessions() as session:
        alice = session.scalar(select(User).where(User.username == "alice"))
        job = create_job(session, kind="cam", params={"steps": 8, "image_size": 64}, run_id=run_id,
                         concept_index=index, user=alice)
        session.commit()
        job = claim_job(session, job.id)
        session.commit()
    run_cam_job(settings, sessions, job, lambda fraction, message: None)
    return job.id


def test_a_second_cam_job_shows_at_once_on_the_cached_concept_page(web_client, seeded, monkeypatch):
    """Each job replaces the concept's CAM rows. On SQLite the new rows may take the ids of the
    rows just deleted, so the page cache must not take the newest id alone as the CAM version."""
    _fake_cam(monkeypatch)
    run_id, page = seeded.run.run_id, f"/runs/{seeded.run.run_id}/concepts/2"
    for _ in range(2):
        job_id = _run_cam(seeded.settings, run_id, 2)
        assert f"-job{job_id}.png" in web_client.get(page).text


def test_the_jobs_page_says_what_a_job_made_and_how_long_it_took(web_client, seeded, monkeypatch):
    _fake_cam(monkeypatch)
    job_id = _run_cam(seeded.settings, seeded.run.run_id, 2)
    row = web_client.get("/jobs").text.split(f'data-job="{job_id}"')[1].split("</tr>")[0]
    assert "Made 3 images. Mean response over the image, start → end:" in row and " · " in row
    assert row.count("0.00 → 1.00") == 3  # every model's activations, as the pages format them
    assert re.search(r'data-label="Took">\d+ s<', row), row


def test_durations_read_plainly():
    from app.templating import _duration

    assert [_duration(s) for s in (0.4, 42, 185, 3599, 7440)] == ["0 s", "42 s", "3 min 05 s", "59 min 59 s", "2 h 04 min"]


def test_a_cam_job_cancelled_after_its_last_step_keeps_nothing(seeded, monkeypatch):
    run_id, sessions = seeded.run.run_id, session_factory(seeded.settings.db_url)
    _fake_cam(monkeypatch)
    first = _run_cam(seeded.settings, run_id, 2)

    def cancel_now():  # an analyst cancels while the worker is past its last progress report
        with sessions.begin() as session:
            cancel_job(session, session.scalar(select(func.max(Job.id))))

    _fake_cam(monkeypatch, on_run=cancel_now)
    with pytest.raises(JobCancelled):
        _run_cam(seeded.settings, run_id, 2)
    files = sorted(p.name for p in (seeded.settings.media_dir / cam_dir(run_id, 2)).iterdir())
    assert files and all(f"-job{first}.png" in name for name in files)
    with sessions() as session:
        concept = session.scalar(select(Concept).where(Concept.run_id == run_id, Concept.index == 2))
        paths = session.scalars(select(CamImage.file_path).where(CamImage.concept_id == concept.id)).all()
        assert paths and all(f"-job{first}.png" in path for path in paths)


def test_a_cam_job_that_fails_at_the_end_leaves_no_file(seeded, monkeypatch):
    """The concept is deleted (a re-mine with a smaller dictionary) while its images are made:
    the job fails, and the PNGs it had written go with it, like its rows."""
    run_id, sessions = seeded.run.run_id, session_factory(seeded.settings.db_url)
    _fake_cam(monkeypatch)
    first = _run_cam(seeded.settings, run_id, 2)
    folder = seeded.settings.media_dir / cam_dir(run_id, 2)
    before = sorted(p.name for p in folder.iterdir())

    def remove_the_concept():
        with sessions.begin() as session:
            concept = session.scalar(select(Concept).where(Concept.run_id == run_id, Concept.index == 2))
            session.execute(delete(CamImage).where(CamImage.concept_id == concept.id))
            session.delete(concept)

    _fake_cam(monkeypatch, on_run=remove_the_concept)
    with pytest.raises(UsaeError, match="concept 2 was removed"):
        _run_cam(seeded.settings, run_id, 2)
    assert before and all(f"-job{first}.png" in name for name in before)
    assert sorted(p.name for p in folder.iterdir()) == before  # none of the failed job's files


def test_a_cam_job_writes_no_file_outside_the_media_directory(seeded, monkeypatch):
    """Model names come from the store's manifest; one that is not a safe file name fails the
    job instead of naming a path."""
    run_id, sessions = seeded.run.run_id, session_factory(seeded.settings.db_url)
    with sessions.begin() as session:
        model = session.scalar(select(RunModel).where(RunModel.run_id == run_id).order_by(RunModel.position))
        model.name = "../../../../../escaped"  # from media/cam/run-R/concept-C: out of the data directory
    _fake_cam(monkeypatch)
    with pytest.raises(UsaeError, match="invalid model name"):
        _run_cam(seeded.settings, run_id, 2)
    assert not list(seeded.settings.data_dir.parent.rglob("escaped-job*.png"))


_SLOW_WORKER = """
import sys, time
from app.services import job_runner
from app.jobs import run_worker
from app.settings import settings_for

def forever(settings, sessions, job, progress):  # a job that reports progress until stopped
    while True:
        progress(0.5, "working")
        time.sleep(0.05)

job_runner._runners = lambda: {"cam": forever}
run_worker(settings_for(sys.argv[1]))
"""


def test_a_worker_stopped_by_ctrl_c_fails_the_job_in_hand(seeded):
    """Ctrl+C in the terminal of `usae serve` reaches its job worker too; the job it was running
    must not stay 'running' (and block new CAM jobs of the concept) after the worker is gone."""
    from app.jobs import enqueue_job

    sessions = session_factory(seeded.settings.db_url)
    with sessions.begin() as session:
        alice = session.scalar(select(User).where(User.username == "alice"))
        job_id = create_job(session, kind="cam", params={}, run_id=seeded.run.run_id, concept_index=2, user=alice).id
    enqueue_job(seeded.settings, job_id)
    worker = subprocess.Popen([sys.executable, "-c", _SLOW_WORKER, str(seeded.data_dir)])
    try:
        deadline = time.monotonic() + 120
        while (status := _status(sessions, job_id)) != "running":
            assert status == "queued" and worker.poll() is None and time.monotonic() < deadline, status
            time.sleep(0.2)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) is not None
    finally:
        worker.kill()
        worker.wait()
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "failed" and "worker stopped" in job.error


def _status(sessions, job_id: int) -> str:
    with sessions() as session:
        return session.get(Job, job_id).status


def test_serve_migrates_a_new_database_before_its_job_worker_starts(tmp_path, monkeypatch):
    """The job worker migrates the database as it starts; were `usae serve` to migrate only after
    starting it, the two would race to create the same tables in a new data directory."""
    from contextlib import contextmanager

    import sqlalchemy

    import app.jobs
    from app.commands import web
    from app.db import get_engine
    from app.settings import settings_for

    seen = []

    @contextmanager
    def worker_process(settings):
        seen.append(sqlalchemy.inspect(get_engine(settings.db_url)).has_table("jobs"))
        yield None

    monkeypatch.setattr(app.jobs, "worker_process", worker_process)
    monkeypatch.setattr(web, "_serve", lambda *args: None)
    web.serve_cmd(workers=1, data_dir=tmp_path / "data")
    get_engine(settings_for(tmp_path / "data").db_url).dispose()
    assert seen == [True]


def test_the_cancel_button_commits_before_it_redirects(seeded):
    """The browser follows the redirect at once: the page it lands on must show the job cancelled
    (the request's session commits only after the response has been sent)."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.app.webapp import sign_in_as

    sessions = session_factory(seeded.settings.db_url)
    with sessions.begin() as session:
        alice = session.scalar(select(User).where(User.username == "alice"))
        job_id = create_job(session, kind="cam", params={"steps": 64}, run_id=seeded.run.run_id, concept_index=2,
                            user=alice).id
    app, seen = create_app(seeded.settings), []

    async def app_watching_the_response(scope, receive, send):
        async def watched_send(message):
            if message["type"] == "http.response.start" and scope["path"].endswith("/cancel"):
                seen.append(_status(sessions, job_id))
            await send(message)

        await app(scope, receive, watched_send)

    with TestClient(app_watching_the_response) as client:
        sign_in_as(client, seeded, "alice")
        token = csrf_from(client.get("/jobs").text)
        r = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token, "back": "/jobs"}, follow_redirects=False)
    assert r.status_code == 303 and seen == ["cancelled"]


def test_jobs_page_and_worker_options_refuse_nothing_silently(web_client, seeded):
    with session_factory(seeded.settings.db_url)() as session:  # a row written by an older version
        session.add(Job(kind="cam", params={}, run_id=seeded.run.run_id, concept_index=1, message="old"))
        session.commit()
    page = web_client.get("/jobs")
    assert page.status_code == 200 and "concept 1" in page.text and "steps)" not in page.text

    from typer.testing import CliRunner

    from app.cli import cli

    bad = CliRunner().invoke(cli, ["worker", "--torch-threads", "0", "--data-dir", str(seeded.data_dir)])
    assert bad.exit_code != 0 and "--torch-threads must be >= 1" in str(bad.exception)


def test_the_servers_job_worker_is_replaced_when_it_dies(tmp_path):
    from app.jobs import worker_process
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path / "usae-data", database_url=None)
    with worker_process(settings) as current:
        first = current()
        deadline = time.monotonic() + 60
        while not (settings.data_dir / ALIVE_FILE).exists():  # up and running
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        first.kill()
        while current() is first:
            assert time.monotonic() < deadline, "no new worker was started"
            time.sleep(0.1)
        second = current()
        assert second.poll() is None
    assert second.poll() is not None  # stopped with the block


def _queue_cam_job(settings, run_id: int, index: int, params: dict | None = None) -> int:
    from app.jobs import enqueue_job

    with session_factory(settings.db_url).begin() as session:
        alice = session.scalar(select(User).where(User.username == "alice"))
        job_id = create_job(session, kind="cam", params=params or {"steps": 64}, run_id=run_id, concept_index=index,
                            user=alice).id
    enqueue_job(settings, job_id)
    return job_id


_BROKEN_WORKER = """
import sys
from app.services import job_runner
from app.jobs import run_worker
from app.settings import settings_for

def broken(settings, sessions, job, progress):  # a bug in the server's code
    progress(0.1, "working")
    raise AttributeError("type object 'Image' has no attribute 'view_path'")

job_runner._runners = lambda: {"cam": broken}
run_worker(settings_for(sys.argv[1]))
"""


def test_a_job_failing_on_a_server_bug_tells_the_analyst_what_to_do(web_client, seeded, tmp_path):
    """A bug (an exception the code does not raise on purpose) fails the job with a sentence for
    analysts: that it is the server's problem, what to do, and the job's number for the admin.
    The exception itself is in the server's log with its traceback, and folded on the page."""
    run_id = seeded.run.run_id
    job_id = _queue_cam_job(seeded.settings, run_id, 2)
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-c", _BROKEN_WORKER, str(seeded.data_dir)], stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while _status(session_factory(seeded.settings.db_url), job_id) != "failed":
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=60)
    raw = "AttributeError: type object 'Image' has no attribute 'view_path'"
    text = log.read_text()
    assert f"job {job_id} (cam) failed" in text and "Traceback (most recent call last)" in text and raw in text

    job = web_client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "failed" and "problem on the server" in job["message"]
    assert f"job {job_id}" in job["message"] and "administrator" in job["message"] and "Try again" in job["message"]
    assert job["error"] == raw  # the detail, for an administrator or an API client
    panel = web_client.get(f"/runs/{run_id}/concepts/2/cam", headers=HX).text
    row = web_client.get("/jobs").text.split(f'data-job="{job_id}"')[1].split("</tr>")[0]
    for html in (panel, row):
        shown = html.replace("&#39;", "'")
        assert "problem on the server" in shown and f"job {job_id}" in shown
        before, _, folded = shown.partition("<details")
        assert raw not in before and raw in folded  # the raw error only folded away
    assert "Make CAM images" in panel  # and the analyst can try again


def test_an_expected_job_error_keeps_its_own_message(web_client, seeded):
    """Errors the code raises on purpose (UsaeError) already say what is wrong in words: they are
    shown as they are, without the class name or a technical fold. The seeded run has no USAE on
    disk, so its CAM job fails as a real one does."""
    from app.services.job_runner import run_job

    run_id = seeded.run.run_id
    job_id = _queue_cam_job(seeded.settings, run_id, 2)
    run_job(seeded.settings, job_id)
    job = web_client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["message"].startswith("there is no USAE run at"), job
    assert "UsaeError" not in job["message"] + job["error"]
    panel = web_client.get(f"/runs/{run_id}/concepts/2/cam", headers=HX).text
    assert "there is no USAE run at" in panel and "<details" not in panel and "problem on the server" not in panel
    row = web_client.get("/jobs").text.split(f'data-job="{job_id}"')[1].split("</tr>")[0]
    assert "there is no USAE run at" in row and "<details" not in row


_SWEEPING_WORKER = """
import sys
import app.jobs
from app.jobs import run_worker
from app.settings import settings_for

app.jobs.ALIVE_EVERY_S = 0.2
run_worker(settings_for(sys.argv[1]))
"""


def test_a_running_worker_fails_jobs_whose_worker_died(seeded):
    """A worker killed mid-job (SIGKILL after `docker stop`'s grace period, the OOM killer) leaves
    its job 'running'. Failing such jobs only when a worker starts missed the ones whose worker
    died after the next one had started (a restarted container's): they stayed 'running', and
    the concept refused new CAM jobs (409), until some later worker start."""
    sessions = session_factory(seeded.settings.db_url)
    worker = subprocess.Popen([sys.executable, "-c", _SWEEPING_WORKER, str(seeded.data_dir)])
    try:
        deadline = time.monotonic() + 60
        while not (seeded.data_dir / ALIVE_FILE).exists():  # started: past its start-up sweep
            assert worker.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        with sessions.begin() as session:  # a job another worker took and died with
            alice = session.scalar(select(User).where(User.username == "alice"))
            job = create_job(session, kind="cam", params={}, run_id=seeded.run.run_id, concept_index=2, user=alice)
            session.flush()
            claim_job(session, job.id)
            session.get(Job, job.id, populate_existing=True).worker = _gone_process_identity()
            job_id = job.id
        while _status(sessions, job_id) == "running":
            assert worker.poll() is None and time.monotonic() < deadline, "the job was never failed"
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=60)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.status == "failed" and "Interrupted" in job.message and "again" in job.message


def test_the_cam_panel_keeps_the_steps_last_chosen(web_client, seeded):
    """After a 64-step job the panel offers 64 again, not the default 128; steps only the API
    offers (16) are kept too."""
    run_id = seeded.run.run_id
    url = f"/runs/{run_id}/concepts/3/cam"
    assert re.search(r'<option value="128"\s+selected>', web_client.get(url, headers=HX).text)  # no job yet: the default
    for steps in (64, 16):
        token = csrf_from(web_client.get(f"/runs/{run_id}/concepts/3").text)
        r = web_client.post(url, data={"csrf_token": token, "steps": str(steps)}, follow_redirects=False) \
            if steps == 64 else web_client.post(f"/api{url}", json={"steps": steps}, headers=_api_headers(web_client))
        assert r.status_code in (202, 303), r.text
        job_id = web_client.get("/api/jobs").json()[0]["id"]
        web_client.post(f"/api/jobs/{job_id}/cancel", headers=_api_headers(web_client))  # ended, as a done job
        panel = web_client.get(url, headers=HX).text
        assert re.search(rf'<option value="{steps}"\s+selected>', panel), panel
        assert len(re.findall(r"\sselected>", panel)) == 1
