"""FastAPI dependencies: database session, the analyst, share scopes, runs by id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session

from app.models import Run, User
from app.security import csrf_is_valid, session_user
from app.services.runs_view import get_run
from app.services.shares import ShareNotFound, resolve_share
from app.services.users import active_user
from app.settings import Settings
from app.urls import ANALYST_URLS, share_urls
from app.viewer import Viewer


MAX_TOKEN_LENGTH = 200
"""Real tokens have 43 characters; longer ones are not hashed, just not found."""


class LoginRequired(Exception):
    """Raised for a visitor without a session: pages redirect to the log-in form, the API says 401."""


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One session per request, committed when the endpoint returns normally.

    Why async, and why the look-up dependencies below end their transaction: sync endpoints and
    dependencies each run on a worker thread from a bounded pool. If a request kept a pooled
    database connection while waiting for a thread (say, to close its session), a burst of
    requests could hold every connection while the threads wait for connections: a deadlock
    until the pool times out. Here the session is opened and closed on the event loop (a
    commit or rollback, no waiting for the pool), and no connection is held between hops."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _release_connection(session: Session) -> None:
    """End the read transaction of a look-up dependency, returning its connection to the pool
    before the request moves to the next thread (objects stay loaded: expire_on_commit=False)."""
    session.commit()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def signed_in_user(request: Request, session: Session) -> User | None:
    """The active analyst whose session this request carries, if any."""
    signed_in = session_user(request) if "session" in request.scope else None
    if signed_in is None:
        return None
    user_id, epoch = signed_in
    return active_user(session, user_id=user_id, epoch=epoch)


def optional_analyst(request: Request, session: SessionDep) -> User | None:
    user = signed_in_user(request, session)
    _release_connection(session)
    return user


OptionalAnalyst = Annotated[User | None, Depends(optional_analyst)]


async def csrf_checked(request: Request) -> None:
    """Refuse a write that does not carry the session's CSRF token."""
    if not await csrf_is_valid(request):
        raise HTTPException(403, "The form has expired or did not come from this site. Reload the page and try again.")


CsrfChecked = Depends(csrf_checked)


async def current_analyst(request: Request, user: OptionalAnalyst) -> User:
    """The signed-in analyst; for writes (POST/PUT/PATCH/DELETE) also checks the CSRF token."""
    if user is None:
        raise LoginRequired()
    await csrf_checked(request)
    return user


CurrentAnalyst = Annotated[User, Depends(current_analyst)]


async def analyst_viewer(user: CurrentAnalyst) -> Viewer:
    """Async because it touches no database: a sync dependency costs a hop to a worker thread."""
    return Viewer(urls=ANALYST_URLS, user=user)


class UnknownAuditLink(HTTPException):
    """404 for a token that names no audit link. Its error page offers no way "back to the shared
    view": that view is this same 404."""

    def __init__(self) -> None:
        super().__init__(404, "There is no audit link at this address. Check that it was copied completely, "
                              "or ask whoever shared it with you for the link again.")


def share_viewer(session: SessionDep, token: Annotated[str, Path(description="The audit link's token")]) -> Viewer:
    """A share-link holder; unknown tokens (of any length) are 404, revoked or expired ones 410
    (ShareGone)."""
    try:
        if len(token) > MAX_TOKEN_LENGTH:
            raise ShareNotFound()
        grant = resolve_share(session, token=token)
    except ShareNotFound:
        raise UnknownAuditLink() from None
    finally:
        _release_connection(session)
    return Viewer(urls=share_urls(token), share=grant)


AnalystViewer = Annotated[Viewer, Depends(analyst_viewer)]
ShareScope = Annotated[Viewer, Depends(share_viewer)]


def get_run_or_404(session: Session, viewer: Viewer, run_id: int, *, whole_run: bool = False) -> Run:
    """The run, if it exists and the viewer may see it (the whole run, for run-wide pages).
    Out-of-scope runs are 404, exactly like missing ones, so a link reveals nothing else."""
    if whole_run and viewer.sees_run(run_id) and not viewer.sees_whole_run(run_id):
        # The link's own run, so saying so reveals nothing the link does not already show.
        raise HTTPException(404, "This audit link shares only some concepts of this run, not its run-wide pages. "
                                 "The shared concepts are in the shared view.")
    allowed = viewer.sees_whole_run(run_id) if whole_run else viewer.sees_run(run_id)
    run = get_run(session, run_id=run_id) if allowed else None
    if run is None:
        raise HTTPException(404, "No such run.")
    return run
