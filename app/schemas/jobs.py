"""Background jobs as the API shows them."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str = Field(description="What the job does: `cam` makes CAM images for one concept")
    status: str = Field(description="queued | running | done | failed | cancelled")
    progress: float = Field(description="Fraction done, 0..1")
    message: str = Field(description="The latest progress line, or the outcome")
    error: str | None = None
    params: dict[str, Any]
    result: dict[str, Any] | None = None
    run_id: int | None
    concept_index: int | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
