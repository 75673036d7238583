"""Explain an uploaded image (analysts only: an upload is a write)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app.deps import AnalystViewer, SessionDep, SettingsDep
from app.params import FormInt
from app.schemas.explain import Explanation
from app.services.explain import ModelCache, UploadRejected, explain_image, validate_upload
from app.services.runs_view import get_run, list_runs
from app.settings import Settings
from app.templating import render
from usae_core.errors import UsaeError

FormFraming = Annotated[str, Form(max_length=20)]
"""`centre` or `whole` (app.services.explain.FRAMINGS); another value is refused with the reason."""


async def _read_limited(upload: UploadFile, max_bytes: int) -> bytes:
    """Read at most one byte past the limit, so an oversized upload is refused without buffering it all."""
    return await upload.read(max_bytes + 1)


def _explain(request: Request, session: Session, settings: Settings, run_id: int, data: bytes,
             framing: str) -> Explanation:
    """Runs in a worker thread: the backbones take a while and must not block the event loop."""
    run = get_run(session, run_id=run_id)
    if run is None:
        raise HTTPException(404, "No such run.")
    image = validate_upload(data, max_bytes=settings.max_upload_bytes)
    cache: ModelCache = request.app.state.explain_models
    return explain_image(session, run=run, image=image, cache=cache, framing=framing)


def analyst_pages() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/explain", response_class=HTMLResponse)
    def explain_form(request: Request, session: SessionDep, viewer: AnalystViewer, settings: SettingsDep,
                     run: int | None = None):
        return render(request, viewer, "explain/page.html", nav="explain", runs=list_runs(session), run_id=run,
                      explanation=None, filename="", error=None, max_mb=settings.max_upload_bytes / 1e6,
                      framing="centre")

    @router.post("/explain", response_class=HTMLResponse)
    async def explain_page(request: Request, session: SessionDep, viewer: AnalystViewer, settings: SettingsDep,
                           run_id: FormInt, image: Annotated[UploadFile, File()], framing: FormFraming = "centre"):
        data = await _read_limited(image, settings.max_upload_bytes)
        explanation, error, status = None, None, 200
        try:
            explanation = await run_in_threadpool(_explain, request, session, settings, run_id, data, framing)
        except (UploadRejected, UsaeError) as exc:
            error, status = str(exc), 422
        return render(request, viewer, "explain/page.html", status_code=status, nav="explain",
                      runs=list_runs(session), run_id=run_id, explanation=explanation, error=error,
                      filename=image.filename or "", max_mb=settings.max_upload_bytes / 1e6, framing=framing)

    return router


def analyst_api() -> APIRouter:
    router = APIRouter(tags=["explain"])

    @router.post("/explain", response_model=Explanation, summary="Explain an image",
                 responses={422: {"description": "Not an accepted image, too large, or the run cannot be loaded"}})
    async def explain_api(request: Request, session: SessionDep, viewer: AnalystViewer, settings: SettingsDep,
                          run_id: FormInt, image: Annotated[UploadFile, File()],
                          framing: FormFraming = "centre") -> Explanation:
        """Upload a PNG, JPEG or WebP image; get each model's strongest concepts with heatmaps.
        `framing`: `centre` explains the image's centre square (as extraction cut the run's
        images), `whole` the whole image padded to a square."""
        data = await _read_limited(image, settings.max_upload_bytes)
        try:
            return await run_in_threadpool(_explain, request, session, settings, run_id, data, framing)
        except (UploadRejected, UsaeError) as exc:
            raise HTTPException(422, str(exc)) from None

    return router
