"""Rendered files (thumbnails, heatmaps, CAM images) for analysts and, within scope, share holders.

Any path that is not a plain relative path to an image under the media directory is 404,
the same answer as for a missing file, so probing reveals nothing.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from app.deps import AnalystViewer, SessionDep, SettingsDep, ShareScope
from app.services.media import clean_relative_path, resolve_media_file, share_may_fetch

NOT_FOUND = "No such file."
ANALYST_CACHE = {"Cache-Control": "private, max-age=3600"}
SHARE_CACHE = {"Cache-Control": "private, no-cache"}
"""A share holder's browser asks again every time, so a revoked or expired link stops showing
images at once instead of when an hour's cache runs out."""


def _file_response(settings: SettingsDep, relative: str | None, headers: dict[str, str], *,
                   follow_links: bool = True) -> FileResponse:
    path = resolve_media_file(settings.media_dir, relative, follow_links=follow_links) if relative else None
    if path is None:
        raise HTTPException(404, NOT_FOUND)
    return FileResponse(path, headers=headers)


def router() -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/media/{path:path}")
    def analyst_media(path: str, settings: SettingsDep, viewer: AnalystViewer) -> FileResponse:
        return _file_response(settings, clean_relative_path(path), ANALYST_CACHE)

    @r.get("/s/{token}/media/{path:path}")
    def shared_media(path: str, settings: SettingsDep, session: SessionDep, viewer: ShareScope) -> FileResponse:
        relative = clean_relative_path(path)
        if relative is None or viewer.share is None or not share_may_fetch(session, grant=viewer.share,
                                                                             relative=relative):
            raise HTTPException(404, NOT_FOUND)
        return _file_response(settings, relative, SHARE_CACHE, follow_links=False)

    return r
