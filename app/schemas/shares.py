"""Audit links."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, Field

from app.params import BodyInt


class ShareCreate(BaseModel):
    run_id: BodyInt
    scope: Literal["run", "concepts"] = "run"
    concept_indices: list[BodyInt] = Field(default_factory=list, description="Needed when scope is 'concepts'")
    note: str = Field("", max_length=500)
    expires_at: dt.datetime | None = Field(
        None, description="Timezone-aware, at most 365 days ahead; omitted means 30 days from now")


class ShareInfo(BaseModel):
    id: int
    run_id: int
    run_name: str
    scope: Literal["run", "concepts"]
    concept_indices: list[int]
    note: str
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    status: Literal["active", "expired", "revoked"]


class ShareCreated(ShareInfo):
    token: str = Field(description="Shown once; only its hash is stored")
    url: str = Field(description="Path of the shared view (prefix it with the server's address)")


class SharedScope(BaseModel):
    """What a share-link holder is looking at."""

    run_id: int
    scope: Literal["run", "concepts"]
    concept_indices: list[int]
    note: str
    created_by: str
    expires_at: dt.datetime | None
