"""Label edits."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.params import BodyInt

MAX_LABEL = 200
MAX_DESCRIPTION = 5000
MAX_TAG = 64
MAX_TAGS = 20


class LabelEdit(BaseModel):
    label: str = Field("", max_length=MAX_LABEL)
    description: str = Field("", max_length=MAX_DESCRIPTION)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)
    version: BodyInt = Field(description="The concept version the edit was made on")


class LabelState(BaseModel):
    index: int
    label: str
    description: str
    tags: list[str]
    version: int


class LabelConflictBody(BaseModel):
    detail: str
    current: LabelState
