"""The web application: `create_app(settings)` builds it; `usae serve` runs it with uvicorn.

Analysts browse at `/runs/...`; share-link holders browse the same pages under
`/s/TOKEN/...`, each read router being built once per kind of viewer. The JSON API mirrors
the pages under `/api` and is documented at `/docs`.
"""

from __future__ import annotations

import gc
import logging
import re
from contextlib import asynccontextmanager
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

from app.db import get_engine, session_factory
from app.deps import MAX_TOKEN_LENGTH, LoginRequired, UnknownAuditLink, analyst_viewer, share_viewer, signed_in_user
from app.headers import API_DOCS_PATH, SecurityHeaders
from app.migrations import upgrade_database
from app.page_cache import PageCache
from app.params import readable_problems
from app.routes import auth, compare, concepts, explain, health, jobs, media, runs, shares
from app.security import SESSION_COOKIE, SESSION_MAX_AGE_S, keep_share_tokens_out_of_access_logs
from app.services.explain import ModelCache
from app.services.shares import ShareGone, ShareNotFound, resolve_share
from app.services.sign_in_throttle import LoginThrottle
from app.settings import Settings, get_settings
from app.templating import STATIC_DIR, render
from app.urls import ANALYST_URLS, share_urls
from app.viewer import Viewer

log = logging.getLogger(__name__)
FORM_BODY_LIMIT = 1024 * 1024
"""Bytes a request body may have (forms and JSON: labels, links, sign-in); image uploads get
`USAE_MAX_UPLOAD_BYTES` more. Larger bodies are refused with 413 as they arrive, before
anything reads them whole."""
NO_SUCH_PAGE = "There is no page at this address. Check the link, or start again from the menu."
ERROR_HEADINGS = {400: "This request is not valid", 401: "Please sign in", 403: "Not allowed",
                  404: "Not found", 409: "Conflict", 410: "This link no longer works",
                  413: "Too large", 422: "Check your input", 429: "Slow down"}


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.media_dir.mkdir(parents=True, exist_ok=True)
        upgrade_database(settings.db_url)
        refresh_planner_statistics(settings.db_url)
        freeze_startup_objects()
        yield

    app = FastAPI(title="USAE Concept Explorer", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  max_body_size=FORM_BODY_LIMIT,
                  description="[← Back to the explorer](/runs)\n\n"
                              "Browse, compare, label and share the concepts of Universal Sparse Autoencoder runs. "
                              "Sign in through `/api/auth/login`; writes need the `X-CSRF-Token` header "
                              "(from `/api/auth/csrf`). Audit-link holders read under `/api/s/{token}/...`.")
    app.state.settings = settings
    keep_share_tokens_out_of_access_logs()
    app.state.sessionmaker = session_factory(settings.db_url)
    app.state.login_throttle = LoginThrottle(app.state.sessionmaker, per_name=settings.login_attempts_per_minute,
                                             per_address=settings.login_attempts_per_minute_per_address)
    app.state.explain_models = ModelCache()
    app.state.page_cache = PageCache()
    app.add_middleware(SecurityHeaders)
    app.add_middleware(SessionMiddleware, secret_key=settings.resolved_secret_key(), session_cookie=SESSION_COOKIE,
                       max_age=SESSION_MAX_AGE_S, same_site="lax", https_only=settings.secure_cookies)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _include_routes(app, upload_body_limit=settings.max_upload_bytes + FORM_BODY_LIMIT)
    _install_api_docs(app)
    _install_error_pages(app)
    return app


def _install_api_docs(app: FastAPI) -> None:
    """The interactive API page at /docs, served from static/vendor: FastAPI's own page loads
    Swagger UI from a CDN, which leaves it blank offline and breaks "nothing from another origin"."""
    vendor = "/static/vendor/swagger-ui"

    @app.get(API_DOCS_PATH, include_in_schema=False)
    def api_docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title}: API",
                                   swagger_js_url=f"{vendor}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{vendor}/swagger-ui.css",
                                   swagger_favicon_url=f"{vendor}/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no spec sent out to be validated


def refresh_planner_statistics(url: str) -> None:
    """SQLite only plans the browser's filtered sorts well with table statistics; a sampled
    ANALYZE takes milliseconds even on large runs. (Postgres keeps its own up to date.)"""
    engine = get_engine(url)
    if engine.dialect.name != "sqlite":
        return
    with engine.begin() as connection:
        connection.exec_driver_sql("PRAGMA analysis_limit=400")
        connection.exec_driver_sql("ANALYZE")


