"""Model comparison, as a page and as JSON."""

# No `from __future__ import annotations` here: FastAPI must see the locally built
# `ViewerDep` annotations as objects, not as strings it would look up in module globals.
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from app.deps import SessionDep, get_run_or_404
from app.params import PathInt
from app.schemas.compare import Comparison
from app.services.compare import LIST_LENGTH, LIST_MAX, compare_models
from app.templating import render
from app.viewer import Viewer
from usae_core.errors import UsaeError


def _compare(session: Session, viewer: Viewer, run_id: int, a: str, b: str, show: str | None) -> Comparison:
    run = get_run_or_404(session, viewer, run_id, whole_run=True)
    try:
        return compare_models(session, run=run, model_a=a, model_b=b, show=show)
    except UsaeError as exc:
        raise HTTPException(400, str(exc)) from None


def pages(viewer_dep: Any) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    ViewerDep = Annotated[Viewer, Depends(viewer_dep)]

    @router.get("/runs/{run_id}/compare", response_class=HTMLResponse)
    def compare_page(request: Request, run_id: PathInt, session: SessionDep, viewer: ViewerDep,
                     a: str | None = None, b: str | None = None, show: str | None = None):
        """Without a pair in the URL, compare the run's first two models. The same model picked
        twice (easy with two menus) shows it against the next one, saying so, rather than an error page."""
        run = get_run_or_404(session, viewer, run_id, whole_run=True)
        names = [m.name for m in run.models]
        if len(names) < 2:
            raise HTTPException(400, f"Run {run.name} has only one model; there is nothing to compare.")
        a = a or names[0]
        notice = None
        if b == a and a in names:
            b = None
            notice = f"Model A and model B were both {a}: pick two different models."
        b = b or next(n for n in names if n != a)
        return render(request, viewer, "compare.html", nav="runs", models=names, notice=notice,
                      list_length=LIST_LENGTH, list_max=LIST_MAX,
                      comparison=_compare(session, viewer, run_id, a, b, show))

    return router


def api(viewer_dep: Any) -> APIRouter:
    router = APIRouter(tags=["compare"])
    ViewerDep = Annotated[Viewer, Depends(viewer_dep)]

    @router.get("/runs/{run_id}/compare", response_model=Comparison, summary="Compare two models")
    def compare_api(run_id: PathInt, session: SessionDep, viewer: ViewerDep,
                    a: Annotated[str, Query(description="Model A")],
                    b: Annotated[str, Query(description="Model B")],
                    show: Annotated[str | None, Query(description="List this group in full (up to 1,000): "
                                                      "shared, only_a or only_b")] = None) -> Comparison:
        """Cross R² both ways, shared and unique concepts ranked (each list its 15 most frequent,
        or all of one with `show`), per-concept firing frequencies."""
        return _compare(session, viewer, run_id, a, b, show)

    return router
