"""Audit links: create, list and revoke (analysts), and the landing page of a link (holders)."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Annotated, Literal

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from app.deps import AnalystViewer, SessionDep, ShareScope
from app.params import DB_INT_MAX, FormInt, PathInt, readable_problems
from app.schemas.concepts import ConceptFilters
from app.schemas.shares import ShareCreate, ShareCreated, ShareInfo, SharedScope
from app.services.runs_view import get_run, list_runs
from app.services.shares import (DEFAULT_SHARE_DAYS, LISTED_CONCEPTS, MAX_SHARE_DAYS, MAX_SHARED_CONCEPTS,
                                 ShareNotFound, create_share, get_share, list_shares, listed_concept_labels,
                                 open_token, reveal_share, revoke_share, seal_token, start_handoff, take_handoff,
                                 view_concept_indices)
from app.templating import render
from app.viewer import Viewer
from usae_core.errors import UsaeError


def _parse_indices(text: str) -> list[int]:
    """'3, 17 42' -> [3, 17, 42]."""
    parts = text.replace(",", " ").split()
    try:
        indices = [int(p) for p in parts]
    except ValueError:
        raise UsaeError("concept numbers must be whole numbers separated by commas or spaces") from None
    for index in indices:
        if not 0 <= index <= DB_INT_MAX:
            raise UsaeError(f"there is no concept {index}")
    return indices


def _end_of_day(day: dt.date | None) -> dt.datetime | None:
    """A link 'valid until 3 March' works through the whole of 3 March (UTC)."""
    if day is None:
        return None
    return dt.datetime.combine(day, dt.time(23, 59, 59), tzinfo=dt.timezone.utc)


def _create(session: SessionDep, viewer: Viewer, body: ShareCreate) -> ShareCreated:
    run = get_run(session, run_id=body.run_id)
    if run is None:
        raise UsaeError(f"there is no run {body.run_id}")
    return create_share(session, run=run, creator=viewer.user, scope=body.scope,  # type: ignore[arg-type]
                        concept_indices=body.concept_indices, note=body.note, expires_at=body.expires_at)


def _revoke(session: SessionDep, share_id: int) -> ShareInfo:
    try:
        return revoke_share(session, share_id=share_id)
    except ShareNotFound:
        raise HTTPException(404, "No such audit link.") from None


def _expiry_days() -> tuple[dt.date, dt.date, dt.date]:
    """The form's first, default and last expiry dates (UTC); a link valid through its last day
    stays within MAX_SHARE_DAYS."""
    today = dt.datetime.now(dt.timezone.utc).date()
    return (today, today + dt.timedelta(days=DEFAULT_SHARE_DAYS),
            today + dt.timedelta(days=MAX_SHARE_DAYS - 1))


def _shares_page(request: Request, session: SessionDep, viewer: Viewer, *, form: dict[str, object],
                 error: str | None = None, notice: dict[str, str] | None = None,
                 status_code: int = 200) -> HTMLResponse:
    first, default, last = _expiry_days()
    shares = list_shares(session)
    return render(request, viewer, "shares/list.html", status_code=status_code, nav="shares",
                  shares=shares, labels=listed_concept_labels(session, shares), listed=LISTED_CONCEPTS,
                  runs=list_runs(session), form=form, error=error, notice=notice,
                  expiry_range=(first.isoformat(), last.isoformat()), expiry_default=default.isoformat())


HANDOFF_SECONDS = 120
"""How long the redirect after creating a link may take to come back for its address."""


def _handoff_key(request: Request) -> bytes:
    """The sealing key, derived from the session cookies' secret (never the secret itself)."""
    secret = request.app.state.settings.resolved_secret_key()
    return hashlib.sha256(b"usae share hand-off key\0" + secret.encode()).digest()


def _handoff_context(creator_id: int, share_id: int) -> str:
    """A sealed token opens only for the analyst who created the link, and for that link."""
    return f"{creator_id}|{share_id}"


