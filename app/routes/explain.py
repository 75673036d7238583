"""Explain an uploaded image (analysts only: an upload is a write).

The upload is read only once the request is known to come from a signed-in analyst: a body
parameter would make FastAPI read (and spool to disk) every visitor's upload before any
dependency runs, so the form is parsed by `upload_form`, which depends on the analyst.
Explaining decodes the image whole (up to 40 Mpx, about half a gigabyte at its peak) and runs
the backbones, which keep per-call state and cannot serve two images at once: each server
process explains one image at a time, lets a few more wait, and refuses the rest (429).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from app.deps import AnalystViewer, SessionDep, SettingsDep
from app.params import BodyInt
from app.schemas.explain import Explanation
from app.services.explain import ModelCache, UploadRejected, explain_image, validate_upload
from app.services.runs_view import get_run, list_runs
from app.settings import Settings
from app.templating import render
from usae_core.errors import UsaeError


class _Fields(BaseModel):
    run_id: BodyInt
    framing: str = Field("centre", max_length=20)
    """`centre` or `whole` (app.services.explain.FRAMINGS); another value is refused with the reason."""


@dataclass(frozen=True)
class Upload:
    run_id: int
    image: UploadFile
    framing: str


async def upload_form(request: Request, viewer: AnalystViewer) -> AsyncIterator[Upload]:
    """The upload form's fields, read after the analyst (and the CSRF token) was checked; its
    spooled file is closed (deleted) when the response is done."""
    form = await request.form()  # parsed once: the CSRF check of a multipart write read it already
    try:
        try:
            fields = _Fields.model_validate({k: v for k, v in form.items() if k in _Fields.model_fields})
        except ValidationError as exc:
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise RequestValidationError([{"type": "missing", "loc": ("body", "image"), "msg": "Field required",
                                           "input": None}])
        yield Upload(run_id=fields.run_id, image=image, framing=fields.framing)
    finally:
        await form.close()


UploadDep = Annotated[Upload, Depends(upload_form)]
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["run_id", "image"], "properties": {
        "run_id": {"type": "integer", "minimum": 0},
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
        "framing": {"type": "string", "enum": ["centre", "whole"], "default": "centre"}}}}}}}
"""/api/explain's body in the API description (its fields are not endpoint parameters)."""


class ExplainBusy(Exception):
    def __init__(self) -> None:
        super().__init__("The server is explaining other images just now. Try again in a few seconds.")


class ExplainGate:
    """One explanation at a time per server process, `waiting` more may wait for their turn (up
    to `wait_s` each); anything beyond is refused at once, before its upload is read into memory."""

    def __init__(self, *, waiting: int = 3, wait_s: float = 60.0):
        self._admitted = threading.BoundedSemaphore(1 + waiting)
        self._turn = threading.Lock()
        self.wait_s = wait_s

    def admit(self) -> None:
        if not self._admitted.acquire(blocking=False):
            raise ExplainBusy()

    def leave(self) -> None:
        self._admitted.release()

    def run(self, work, *args):
        """`work(*args)` once it is this request's turn (call from a worker thread)."""
        if not self._turn.acquire(timeout=self.wait_s):
            raise ExplainBusy()
        try:
            return work(*args)
        finally:
            self._turn.release()


GATE = ExplainGate()
"""Per process: memory and the loaded backbones are the process's."""


async def _read_limited(upload: UploadFile, max_bytes: int) -> bytes:
    """Read at most one byte past the limit, so an oversized upload is refused without buffering it all."""
    return await upload.read(max_bytes + 1)


def _explain_now(request: Request, session: Session, settings: Settings, run_id: int, data: bytes,
                 framing: str) -> Explanation:
    """Runs in a worker thread: the backbones take a while and must not block the event loop."""
    run = get_run(session, run_id=run_id)
    if run is None:
        raise HTTPException(404, "No such run.")
    image = validate_upload(data, max_bytes=settings.max_upload_bytes)
    cache: ModelCache = request.app.state.explain_models
    return explain_image(session, run=run, image=image, cache=cache, framing=framing)


async def _explain(request: Request, session: Session, settings: Settings, upload: Upload) -> Explanation:
    """The explanation of `upload`, in its turn (ExplainBusy when too many are waiting)."""
    GATE.admit()
    try:
        data = await _read_limited(upload.image, settings.max_upload_bytes)
        return await run_in_threadpool(GATE.run, _explain_now, request, session, settings, upload.run_id, data,
                                       upload.framing)
    finally:
        GATE.leave()


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
                           upload: UploadDep):
        explanation, error, status = None, None, 200
        try:
            explanation = await _explain(request, session, settings, upload)
        except (UploadRejected, UsaeError) as exc:
            error, status = str(exc), 422
        except ExplainBusy as exc:
            error, status = str(exc), 429
        return render(request, viewer, "explain/page.html", status_code=status, nav="explain",
                      runs=list_runs(session), run_id=upload.run_id, explanation=explanation, error=error,
                      filename=upload.image.filename or "", max_mb=settings.max_upload_bytes / 1e6,
                      framing=upload.framing)

    return router


def analyst_api() -> APIRouter:
    router = APIRouter(tags=["explain"])

    @router.post("/explain", response_model=Explanation, summary="Explain an image", openapi_extra=UPLOAD_BODY,
                 responses={422: {"description": "Not an accepted image, too large, or the run cannot be loaded"},
                            429: {"description": "Other images are being explained; try again shortly"}})
    async def explain_api(request: Request, session: SessionDep, settings: SettingsDep,
                          upload: UploadDep) -> Explanation:
        """Upload a PNG, JPEG or WebP image; get each model's strongest concepts with heatmaps.
        `framing`: `centre` explains the image's centre square (as extraction cut the run's
        images), `whole` the whole image padded to a square."""
        try:
            return await _explain(request, session, settings, upload)
        except (UploadRejected, UsaeError) as exc:
            raise HTTPException(422, str(exc)) from None
        except ExplainBusy as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "5"}) from None

    return router
