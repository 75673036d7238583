"""Runs and the run overview."""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, Field

from app.schemas.images import Thumb


class ModelInfo(BaseModel):
    name: str
    family: str
    dim: int
    grid: tuple[int, int]


class RunSummary(BaseModel):
    id: int
    name: str
    image_set: str
    status: str = Field(description="registered | mining | mined | failed | interrupted (the mining process died)")
    created_at: dt.datetime
    mined_at: dt.datetime | None
    n_images: int
    n_concepts: int
    models: list[ModelInfo]

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


class ConceptRef(BaseModel):
    """Enough to name and link a concept."""

    index: int
    label: str


class DefectInModel(BaseModel):
    """A model's concept that best covers one defect type's masks."""

    model: str
    concept: ConceptRef
    iou: float
    image: Thumb | None = Field(None, description="The concept's strongest image in `model`")


class DefectBest(BaseModel):
    defect_type: str
    concept: ConceptRef
    model: str
    iou: float
    image: Thumb | None = Field(None, description="The concept's strongest image in `model`")
    by_model: list[DefectInModel] = Field(default_factory=list, description="Each model's own best concept for this "
                                          "defect type, in the run's model order (a model none overlaps is left out)")


class HistogramData(BaseModel):
    edges: list[float]
    counts: list[int]


class TrainingCurve(BaseModel):
    step: list[int]
    loss: list[float | None] = Field(description="Training loss at each logged step")
    r2: dict[str, list[float | None]] = Field(
        description="Per target model, the batch R² of that step's reconstruction (from that step's source model)")


class ScatterConcept(BaseModel):
    index: int
    label: str
    energy: float
    cofire: float
    firing_entropy: float


class LabelledConcept(BaseModel):
    index: int
    label: str
    tags: list[str]
    frequency: dict[str, float] = Field(description="Model name -> share of its tokens the concept fires on")
    images: dict[str, Thumb] = Field(default_factory=dict,
                                     description="Model name -> the concept's strongest image in it (if it has one)")


class RunOverview(BaseModel):
    run: RunSummary
    r2: list[list[float | None]] = Field(description="[source][target] R² from the last mine")
    r2_self: float | None
    r2_cross: float | None
    universal_threshold: float
    n_universal: int
    n_model_specific: int
    n_dead: int
    entropy_histogram: HistogramData = Field(description="Firing entropy of the live concepts")
    cofire_energy: list[ScatterConcept] = Field(description="Live concepts with the most energy")
    cofire_energy_total: int = Field(description="Live concepts in the run (the scatter may show fewer)")
    best_per_defect: list[DefectBest]
    labelled: list[LabelledConcept] = Field(
        description="Labelled live concepts with the most energy, with each model's firing: what each model relies on")
    labelled_total: int = Field(description="Labelled live concepts in the run (the list may show fewer)")
    max_frequency: float | None = Field(
        None, description="The run's most frequent model-concept pair: the firing bars' one scale, as in the browser")
    training: TrainingCurve | None = Field(None, description="The training log, thinned (None: none was found when mined)")
