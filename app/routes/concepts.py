"""The concept browser, the concept page and label edits, as pages and as JSON."""

# No `from __future__ import annotations` here: FastAPI must see the locally built
# `ViewerDep` annotations as objects, not as strings it would look up in module globals.
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.deps import AnalystViewer, SessionDep, get_run_or_404
from app.models import Concept, Run
from app.params import FormInt, PathInt, readable_problems
from app.schemas.concepts import ConceptDetail, ConceptFilters, ConceptPage
from app.schemas.labels import LabelConflictBody, LabelEdit, LabelState
from app.services.cam import cam_unavailable
from app.services.concept_table import EXCEL_BOM, concept_csv
from app.services.concepts import browse_concepts, browse_page, concept_detail, get_concept
from app.services.labels import LabelConflict, parse_tags, update_label
from app.templating import render
from app.viewer import Viewer
from usae_core.errors import UsaeError


async def concept_filters(request: Request) -> ConceptFilters:
    """Filters from the query string. Empty fields (an untouched form input) mean 'not set'.
    Async because it only parses: a sync dependency costs a hop to a worker thread and back."""
    raw = {k: v for k, v in request.query_params.items() if v != "" and k in ConceptFilters.model_fields}
    try:
        return ConceptFilters.model_validate(raw)
    except ValidationError as exc:
        raise HTTPException(400, f"These filters are not valid: {readable_problems(exc.errors())}.") from None


FiltersDep = Annotated[ConceptFilters, Depends(concept_filters)]


def _run_and_concept(session: Session, viewer: Viewer, run_id: int, index: int) -> tuple[Run, Concept]:
    run = get_run_or_404(session, viewer, run_id)
    if not viewer.sees_concept(run_id, index):
        # Only the link's own concepts are named: the holder sees them in the shared view anyway.
        shared = sorted(viewer.concept_scope or ())
        listed = ", ".join(map(str, shared[:12])) + (", …" if len(shared) > 12 else "")
        raise HTTPException(404, f"This audit link shares only concept{'s' if len(shared) != 1 else ''} {listed} of this run.")
    concept = get_concept(session, run_id=run.id, index=index)
    if concept is None:
        raise HTTPException(404, f"Run {run.name} has no concept {index}.")
    return run, concept


def _as_seen_by(viewer: Viewer, detail: ConceptDetail) -> ConceptDetail:
    """A share-link holder sees the label as it is now, never its history: earlier names and
    descriptions (drafts, internal notes) and who edited them are the analysts' own."""
    return detail if viewer.share is None else detail.model_copy(update={"history": []})


def _browsed_run(session: Session, viewer: Viewer, run_id: int, filters: ConceptFilters) -> Run:
    run = get_run_or_404(session, viewer, run_id)
    if filters.mostly and filters.mostly not in {m.name for m in run.models}:
        raise HTTPException(400, f"Run {run.name} has no model {filters.mostly!r}.")
    return run


def _save_label(session: Session, concept: Concept, viewer: Viewer, draft: dict[str, str],
                version: int) -> tuple[dict[str, str], int]:
    """(notice for the page, HTTP status) of saving the label form's `draft`."""
    try:
        edit = LabelEdit(label=draft["label"], description=draft["description"], tags=parse_tags(draft["tags"]),
                         version=version)
        update_label(session, concept=concept, editor=viewer.user, edit=edit)  # type: ignore[arg-type]
    except LabelConflict as conflict:
        if viewer.user is not None and conflict.editor == viewer.user.username:  # another tab or window
            return {"kind": "warn", "text": "You saved this label elsewhere (another tab or window) while "
                    "editing it here. That version is shown just below; the text of this page is still in "
                    "the form. Review it and save again to replace the other one."}, 409
        return {"kind": "warn", "text": f"{conflict.editor} saved this label while you were editing it. "
                "Their version is shown just below; your text is still in the form. Review it and save again "
                "to replace theirs."}, 409
    except UsaeError as exc:
        return {"kind": "error", "text": f"Not saved: {exc}"}, 422
    except ValidationError as exc:
        return {"kind": "error", "text": "Not saved: " + "; ".join(e["msg"] for e in exc.errors())}, 422
    return {"kind": "ok", "text": "Label saved."}, 200


