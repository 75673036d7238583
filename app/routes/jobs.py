"""Background jobs: start CAM images for a concept, follow them, cancel them (analysts only)."""

# No `from __future__ import annotations`: FastAPI reads the Annotated dependencies below.
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.deps import AnalystViewer, SessionDep, SettingsDep, get_run_or_404
from app.jobs import enqueue_job, worker_alive
from app.models import Job
from app.params import PathInt
from app.schemas.jobs import JobOut
from app.services.cam import KIND as CAM, CamRequest, cam_unavailable
from app.services.concepts import get_concept
from app.services.jobs import cancel_job, create_job, job_run_names, latest_job, list_jobs
from app.settings import Settings
from app.templating import render
from app.viewer import Viewer


def _start_cam(session: Session, settings: Settings, viewer: Viewer, run_id: int, index: int,
               request: CamRequest) -> Job:
    run = get_run_or_404(session, viewer, run_id)
    if get_concept(session, run_id=run.id, index=index) is None:
        raise HTTPException(404, f"Run {run.name} has no concept {index}.")
    unavailable = cam_unavailable(run.models)
    if unavailable:
        raise HTTPException(422, unavailable)
    active = latest_job(session, kind=CAM, run_id=run.id, concept_index=index)
    if active is not None and active.status in ("queued", "running"):
        raise HTTPException(409, f"CAM images for concept {index} are already being made (job {active.id}).")
    job = create_job(session, kind=CAM, params=request.model_dump(), run_id=run.id, concept_index=index,
                     user=viewer.user)  # type: ignore[arg-type]
    session.commit()  # the worker must find the row
    enqueue_job(settings, job.id)
    return job


def _job_or_404(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, "No such job.")
    return job


def analyst_pages() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.post("/runs/{run_id}/concepts/{index}/cam", response_class=HTMLResponse)
    def start_cam(request: Request, run_id: PathInt, index: PathInt, session: SessionDep, settings: SettingsDep,
                  viewer: AnalystViewer, steps: Annotated[int, Form()] = 128):
        try:
            cam = CamRequest(steps=steps)
        except ValidationError as exc:
            raise HTTPException(422, "; ".join(e["msg"] for e in exc.errors())) from None
        _start_cam(session, settings, viewer, run_id, index, cam)
        if request.headers.get("HX-Request") == "true":
            return cam_status(request, run_id, index, session, settings, viewer)
        return RedirectResponse(viewer.urls.concept(run_id, index) + "#cam", status_code=303)

    @router.get("/runs/{run_id}/concepts/{index}/cam", response_class=HTMLResponse)
    def cam_status(request: Request, run_id: PathInt, index: PathInt, session: SessionDep, settings: SettingsDep,
                   viewer: AnalystViewer, polling: bool = False):
        """The concept page's CAM panel, polled while a job is queued or running. Opened as an
        address of its own (not by the page's script), it sends the browser to the page."""
        run = get_run_or_404(session, viewer, run_id)
        if request.headers.get("HX-Request") != "true":
            return RedirectResponse(viewer.urls.concept(run.id, index) + "#cam", status_code=303)
        job = latest_job(session, kind=CAM, run_id=run.id, concept_index=index)
        response = render(request, viewer, "concepts/_cam_panel.html", run_id=run.id, index=index, job=job,
                          unavailable=cam_unavailable(run.models),
                          worker_missing=job is not None and job.status == "queued" and not worker_alive(settings),
                          data_dir=settings.data_dir)
        if polling and job is not None and job.status == "done":
            response.headers["HX-Refresh"] = "true"  # the page shows the new images
        return response

    @router.get("/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request, session: SessionDep, settings: SettingsDep, viewer: AnalystViewer):
        jobs = list_jobs(session)
        waiting = any(j.status == "queued" for j in jobs)
        return render(request, viewer, "jobs/list.html", nav="jobs", jobs=jobs, data_dir=settings.data_dir,
                      worker_missing=waiting and not worker_alive(settings), run_names=job_run_names(session, jobs))

    @router.post("/jobs/{job_id}/cancel")
    def cancel(job_id: PathInt, session: SessionDep, viewer: AnalystViewer, back: Annotated[str, Form()] = "/jobs"):
        """Cancel, then go back where the button was (a local path only: never an open redirect)."""
        _job_or_404(session, job_id)
        cancel_job(session, job_id)
        session.commit()  # before the redirect: the page the browser lands on must show it cancelled
        local = back.startswith("/") and not back.startswith("//") and "\\" not in back
        return RedirectResponse(back if local else "/jobs", status_code=303)

    return router


def analyst_api() -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.post("/runs/{run_id}/concepts/{index}/cam", response_model=JobOut, status_code=202,
                 summary="Make CAM images of a concept",
                 responses={409: {"description": "A CAM job for this concept is already queued or running"},
                            422: {"description": "No model of the run records its backbone (imported activations)"}})
    def start_cam_api(run_id: PathInt, index: PathInt, cam: CamRequest, session: SessionDep, settings: SettingsDep,
                      viewer: AnalystViewer) -> Job:
        """Queue a job that optimises one image per model for the concept (coordinated activation
        maximisation). Follow it at `/api/jobs/{id}`; when done, the concept's `cam_image` fields
        point at the images."""
        return _start_cam(session, settings, viewer, run_id, index, cam)

    @router.get("/jobs", response_model=list[JobOut], summary="Recent jobs")
    def jobs_api(session: SessionDep, viewer: AnalystViewer) -> list[Job]:
        return list_jobs(session)

    @router.get("/jobs/{job_id}", response_model=JobOut, summary="One job")
    def job_api(job_id: PathInt, session: SessionDep, viewer: AnalystViewer) -> Job:
        return _job_or_404(session, job_id)

    @router.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a job")
    def cancel_api(job_id: PathInt, session: SessionDep, viewer: AnalystViewer) -> Job:
        """A queued job never starts; a running one stops at its next progress report. Finished
        jobs are left as they are."""
        _job_or_404(session, job_id)
        cancel_job(session, job_id)
        session.commit()
        return session.get(Job, job_id, populate_existing=True)

    return router
