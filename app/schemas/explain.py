"""Explaining an uploaded image."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ExplainedConcept(BaseModel):
    index: int
    label: str
    max_activation: float
    heatmap_data_url: str = Field(description="data: URL of the heatmap over the uploaded image")


class ExplainedModel(BaseModel):
    model: str
    concepts: list[ExplainedConcept]
    error: str | None = Field(None, description="Why this model could not be explained (e.g. no backbone)")


class Explanation(BaseModel):
    run_id: int
    image_data_url: str = Field(description="data: URL of the square view the models saw")
    framing: str = Field(description="'centre': the image's centre square; 'whole': the whole image padded to a square")
    framing_note: str | None = Field(None, description="What part of a non-square image the models saw")
    models: list[ExplainedModel]