def _hand_off(request: Request, session: SessionDep, viewer: Viewer, created: ShareCreated) -> None:
    """Keep the new link's token, sealed, in the database for the page the POST redirects to
    (Post/Redirect/Get: a reload of that page creates nothing). The database, not the session
    cookie: a response of the same session in flight meanwhile (another tab) would write its
    older copy of the cookie back, dropping the hand-off or bringing it back."""
    assert viewer.user is not None
    sealed = seal_token(_handoff_key(request), created.token, context=_handoff_context(viewer.user.id, created.id))
    start_handoff(session, share_id=created.id, sealed=sealed, seconds=HANDOFF_SECONDS)


def _take_handoff(request: Request, session: SessionDep, viewer: Viewer, share_id: int) -> str | None:
    """The token handed off for `share_id`, once (a reload, back and forward find nothing), only
    to its creator and before its deadline."""
    assert viewer.user is not None
    sealed = take_handoff(session, share_id=share_id, creator_id=viewer.user.id)
    if sealed is None:
        return None
    return open_token(_handoff_key(request), sealed, context=_handoff_context(viewer.user.id, share_id))


def _browser_list(session: SessionDep, request: Request, run_id: int | None) -> tuple[str, dict[str, str] | None]:
    """The form's concept numbers for `/shares?run=ID&browser=1&<the browser's filters>`: every
    concept of that list (all its pages), at most a link's worth, and a line saying so."""
    raw = {k: v for k, v in request.query_params.items()
           if v != "" and k in ConceptFilters.model_fields and k not in ("page", "per_page")}
    try:
        filters = ConceptFilters.model_validate(raw)
    except ValidationError as exc:
        raise HTTPException(400, f"These filters are not valid: {readable_problems(exc.errors())}.") from None
    run = get_run(session, run_id=run_id) if run_id is not None else None
    if run is None:
        return "", {"kind": "error", "text": "That run no longer exists: choose a run and the concepts to share."}
    indices = view_concept_indices(session, run=run, filters=filters)
    if not indices:
        return "", {"kind": "warn", "text": "The concept browser's list is empty now: there is nothing to fill in."}
    chosen = sorted(indices[:MAX_SHARED_CONCEPTS])
    numbers = ", ".join(map(str, chosen))
    if len(indices) > MAX_SHARED_CONCEPTS:
        return numbers, {"kind": "warn", "text": (
            f"The concept browser's list has {len(indices):,} concepts, but a link shows at most "
            f"{MAX_SHARED_CONCEPTS}: only the first {MAX_SHARED_CONCEPTS} in the list's order are filled in. "
            "Narrow the filters to share the others in another link, or share the whole run.")}
    n = len(indices)
    return numbers, {"kind": "ok", "text": f"Filled in from the concept browser: all {n} concept{'s' if n != 1 else ''} "
                                           "of its list, on every page."}


