"""Background jobs: row transitions on SQLite and Postgres, the CAM endpoints' rules, and a CAM
job run end to end by a real `usae worker` process on a real backbone."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from app.db import session_factory
from app.jobs import job_queue
from app.models import Concept, Job, Run, RunModel
from app.services.jobs import (
    JobCancelled,
    cancel_job,
    claim_job,
    create_job,
    fail_interrupted_jobs,
    finish_job,
    report_progress,
)
from tests.app.seed import create_analyst
from tests.app.webapp import csrf_from


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

        third = create_job(session, kind="cam", params={}, run_id=None, user=user)
        session.commit()
        claim_job(session, third.id)
        session.commit()
        assert fail_interrupted_jobs(session) == []  # its heartbeat is fresh
        later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)
        assert [j.id for j in fail_interrupted_jobs(session, now=later)] == [third.id]
        session.commit()
        job = session.get(Job, third.id, populate_existing=True)
        assert job.status == "failed" and "Interrupted" in job.error


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

    panel = web_client.get(f"/runs/{run_id}/concepts/3/cam")
    assert "queued" in panel.text and 'hx-trigger="every 2s"' in panel.text and "Cancel" in panel.text
    cancelled = web_client.post(f"/api/jobs/{job['id']}/cancel", headers=_api_headers(web_client)).json()
    assert cancelled["status"] == "cancelled"
    panel = web_client.get(f"/runs/{run_id}/concepts/3/cam").text
    assert "Make CAM images" in panel
    jobs_page = web_client.get("/jobs").text
    assert "CAM images of" in jobs_page and "cancelled" in jobs_page

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

    web_client.cookies.clear()
    assert web_client.post(url, json={}).status_code == 401
    assert web_client.get("/api/jobs").status_code == 401
    page = web_client.get(f"/runs/{run_id}/concepts/3/cam", follow_redirects=False)
    assert page.status_code == 303 and "/login" in page.headers["location"]


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
    assert set(job["result"]["images"]) == {"mnet"} and "imported" in job["result"]["skipped"]
    activation = job["result"]["activations"]["mnet"]
    assert activation["final"] > activation["start"]

    detail = web_client.get(f"/api/runs/{run_id}/concepts/5").json()
    cam = {c["model"]: c["cam_image"] for c in detail["columns"]}
    assert cam["imported"] is None and cam["mnet"] == job["result"]["images"]["mnet"]
    assert [c["cam_activation"] for c in detail["columns"]] == [pytest.approx(activation["final"]), None]
    png = web_client.get(f"/media/{cam['mnet']}")
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
    page = web_client.get(f"/runs/{run_id}/concepts/5")
    assert f"/media/{cam['mnet']}" in page.text  # the cached page was replaced
    polled = web_client.get(f"/runs/{run_id}/concepts/5/cam?polling=1")
    assert polled.headers.get("HX-Refresh") == "true" and "Make new CAM images" in polled.text
    assert "csrf_token" in polled.text and csrf_from(polled.text)
