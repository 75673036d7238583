"""The concept browser and the concept page."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from app.schemas.images import Thumb
from app.schemas.labels import MAX_TAG
from app.schemas.runs import RunSummary

MAX_PAGE = 10**9
"""Far beyond any run; a larger page would overflow the database's OFFSET."""
MAX_SEARCH = 500
"""Search text (a few words of a label or description) and model names are shorter; longer
is refused rather than searched."""

CARDS_PER_PAGE = 60
"""The browser's default page size. Its card grid has 1 to 6 columns (cards at least 250 px
wide, the page at most 1680 px), and 60 fills the last row at every one of them; 36 left a
lone card on the last row of the five columns a 1366 px laptop shows."""

SortKey = Literal["energy", "entropy", "cofire", "frequency", "index"]
SortOrder = Literal["asc", "desc"]
USUAL_ORDER: dict[str, SortOrder] = {"energy": "desc", "entropy": "desc", "cofire": "desc", "frequency": "desc",
                                     "index": "asc"}
"""Each sort's direction when the URL names none: a statistic highest first, concept numbers lowest first."""
LabelFilter = Literal["any", "labelled", "unlabelled"]


class ConceptFilters(BaseModel):
    """Everything the browser's URL carries, so a view can be bookmarked and shared."""

    q: str = Field("", max_length=MAX_SEARCH, description="Search in labels and descriptions")
    sort: SortKey = "energy"
    order: SortOrder | None = Field(None, description="asc (lowest first) or desc (highest first); left out (null), "
                                                      "the sort's usual direction: highest first, by index lowest first")
    min_entropy: float | None = Field(None, ge=0, le=1, description="Universal: firing entropy at least this")
    max_entropy: float | None = Field(None, ge=0, le=1, description="Model-specific: firing entropy below this")
    mostly: str | None = Field(None, max_length=MAX_SEARCH,
                               description="Model name: model-specific concepts (firing entropy under the "
                                           "universal threshold) with at least a fair share (1/models) of "
                                           "their firings in it, as their 'mostly' badge names it")
    labelled: LabelFilter = "any"
    tag: str | None = Field(None, max_length=MAX_TAG)
    show_dead: Literal["only"] | bool = Field(False, description="Dead concepts: hidden (false), shown with the "
                                                                 "live ones (true), or shown alone ('only')")
    page: int = Field(1, ge=1, le=MAX_PAGE)
    per_page: int = Field(CARDS_PER_PAGE, ge=1, le=200)

    usual_orders: ClassVar[dict[str, SortOrder]] = USUAL_ORDER  # for the browser's form

    @model_validator(mode="after")
    def _usual_order_unnamed(self) -> ConceptFilters:
        """The sort's usual direction is the list without one: one URL and one cached list."""
        if self.order == USUAL_ORDER[self.sort]:
            self.order = None
        return self

    @property
    def direction(self) -> SortOrder:
        """The list's direction: the one named, else the sort's usual one."""
        return self.order or USUAL_ORDER[self.sort]

    def narrows(self) -> bool:
        """Whether some concepts are left out (by search or filters; not by order or paging)."""
        defaults = ConceptFilters()
        return bool(self.query(page=defaults.page, sort=defaults.sort, order=None, per_page=defaults.per_page,
                               show_dead="only" if self.show_dead == "only" else False))

    def view_query(self) -> dict[str, object]:
        """This view as a concept page's query: its filters and sort (the sort even when it is the
        default, so the page knows it was opened from a list), without the page number."""
        return {"sort": self.sort, **{k: v for k, v in self.query().items() if k not in ("sort", "page")}}

    def query(self, **changes: object) -> dict[str, object]:
        """The non-default filters as URL query parameters (with `changes` applied)."""
        merged = self.model_copy(update=changes)
        if merged.order == USUAL_ORDER[merged.sort]:  # `changes` may switch the sort to one it is usual for
            merged.order = None
        defaults = ConceptFilters()
        return {
            key: ("1" if value is True else value)
            for key, value in merged.model_dump().items()
            if value != getattr(defaults, key) and value not in (None, "")
        }


class ModelFiring(BaseModel):
    model: str
    fire_count: int
    frequency: float
    share: float = Field(description="This model's part of the concept's firings")
    cofire: float
    max_activation: float