def freeze_startup_objects() -> None:
    """Keep what start-up made (modules, torch, the app, SQLAlchemy's mappers: about 300,000
    objects) out of the garbage collector's full passes. Each full pass over them took about
    140 ms, during which the worker answered nothing, a few times a minute under load; the
    objects live as long as the process anyway."""
    gc.collect()
    gc.freeze()


def app_from_environment() -> FastAPI:
    """For `uvicorn --factory app.main:app_from_environment` (several worker processes):
    settings come from USAE_* environment variables."""
    return create_app(get_settings())


def _include_routes(app: FastAPI, *, upload_body_limit: int) -> None:
    share_prefix = "/s/{token}"
    for module in (runs, concepts, compare):
        app.include_router(module.pages(analyst_viewer))
        app.include_router(module.pages(share_viewer), prefix=share_prefix)
        app.include_router(module.api(analyst_viewer), prefix="/api")
        app.include_router(module.api(share_viewer), prefix="/api" + share_prefix)
    for module in (runs, concepts, shares, explain, jobs):
        limit = upload_body_limit if module is explain else None  # image uploads
        app.include_router(module.analyst_pages(), max_body_size=limit)
        app.include_router(module.analyst_api(), prefix="/api", max_body_size=limit)
    app.include_router(auth.pages())
    app.include_router(auth.api(), prefix="/api")
    app.include_router(shares.share_pages())
    app.include_router(shares.share_api(), prefix="/api")
    app.include_router(media.router())
    app.include_router(health.router())


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/api"


_SHARE_PAGE = re.compile(r"^/s/([A-Za-z0-9_-]+)(/|$)")


def _error_viewer(request: Request) -> Viewer:
    """Inside an audit link, errors are shown to a link holder: every link stays inside the
    link, and no session is started. Elsewhere the analyst's navigation shows when someone is
    signed in."""
    share = _SHARE_PAGE.match(request.url.path)
    with request.app.state.sessionmaker() as session:
        if share:
            token = share.group(1)
            try:  # a working link keeps its banner (who shared it, until when) on its error pages
                grant = resolve_share(session, token=token) if len(token) <= MAX_TOKEN_LENGTH else None
            except (ShareNotFound, ShareGone):
                grant = None
            return Viewer(urls=share_urls(token), share=grant)
        return Viewer(urls=ANALYST_URLS, user=signed_in_user(request, session))


def _error_page(request: Request, status_code: int, message: str, headers: dict[str, str] | None = None, *,
                link_opens: bool = True) -> Response:
    """`link_opens`: inside an audit link, whether its shared view opens, so the page may lead
    back there (not for a revoked, expired or unknown link)."""
    if _is_api(request):
        return JSONResponse({"detail": message}, status_code=status_code, headers=headers)
    # A page asked for with bad query parameters (filters) can be tried again without them.
    path = request.url.path
    without_query = path if (request.method == "GET" and request.url.query and status_code in (400, 422)
                             and path.startswith("/") and not path.startswith("//")) else None
    response = render(request, _error_viewer(request), "error.html", status_code=status_code,
                      heading=ERROR_HEADINGS.get(status_code, "Something went wrong"), message=message,
                      status_code_shown=status_code, link_opens=link_opens, without_query=without_query)
    if headers:
        response.headers.update(headers)
    return response


def _install_error_pages(app: FastAPI) -> None:
    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": "Sign in first (POST /api/auth/login)."}, status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(ShareGone)
    async def share_gone(request: Request, exc: ShareGone) -> Response:
        return _error_page(request, 410, exc.reason, link_opens=False)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "The request could not be completed."
        if exc.status_code == 404 and message == "Not Found":  # Starlette's own: no route here
            message = NO_SUCH_PAGE
        return _error_page(request, exc.status_code, message, exc.headers,
                           link_opens=not isinstance(exc, UnknownAuditLink))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        if _is_api(request):
            return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
        if request.method == "GET" and any(e["loc"][0] == "path" for e in exc.errors()):
            return _error_page(request, 404, NO_SUCH_PAGE)  # /runs/1/concepts/abc names no page
        return _error_page(request, 422, f"Some of the input is not valid: {readable_problems(exc.errors())}.")
