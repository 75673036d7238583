"""Signing in and out (form and JSON), with CSRF and throttling per address and name."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from app.deps import CsrfChecked, CurrentAnalyst, OptionalAnalyst, SessionDep
from app.models import User
from app.schemas.auth import CsrfToken, LoginBody, Me
from app.security import csrf_token, end_session, start_session
from app.services.sign_in_throttle import LoginThrottle
from app.services.users import SignInBusy, authenticate, end_all_sessions
from app.templating import render
from app.urls import ANALYST_URLS
from app.viewer import Viewer


class TooManyAttempts(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"Too many sign-in attempts from this address or for this name. "
                         f"Try again in {retry_after_s} seconds.")
        self.retry_after_s = retry_after_s


def _safe_next(target: str | None) -> str:
    """Only same-site paths, so the log-in form cannot be used to bounce users elsewhere."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/runs"


def _sign_in(request: Request, session: Session, username: str, password: str) -> User | None:
    throttle: LoginThrottle = request.app.state.login_throttle
    client = request.client.host if request.client else "?"
    wait = throttle.begin(client, username)
    if wait:
        raise TooManyAttempts(wait)
    try:
        user = authenticate(session, username=username, password=password)
    except SignInBusy:
        raise TooManyAttempts(5) from None
    if user is None:
        return None
    throttle.succeeded(client, username)
    start_session(request, user.id, user.session_epoch)
    return user


def _sign_out(request: Request, session: Session, user: User | None) -> None:
    """Ends every session of the analyst, not only this cookie: a copy of it stops working too."""
    if user is not None:
        end_all_sessions(session, user=user)
    end_session(request)


def _login_form(request: Request, session: Session, *, next_url: str, username: str = "", error: str | None = None,
                status_code: int = 200) -> HTMLResponse:
    # A server started on an empty data directory (`usae serve` run away from the demo's folder)
    # has no accounts: say so, where a failed sign-in would only say the password is wrong.
    no_accounts = not session.scalar(select(exists().where(User.is_active)))
    return render(request, Viewer(urls=ANALYST_URLS), "login.html", status_code=status_code, next_url=next_url,
                  username=username, error=error, no_accounts=no_accounts)


def pages() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, session: SessionDep, user: OptionalAnalyst, next: str | None = None):
        if user is not None:
            return RedirectResponse(_safe_next(next), status_code=303)
        return _login_form(request, session, next_url=_safe_next(next))

    @router.post("/login", response_class=HTMLResponse, dependencies=[CsrfChecked])
    def login(request: Request, session: SessionDep, username: Annotated[str, Form()],
              password: Annotated[str, Form()], next: Annotated[str, Form()] = "/runs"):
        try:
            user = _sign_in(request, session, username, password)
        except TooManyAttempts as exc:
            return _login_form(request, session, next_url=_safe_next(next), username=username, error=str(exc),
                               status_code=429)
        if user is None:
            return _login_form(request, session, next_url=_safe_next(next), username=username,
                               error="That user name and password do not match.", status_code=401)
        return RedirectResponse(_safe_next(next), status_code=303)

    @router.post("/logout", dependencies=[CsrfChecked])
    def logout(request: Request, session: SessionDep, user: OptionalAnalyst) -> RedirectResponse:
        _sign_out(request, session, user)
        return RedirectResponse("/login", status_code=303)

    return router


def api() -> APIRouter:
    router = APIRouter(prefix="/auth", tags=["auth"])

    @router.get("/csrf", response_model=CsrfToken, summary="CSRF token for this session")
    def csrf_api(request: Request) -> CsrfToken:
        """Send it as the `X-CSRF-Token` header with every POST/PUT/DELETE (log-in included)."""
        return CsrfToken(csrf_token=csrf_token(request))

    @router.post("/login", response_model=Me, dependencies=[CsrfChecked], summary="Sign in",
                 responses={401: {"description": "Wrong user name or password"},
                            429: {"description": "Too many failed attempts"}})
    def login_api(request: Request, body: LoginBody, session: SessionDep) -> Me:
        """Sets the signed session cookie. A new CSRF token comes with the new session."""
        try:
            user = _sign_in(request, session, body.username, body.password)
        except TooManyAttempts as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None
        if user is None:
            raise HTTPException(401, "That user name and password do not match.")
        return Me(id=user.id, username=user.username)

    @router.post("/logout", status_code=204, dependencies=[CsrfChecked], summary="Sign out")
    def logout_api(request: Request, session: SessionDep, user: OptionalAnalyst) -> None:
        """Ends every session of this analyst (other devices and copies of the cookie too)."""
        _sign_out(request, session, user)

    @router.get("/me", response_model=Me, summary="The signed-in analyst")
    def me_api(user: CurrentAnalyst) -> Me:
        return Me(id=user.id, username=user.username)

    return router