class MinedCard(BaseModel):
    """The part of a concept's card that only a mine changes, stored as JSON in
    `concept_cards` (one row per concept and mining generation): firing per model in the
    run's model order, and the card's top thumbnails by model order, then rank."""

    firing: list[ModelFiring]
    thumbs: list[Thumb]


class ConceptCard(BaseModel):
    index: int
    label: str
    tags: list[str]
    energy: float
    firing_entropy: float
    cofire: float
    frequency: float
    dead: bool
    universal: bool
    mostly_in: list[str] = Field(description="A live model-specific concept's models with at least their fair "
                                             "share (1/models) of its firings, largest first; empty otherwise")
    firing: list[ModelFiring]
    thumbs: list[Thumb]

    def frequencies(self) -> dict[str, float]:
        return {f.model: f.frequency for f in self.firing}


class ConceptPage(BaseModel):
    """One page of the concept browser."""

    run: RunSummary
    filters: ConceptFilters
    total: int
    pages: int
    concepts: list[ConceptCard]
    tags: list[str] = Field(description="Tags in use in this run, for the tag filter")


@dataclass(frozen=True, slots=True)
class BrowserCard:
    """A card as the browser *page* shows it: its mined part as stored markup
    (app/services/card_html.py) instead of the firing and thumbnail lists of `ConceptCard`.
    A plain object: building a page of 36 pydantic cards, and parsing their JSON, cost about 0.9 ms of a
    5 ms page (docs/benchmarks.md, 2026-12-03)."""

    concept: Any
    """The concept's card columns (index, label, energy, firing_entropy, cofire, frequency,
    dead): the database row as read, not copied into fields."""
    tags: list[str]
    universal: bool
    mostly_in: list[str]
    thumbs_html: str
    firing_html: str
    max_frequency: float


@dataclass(frozen=True, slots=True)
class BrowserPage:
    """One page of the concept browser as the page shows it (`ConceptPage` is the API's)."""

    run: RunSummary
    filters: ConceptFilters
    total: int
    pages: int
    concepts: list[BrowserCard]
    tags: list[str]
    hidden_dead: int = 0
    """With no concept shown: how many dead concepts these filters would match if shown."""
    run_max_frequency: float | None = None
    """The run's most frequent model-concept pair (`concepts.run_max_frequency`; None before any
    mine, and for audit links to some concepts, which see only theirs)."""

    @property
    def max_frequency(self) -> float:
        """Scale of the firing bars: the run's most frequent model-concept pair, so a bar means
        the same on every page; else the page's."""
        page = max((c.max_frequency for c in self.concepts), default=0.0)
        return max(self.run_max_frequency or 0.0, page)


class HistoryEntry(BaseModel):
    username: str
    changed_at: dt.datetime
    version: int
    old_label: str
    new_label: str
    old_description: str
    new_description: str
    old_tags: list[str]
    new_tags: list[str]


class Neighbour(BaseModel):
    index: int
    label: str
    cosine: float


class ModelColumn(BaseModel):
    """Everything the concept page shows for one model."""

    model: str
    family: str
    firing: ModelFiring
    top_images: list[Thumb]
    histogram_edges: list[float]
    histogram_counts: list[int]
    cam_image: str | None = Field(description="Path under /media, once a CAM image was made")
    cam_activation: float | None = Field(
        None, description="The concept's mean response before TopK over its CAM image's tokens (what CAM climbs)")
    cam_peak: float | None = Field(
        None, description="The concept's code after TopK at the CAM image's strongest token, as the top images' "
                          "activations are measured (None for images made before it was recorded)")
    neighbours: list[Neighbour]


class DefectIoU(BaseModel):
    defect_type: str
    model: str
    iou: float


class ConceptDetail(BaseModel):
    run: RunSummary
    card: ConceptCard
    description: str
    version: int = Field(description="Send it back with a label edit to detect concurrent edits")
    updated_at: dt.datetime | None
    columns: list[ModelColumn]
    history: list[HistoryEntry]
    defect_iou: list[DefectIoU]
    prev_index: int | None = Field(description="The concept before this one: in the list it was opened from "
                                                "(the page's view), else by number")
    next_index: int | None
    view_position: int | None = Field(None, description="1-based place in the list it was opened from, if any")
    view_total: int | None = Field(None, description="Concepts in that list")
