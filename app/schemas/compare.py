"""Comparing two models of a run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.images import Thumb
from app.schemas.runs import RunSummary


class PairConcept(BaseModel):
    index: int
    label: str
    frequency_a: float
    frequency_b: float
    energy: float
    group: Literal["shared", "only_a", "only_b", ""] = Field(
        "", description="shared (balanced firing), only_a / only_b (>= 90% of firing in one model), or neither")
    image_a: Thumb | None = Field(None, description="The concept's strongest image in model A (listed concepts only)")
    image_b: Thumb | None = Field(None, description="The concept's strongest image in model B (listed concepts only)")


class Comparison(BaseModel):
    run: RunSummary
    model_a: str
    model_b: str
    r2_a_to_b: float | None = Field(description="Encode from A, decode into B")
    r2_b_to_a: float | None = Field(description="Encode from B, decode into A")
    shared: list[PairConcept] = Field(description="Fire in both, balanced; most frequent first")
    unique_a: list[PairConcept] = Field(description="Fire (almost) only in A; most frequent first")
    unique_b: list[PairConcept]
    n_shared: int
    n_unique_a: int
    n_unique_b: int
    points: list[PairConcept] = Field(description="Concepts in the A-vs-B scatter (most frequent first)")
    points_total: int
    shown_in_full: str | None = Field(None, description="The list (shared, only_a, only_b) shown in full, up to 1,000")
