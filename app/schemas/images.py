"""A concept's top image as pages and the API show it (its own module: concept cards, the
overview and the comparison all carry them)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Thumb(BaseModel):
    """Rank `rank` (0 = strongest) of the images where a concept fires most in `model`."""

    model: str
    rank: int
    activation: float
    heatmap: str = Field(description="Path under /media")
    thumbnail: str | None
    view: str | None = Field(None, description="Path under /media of the same square at up to 512 px, where the "
                             "source image is larger than the thumbnail")
    image_key: str
