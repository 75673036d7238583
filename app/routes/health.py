"""`/healthz`: whether this server process can answer and reach its database (for container
health checks and load balancers; no sign-in, and it says nothing about the data)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from app.deps import SessionDep

log = logging.getLogger(__name__)


def router() -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/healthz")
    def healthz(session: SessionDep) -> JSONResponse:
        try:
            session.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            # The reason goes to the server log only: the endpoint is public.
            log.error("health check: database unreachable (%s)", exc.__class__.__name__)
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503,
                                headers={"Cache-Control": "no-store"})
        return JSONResponse({"status": "ok", "database": "ok"}, headers={"Cache-Control": "no-store"})

    return r