def pages(viewer_dep: Any) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    ViewerDep = Annotated[Viewer, Depends(viewer_dep)]

    @router.get("/runs/{run_id}/concepts", response_class=HTMLResponse)
    def browser_page(request: Request, run_id: PathInt, filters: FiltersDep, session: SessionDep, viewer: ViewerDep):
        return request.app.state.page_cache.respond(request, session, viewer, run_id, lambda: render(
            request, viewer, "concepts/browser.html", nav="runs", page=browse_page(
                session, run=_browsed_run(session, viewer, run_id, filters), filters=filters,
                scope=viewer.concept_scope)))

    @router.get("/runs/{run_id}/concepts.csv")
    def browser_csv(run_id: PathInt, filters: FiltersDep, session: SessionDep, viewer: ViewerDep) -> Response:
        """Every concept the browser view with these filters shows (all its pages), as CSV."""
        run = _browsed_run(session, viewer, run_id, filters)
        body = concept_csv(session, run=run, filters=filters, scope=viewer.concept_scope)
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", run.name).strip("-.") or f"run-{run.id}"
        return Response(EXCEL_BOM + body, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{name}-concepts.csv"'})

    @router.get("/runs/{run_id}/concepts/{index}", response_class=HTMLResponse)
    def concept_page(request: Request, run_id: PathInt, index: PathInt, filters: FiltersDep, session: SessionDep,
                     viewer: ViewerDep):
        """Opened from the browser, the URL carries its list (filters and sort): previous / next
        then step through that list, and the page links back to it."""
        def render_page() -> HTMLResponse:
            run, concept = _run_and_concept(session, viewer, run_id, index)
            view = filters if request.query_params else None
            if view is not None:
                _browsed_run(session, viewer, run_id, view)
            detail = _as_seen_by(viewer, concept_detail(session, run=run, concept=concept, scope=viewer.concept_scope,
                                                        view=view))
            return render(request, viewer, "concepts/page.html", nav="runs", detail=detail, draft=None, notice=None,
                          cam_unavailable=cam_unavailable(run.models),
                          view=view if detail.view_position is not None else None)

        return request.app.state.page_cache.respond(request, session, viewer, run_id, render_page)

    return router


def analyst_pages() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.post("/runs/{run_id}/concepts/{index}/label", response_class=HTMLResponse)
    def save_label(request: Request, run_id: PathInt, index: PathInt, filters: FiltersDep, session: SessionDep,
                   viewer: AnalystViewer, version: FormInt, label: Annotated[str, Form()] = "",
                   description: Annotated[str, Form()] = "", tags: Annotated[str, Form()] = ""):
        """Save from the concept page. htmx swaps in the label panel; without JavaScript the
        browser is redirected back to the page (or shown it again with the problem), in the
        list it was opened from (the form's query) if any."""
        run, concept = _run_and_concept(session, viewer, run_id, index)
        draft = {"label": label, "description": description, "tags": tags}
        notice, status = _save_label(session, concept, viewer, draft, version)
        session.commit()
        is_htmx = request.headers.get("HX-Request") == "true"
        view = filters.view_query() if request.query_params else None
        if status == 200 and not is_htmx:
            return RedirectResponse(viewer.urls.concept(run.id, index, view) + "#label", status_code=303)
        detail = concept_detail(session, run=run, concept=concept)
        # htmx only swaps 2xx responses, so its partial comes back as 200 with the notice in it.
        return render(request, viewer, "concepts/_label_panel.html" if is_htmx else "concepts/page.html",
                      status_code=200 if is_htmx else status, nav="runs", detail=detail,
                      draft=None if status == 200 else draft, notice=notice, swap_heading=is_htmx,
                      cam_unavailable=cam_unavailable(run.models))

    return router


def api(viewer_dep: Any) -> APIRouter:
    router = APIRouter(tags=["concepts"])
    ViewerDep = Annotated[Viewer, Depends(viewer_dep)]

    @router.get("/runs/{run_id}/concepts", response_model=ConceptPage, summary="Browse concepts")
    def browser_api(run_id: PathInt, filters: FiltersDep, session: SessionDep, viewer: ViewerDep) -> ConceptPage:
        """The concept browser: the same query parameters as the page's URL."""
        return browse_concepts(session, run=_browsed_run(session, viewer, run_id, filters), filters=filters,
                               scope=viewer.concept_scope)

    @router.get("/runs/{run_id}/concepts/{index}", response_model=ConceptDetail, summary="One concept")
    def concept_api(run_id: PathInt, index: PathInt, session: SessionDep, viewer: ViewerDep) -> ConceptDetail:
        run, concept = _run_and_concept(session, viewer, run_id, index)
        return _as_seen_by(viewer, concept_detail(session, run=run, concept=concept, scope=viewer.concept_scope))

    return router


def analyst_api() -> APIRouter:
    router = APIRouter(tags=["concepts"])

    @router.put("/runs/{run_id}/concepts/{index}/label", response_model=LabelState, summary="Edit a label",
                responses={409: {"model": LabelConflictBody, "description": "Someone saved first"}})
    def label_api(run_id: PathInt, index: PathInt, edit: LabelEdit, session: SessionDep, viewer: AnalystViewer):
        """Send the `version` you read; a stale version gets 409 with the current label."""
        _, concept = _run_and_concept(session, viewer, run_id, index)
        try:
            return update_label(session, concept=concept, editor=viewer.user, edit=edit)  # type: ignore[arg-type]
        except LabelConflict as conflict:
            session.rollback()
            body = LabelConflictBody(detail=str(conflict), current=conflict.current)
            return JSONResponse(body.model_dump(mode="json"), status_code=409)
        except UsaeError as exc:
            raise HTTPException(422, str(exc)) from None

    return router
