"""Rendered pages of a run, served again while nothing they show has changed.

A page is stored under its path and query string, the analyst and their session's CSRF token
(which the page embeds), and the run's *data version*: the run's status and active mining
generation (a re-mine replaces every statistic, image and neighbour together with the
generation), the newest label-history id (every label, description or tag edit adds one) and
the newest CAM image's creation time (a CAM job replaces a concept's rows with new ones; their
ids are no signal, as SQLite may give the new rows the ids of the rows just deleted).
The version is read from the database on every request, so an edit made by any worker
process, or by `usae mine`, is visible on the next request.

The same key, hashed with a fingerprint of the app's code, templates and styles (`BUILD`), is
the page's ETag: a browser that sends it back in `If-None-Match` gets 304 Not Modified without
the page being rendered, and never after the server was upgraded.

Only pages rendered for a signed-in analyst are cached. Share-link pages are always rendered
afresh (they show the time they were printed), so a share-link holder can never be handed a
page made for an analyst, nor the reverse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable
from pathlib import Path

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from app.lru import LruCache
from app.models import CamImage, LabelHistory, Run
from app.security import csrf_token
from app.viewer import Viewer


def _build_fingerprint() -> str:
    """Everything that shapes a page besides the data: the app's code, templates and styles. In
    the ETag, so a server upgraded to another version never answers 304 for a page the browser
    kept from the old one (old markup beside the new scripts)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in (root / "app", root / "templates", root / "static"):
        for path in sorted(folder.rglob("*")):
            if path.suffix in (".py", ".html", ".css", ".js") and path.is_file():
                digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


BUILD = _build_fingerprint()

PAGE_CACHE_BYTES = 64 * 2**20
"""Per server process: about 700 concept-browser pages of a three-model run."""


_DATA_VERSION = select(Run.status, Run.active_generation_id, Run.mined_at,
                       select(func.max(LabelHistory.id)).scalar_subquery(),
                       select(func.max(CamImage.created_at)).scalar_subquery()).where(Run.id == bindparam("run"))
"""Built once, and run on the session's connection (Core, not ORM, execution): read on every
analyst page, where building it and the ORM layer cost twice what the query does (~60 us vs ~190)."""


def data_version(session: Session, run_id: int) -> tuple[Hashable, ...] | None:
    """What the run's pages show changes only when this does; None when there is no such run."""
    row = session.connection().execute(_DATA_VERSION, {"run": run_id}).one_or_none()
    return None if row is None else tuple(row)


class PageCache:
    def __init__(self, max_bytes: int = PAGE_CACHE_BYTES):
        self._pages: LruCache[bytes] = LruCache(max_bytes, weigh=len)

    def respond(self, request: Request, session: Session, viewer: Viewer, run_id: int,
                render_page: Callable[[], Response]) -> Response:
        """The page `render_page` makes for this request: from the cache, as 304 Not Modified,
        or rendered now (and kept when it is a 200 for an analyst)."""
        if viewer.user is None:
            return render_page()
        version = data_version(session, run_id)
        if version is None:
            return render_page()  # the route answers 404
        key = (request.url.path, request.url.query, viewer.user.id, csrf_token(request), version)
        etag = '"' + hashlib.sha256(repr((BUILD, key)).encode()).hexdigest()[:32] + '"'
        # private: only this analyst's browser may keep it; no-cache: ask again every time.
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        body = self._pages.get(key)
        if body is None:
            response = render_page()
            if response.status_code != 200:
                return response
            body = bytes(response.body)
            self._pages.put(key, body)
        return HTMLResponse(body, headers=headers)