def analyst_pages() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/shares", response_class=HTMLResponse)
    def shares_page(request: Request, session: SessionDep, viewer: AnalystViewer, run: int | None = None,
                    concepts: str = "", browser: bool = False):
        """`?run=ID&concepts=1,2` pre-fills the form (from a run or concept page);
        `?run=ID&browser=1&<filters>` with every concept of that browser list."""
        notice = None
        if browser:
            concepts, notice = _browser_list(session, request, run)
        form = {"run_id": run, "scope": "concepts" if concepts or browser else "run", "concepts": concepts,
                "note": "", "expires_on": _expiry_days()[1].isoformat()}
        return _shares_page(request, session, viewer, form=form, notice=notice)

    @router.post("/shares", response_class=HTMLResponse)
    def create_share_page(request: Request, session: SessionDep, viewer: AnalystViewer,
                          run_id: FormInt, scope: Annotated[Literal["run", "concepts"], Form()],
                          concepts: Annotated[str, Form()] = "", note: Annotated[str, Form(max_length=500)] = "",
                          expires_on: Annotated[str, Form()] = ""):
        form = {"run_id": run_id, "scope": scope, "concepts": concepts, "note": note, "expires_on": expires_on}
        try:
            if scope == "run" and concepts.strip():
                # The numbers say "these concepts", the choice says "everything": never guess the wider one.
                raise UsaeError("you listed concepts but chose “the whole run”; choose “only these concepts” "
                                "to share just those, or clear the numbers to share the whole run")
            expires = _end_of_day(dt.date.fromisoformat(expires_on)) if expires_on else None
            body = ShareCreate(run_id=run_id, scope=scope, note=note, expires_at=expires,
                               concept_indices=_parse_indices(concepts) if scope == "concepts" else [])
            created = _create(session, viewer, body)
        except (UsaeError, ValueError) as exc:
            return _shares_page(request, session, viewer, form=form, error=str(exc), status_code=422)
        _hand_off(request, session, viewer, created)
        return RedirectResponse(f"/shares/{created.id}/created", status_code=303)

    @router.get("/shares/{share_id}/created", response_class=HTMLResponse)
    def created_page(request: Request, share_id: PathInt, session: SessionDep, viewer: AnalystViewer):
        """The new link's address, the first time only (the token leaves the session as it is
        shown); afterwards the page says the link exists but its address is not shown again."""
        if request.headers.get("sec-fetch-site") == "cross-site":
            # Another site's link (or image) would use up the one showing of a link its creator
            # just made, within the hand-off's 2 minutes: the creator then never sees the address.
            return RedirectResponse(f"/shares#share-{share_id}", status_code=303)
        token = _take_handoff(request, session, viewer, share_id)
        created = reveal_share(session, share_id=share_id, creator_id=viewer.user.id,  # type: ignore[union-attr]
                               token=token) if token else None
        if created is not None:
            base = request.app.state.settings.public_url or str(request.base_url)
            response = render(request, viewer, "shares/created.html", nav="shares", share=created,
                              full_url=base.rstrip("/") + created.url)
        else:
            try:
                share = get_share(session, share_id=share_id)
            except ShareNotFound:
                raise HTTPException(404, "No such audit link.") from None
            response = render(request, viewer, "shares/created.html", nav="shares", share=share, full_url=None)
        response.headers["Cache-Control"] = "no-store"  # never from history or the back/forward cache
        return response

    @router.post("/shares/{share_id}/revoke", response_class=HTMLResponse)
    def revoke_page(request: Request, share_id: PathInt, session: SessionDep, viewer: AnalystViewer):
        share = _revoke(session, share_id)
        if request.headers.get("HX-Request") == "true":
            return render(request, viewer, "shares/_row.html", share=share,
                          labels=listed_concept_labels(session, [share]), listed=LISTED_CONCEPTS)
        return RedirectResponse("/shares", status_code=303)

    return router


def share_pages() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/s/{token}")
    def share_landing(viewer: ShareScope) -> RedirectResponse:
        """A run link opens on the run overview, a concept link on its concepts."""
        grant = viewer.share
        assert grant is not None
        if grant.concept_indices is None:
            return RedirectResponse(viewer.urls.run(grant.run_id), status_code=303)
        return RedirectResponse(viewer.urls.concepts(grant.run_id), status_code=303)

    return router


def analyst_api() -> APIRouter:
    router = APIRouter(prefix="/shares", tags=["audit links"])

    @router.get("", response_model=list[ShareInfo], summary="List audit links")
    def shares_api(session: SessionDep, viewer: AnalystViewer) -> list[ShareInfo]:
        return list_shares(session)

    @router.post("", response_model=ShareCreated, status_code=201, summary="Create an audit link")
    def create_api(body: ShareCreate, session: SessionDep, viewer: AnalystViewer) -> ShareCreated:
        """The response carries the token once; only its hash is kept."""
        try:
            return _create(session, viewer, body)
        except UsaeError as exc:
            raise HTTPException(422, str(exc)) from None

    @router.post("/{share_id}/revoke", response_model=ShareInfo, summary="Revoke an audit link")
    def revoke_api(share_id: PathInt, session: SessionDep, viewer: AnalystViewer) -> ShareInfo:
        return _revoke(session, share_id)

    return router


def share_api() -> APIRouter:
    router = APIRouter(tags=["audit links"])

    @router.get("/s/{token}", response_model=SharedScope, summary="What an audit link shows")
    def scope_api(viewer: ShareScope) -> SharedScope:
        grant = viewer.share
        assert grant is not None
        return SharedScope(
            run_id=grant.run_id, scope="run" if grant.concept_indices is None else "concepts",
            concept_indices=sorted(grant.concept_indices or []), note=grant.note,
            created_by=grant.created_by_name, expires_at=grant.expires_at)

    return router
