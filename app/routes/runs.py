"""Runs: the list and the run overview, as pages and as JSON."""

# No `from __future__ import annotations` here: FastAPI must see the locally built
# `ViewerDep` annotations as objects, not as strings it would look up in module globals.
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from app.deps import AnalystViewer, SessionDep, get_run_or_404
from app.params import PathInt
from app.schemas.runs import RunOverview, RunSummary
from app.services.overview import run_overview
from app.services.runs_view import list_runs
from app.templating import render
from app.viewer import Viewer


def pages(viewer_dep: Any) -> APIRouter:
    """Run pages for analysts (viewer_dep = analyst) or for a share holder (share scope)."""
    router = APIRouter(include_in_schema=False)
    ViewerDep = Annotated[Viewer, Depends(viewer_dep)]

    @router.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(request: Request, run_id: PathInt, session: SessionDep, viewer: ViewerDep):
        run = get_run_or_404(session, viewer, run_id, whole_run=True)
        # Why the last mine stopped is for analysts: the message can name paths and internals.
        return render(request, viewer, "runs/overview.html", nav="runs", overview=run_overview(session, run=run),
                      last_mine_error=run.error if viewer.can_edit else None)

    return router


def analyst_pages() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    def home() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    @router.get("/runs", response_class=HTMLResponse)
    def runs_page(request: Request, session: SessionDep, viewer: AnalystViewer):
        return render(request, viewer, "runs/list.html", nav="runs", runs=list_runs(session))

    return router


def api(viewer_dep: Any) -> APIRouter:
    router = APIRouter(tags=["runs"])
    ViewerDep = Annotated[Viewer, Depends(viewer_dep)]

    @router.get("/runs/{run_id}", response_model=RunOverview, summary="Run overview")
    def run_api(run_id: PathInt, session: SessionDep, viewer: ViewerDep) -> RunOverview:
        """R² matrix, concept counts by kind, firing-entropy histogram, co-fire vs energy and the
        best concept per defect type."""
        return run_overview(session, run=get_run_or_404(session, viewer, run_id, whole_run=True))

    return router


def analyst_api() -> APIRouter:
    router = APIRouter(tags=["runs"])

    @router.get("/runs", response_model=list[RunSummary], summary="List runs")
    def runs_api(session: SessionDep, viewer: AnalystViewer) -> list[RunSummary]:
        return list_runs(session)

    return router
