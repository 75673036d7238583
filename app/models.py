"""The app database schema (SQLAlchemy 2.0 typed models). Alembic migrations in
app/migrations/versions create it; change it only through a new revision.

How mined data is laid out (docs/formats.md, "Database"):

- `concepts` and `concept_model_stats` always hold the *active* mined statistics of a run,
  next to the human labels, so the concept browser sorts and filters on one table.
- Bulky per-concept detail (top images, heatmaps, histograms, neighbours, defect IoU, the
  browser's precomputed cards) belongs to a `MiningGeneration`. A mine writes a new
  generation in many small transactions, then flips `Run.active_generation_id` (and the
  concept statistics) in one final transaction, so a crash at any point leaves the previous
  generation untouched.
  **Readers filter generation-scoped tables on `generation_id == run.active_generation_id`.**
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite would drop the zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC datetimes")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


# --------------------------------------------------------------------------- accounts


class User(Base):
    """An analyst account. Passwords are stored only as a hash (argon2 via the web app)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    session_epoch: Mapped[int] = mapped_column(default=0, server_default="0")
    """Sessions carry the epoch they began in; signing out moves it on, ending them all."""


class SignInAttempt(Base):
    """One sign-in attempt still inside the throttle's window (`app.services.sign_in_throttle`),
    kept in the database so that every server process counts the same attempts."""

    __tablename__ = "sign_in_attempts"
    __table_args__ = (Index("ix_sign_in_attempts_key_at", "key_hash", "at"), Index("ix_sign_in_attempts_at", "at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    """SHA-256 of (client address, user name), or of the address alone (its limit over all
    names): any name costs 64 characters, and none is stored."""
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- runs


class Run(Base):
    """A trained USAE (a run directory) registered with the store it was mined on."""

    __tablename__ = "runs"
    # Never reuse the id of a deleted run (SQLite would): it names media folders.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    run_dir: Mapped[str] = mapped_column(Text)
    """Absolute path of the run directory (config.json + usae.safetensors)."""
    store_dir: Mapped[str] = mapped_column(Text)
    """Absolute path of the activation store."""
    image_set: Mapped[str] = mapped_column(String(200), default="")
    """Human name of the image collection (the store's image folder or name)."""
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    n_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    n_concepts: Mapped[int] = mapped_column(Integer)
    k: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The run's config.json (USAE shape, training settings)."""
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Evaluation summary from the last mine: r2 [source][target], r2_self, r2_cross, l0, tau,
    dead_fraction, n_tokens, top_n, max_frequency (the firing bars' scale) and the thinned
    training log (see docs/formats.md)."""
    status: Mapped[str] = mapped_column(String(20), default="registered")
    """registered | mining | mined | failed."""
    error: Mapped[str | None] = mapped_column(Text)
    """Why the last mine did not finish (its error, or that a re-mine was interrupted, which
    leaves `status` as it was); None after a mine that finished."""
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    mined_at: Mapped[dt.datetime | None]
    active_generation_id: Mapped[int | None] = mapped_column(
        ForeignKey("mining_generations.id", use_alter=True, ondelete="SET NULL")
    )

    models: Mapped[list[RunModel]] = relationship(
        back_populates="run", order_by="RunModel.position", cascade="all, delete-orphan", passive_deletes=True
    )


class RunModel(Base):
    """One vision model of a run, in the run's model order (`position`)."""

    __tablename__ = "run_models"
    __table_args__ = (UniqueConstraint("run_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(100))
    family: Mapped[str] = mapped_column(String(100), default="")
    """Architecture family (e.g. "dinov2", "siglip", "vit"), from the store's model info."""
    dim: Mapped[int] = mapped_column(Integer)
    grid_h: Mapped[int] = mapped_column(Integer)
    grid_w: Mapped[int] = mapped_column(Integer)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The store's model info (checkpoint, layer, ...)."""

    run: Mapped[Run] = relationship(back_populates="models")


class MiningGeneration(Base):
    """One mine of a run. Only the run's active generation is shown; others are being built
    (`building`) or waiting to be deleted (`retired`)."""

    __tablename__ = "mining_generations"
    # Never reuse the id of a deleted generation (SQLite would): it names a media folder.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(20), default="building")
    """building | active | retired."""
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Mining settings: top_n, tau, histogram bins, neighbours, defect types."""
    media_prefix: Mapped[str] = mapped_column(Text)
    """Folder of this generation's rendered files, relative to the media directory."""
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]


class Image(Base):
    """An image of the store that appears in some concept's top list of a generation."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("generation_id", "store_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("mining_generations.id", ondelete="CASCADE"))
    store_index: Mapped[int] = mapped_column(Integer)
    """Row of the image in the activation store."""
    image_key: Mapped[str] = mapped_column(Text)
    """The store's image id (a path relative to the image folder for extracted stores)."""
    thumbnail_path: Mapped[str | None] = mapped_column(Text)
    """Square thumbnail, relative to the media directory."""
    view_path: Mapped[str | None] = mapped_column(Text)
    """The same square at up to VIEW_SIZE pixels, for the enlarged view; None where the source
    image is no larger than the thumbnail (the thumbnail then is the enlarged view)."""


# --------------------------------------------------------------------------- concepts


class Concept(Base):
    """One dictionary entry of a run: active mined statistics plus the human label.

    `version` increases with every label edit; the ORM checks it on UPDATE (optimistic
    concurrency), so a stale writer gets `sqlalchemy.orm.exc.StaleDataError`.
    """

    __tablename__ = "concepts"
    __table_args__ = (
        UniqueConstraint("run_id", "index"),
        Index("ix_concepts_run_energy", "run_id", "energy"),
        Index("ix_concepts_run_entropy", "run_id", "firing_entropy"),
        # The concept browser's sort orders over a run's live concepts (migration 0003).
        *(Index(f"ix_concepts_browse_{name}", "run_id", "dead", text(f"{column} DESC"), "index")
          for name, column in (("energy", "energy"), ("entropy", "firing_entropy"), ("cofire", "cofire"),
                               ("frequency", "frequency"))),
        Index("ix_concepts_browse_index", "run_id", "dead", "index"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    """Position in the USAE dictionary."""
    energy: Mapped[float] = mapped_column(Float, default=0.0)
    firing_entropy: Mapped[float] = mapped_column(Float, default=0.0)
    """0 = fires in one model only, 1 = fires equally in every model."""
    cofire: Mapped[float] = mapped_column(Float, default=0.0)
    """Co-fire proportion, mean over models."""
    fire_count: Mapped[int] = mapped_column(BigInteger, default=0)
    """Tokens on which it fires, summed over models."""
    frequency: Mapped[float] = mapped_column(Float, default=0.0)
    """fire_count / (tokens x models): the mean per-model firing frequency."""
    dead: Mapped[bool] = mapped_column(Boolean, default=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[dt.datetime | None]
    """Time of the last label edit."""

    run: Mapped[Run] = relationship()
    model_stats: Mapped[list[ConceptModelStats]] = relationship(
        back_populates="concept", cascade="all, delete-orphan", passive_deletes=True
    )
    tag_rows: Mapped[list[ConceptTag]] = relationship(
        back_populates="concept", cascade="all, delete-orphan", passive_deletes=True, order_by="ConceptTag.tag"
    )

    __mapper_args__ = {"version_id_col": version}

    @property
    def tags(self) -> list[str]:
        return [row.tag for row in self.tag_rows]

    def replace_tags(self, tags: list[str]) -> None:
        """Set the tag list, keeping rows for tags that stay (no unique-key clashes on flush)."""
        wanted = list(dict.fromkeys(tags))
        self.tag_rows = [row for row in self.tag_rows if row.tag in wanted]
        have = set(self.tags)
        self.tag_rows.extend(ConceptTag(tag=t) for t in wanted if t not in have)


class ConceptTag(Base):
    __tablename__ = "concept_tags"
    __table_args__ = (UniqueConstraint("concept_id", "tag"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"))
    tag: Mapped[str] = mapped_column(String(64), index=True)

    concept: Mapped[Concept] = relationship(back_populates="tag_rows")


class ConceptModelStats(Base):
    """Active per-model firing statistics of a concept (replaced when a mine completes)."""

    __tablename__ = "concept_model_stats"
    __table_args__ = (
        UniqueConstraint("concept_id", "run_model_id"),
        # "Mostly in model X" in the concept browser (migration 0003).
        Index("ix_concept_model_stats_mostly", "run_model_id", "share", "concept_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"))
    run_model_id: Mapped[int] = mapped_column(ForeignKey("run_models.id", ondelete="CASCADE"), index=True)
    fire_count: Mapped[int] = mapped_column(BigInteger, default=0)
    """Tokens of this model on which the concept's code exceeds tau."""
    frequency: Mapped[float] = mapped_column(Float, default=0.0)
    """fire_count / tokens."""
    share: Mapped[float] = mapped_column(Float, default=0.0)
    """This model's part of the concept's firings over all models (sums to 1 unless dead)."""
    cofire: Mapped[float] = mapped_column(Float, default=0.0)
    """Share of this model's firings on tokens where every model fires."""
    mean_activation: Mapped[float] = mapped_column(Float, default=0.0)
    """Mean code value over all tokens (the model's term of the energy)."""
    max_activation: Mapped[float] = mapped_column(Float, default=0.0)

    concept: Mapped[Concept] = relationship(back_populates="model_stats")
    run_model: Mapped[RunModel] = relationship()


class ConceptTopImage(Base):
    """Rank r (0 = strongest) of the images where a concept fires most in one model."""

    __tablename__ = "concept_top_images"
    __table_args__ = (
        UniqueConstraint("generation_id", "concept_id", "run_model_id", "rank"),
        Index("ix_concept_top_images_concept", "concept_id", "generation_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("mining_generations.id", ondelete="CASCADE"))
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"))
    run_model_id: Mapped[int] = mapped_column(ForeignKey("run_models.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    activation: Mapped[float] = mapped_column(Float)
    """The concept's largest code value over the image's tokens."""
    max_token: Mapped[int] = mapped_column(Integer)
    """Token (row-major grid cell) holding that value."""
    heatmap_path: Mapped[str] = mapped_column(Text)
    """Overlay PNG relative to the media directory."""

    image: Mapped[Image] = relationship()
    run_model: Mapped[RunModel] = relationship()


class ConceptCardData(Base):
    """What a concept's card in the browser shows of one mining generation, written with it:
    per-model firing statistics and the top thumbnails, as the JSON of
    `app.schemas.concepts.MinedCard`, and the same as the browser's markup, rendered by the
    mine (`app/services/card_html.py`, migration 0005). One row per card instead of several
    queries and their assembly; labels and tags are not in it (they change without a mine)."""

    __tablename__ = "concept_cards"

    generation_id: Mapped[int] = mapped_column(ForeignKey("mining_generations.id", ondelete="CASCADE"),
                                               primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), primary_key=True,
                                            index=True)
    payload: Mapped[str] = mapped_column(Text)
    thumbs_html: Mapped[str | None] = mapped_column(Text)
    firing_html: Mapped[str | None] = mapped_column(Text)
    html_format: Mapped[str | None] = mapped_column(String(32))
    """`card_html.FORMAT` of the template the HTML was rendered with; None before migration 0005."""
    max_frequency: Mapped[float | None] = mapped_column(Float)
    """The card's largest firing frequency (the bar scale of a link to some concepts, which sees
    only its own); None before migration 0006."""


class ConceptHistogram(Base):
    """Histogram of a concept's non-zero code values on one model's tokens."""

    __tablename__ = "concept_histograms"
    __table_args__ = (UniqueConstraint("generation_id", "concept_id", "run_model_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("mining_generations.id", ondelete="CASCADE"))
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), index=True)
    run_model_id: Mapped[int] = mapped_column(ForeignKey("run_models.id", ondelete="CASCADE"))
    bin_edges: Mapped[list[Any]] = mapped_column()
    """len(counts) + 1 increasing edges (geometric bins)."""
    counts: Mapped[list[Any]] = mapped_column()
    n_zero: Mapped[int] = mapped_column(BigInteger, default=0)
    """Tokens where the concept is not active at all (not in the histogram)."""


class ConceptNeighbour(Base):
    """The nearest other concepts by cosine similarity of one model's decoder rows."""

    __tablename__ = "concept_neighbours"
    __table_args__ = (UniqueConstraint("generation_id", "concept_id", "run_model_id", "rank"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("mining_generations.id", ondelete="CASCADE"))
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), index=True)
    run_model_id: Mapped[int] = mapped_column(ForeignKey("run_models.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    neighbour_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"))
    cosine: Mapped[float] = mapped_column(Float)

    neighbour: Mapped[Concept] = relationship(foreign_keys=[neighbour_id])
    run_model: Mapped[RunModel] = relationship()


class ConceptDefectIoU(Base):
    """Dataset-level IoU between where a concept fires (one model) and a defect type's masks."""

    __tablename__ = "concept_defect_iou"
    __table_args__ = (
        UniqueConstraint("generation_id", "concept_id", "run_model_id", "defect_type"),
        Index("ix_concept_defect_iou_best", "generation_id", "defect_type", "iou"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    generation_id: Mapped[int] = mapped_column(ForeignKey("mining_generations.id", ondelete="CASCADE"))
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), index=True)
    run_model_id: Mapped[int] = mapped_column(ForeignKey("run_models.id", ondelete="CASCADE"))
    defect_type: Mapped[str] = mapped_column(String(100))
    iou: Mapped[float] = mapped_column(Float)


class CamImage(Base):
    """A coordinated-activation-maximisation image of a concept for one model."""

    __tablename__ = "cam_images"
    __table_args__ = (UniqueConstraint("concept_id", "run_model_id"), Index("ix_cam_images_created_at", "created_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"))
    run_model_id: Mapped[int] = mapped_column(ForeignKey("run_models.id", ondelete="CASCADE"))
    file_path: Mapped[str] = mapped_column(Text)
    """PNG relative to the media directory."""
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- labels, sharing, jobs


class LabelHistory(Base):
    """One label edit: who, when, and the label, description and tags before and after."""

    __tablename__ = "label_history"
    # Never reuse the id of a deleted edit (SQLite would, after `usae runs delete`): the newest id
    # is part of every run's page-cache version (app/page_cache.py).
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    username: Mapped[str] = mapped_column(String(64))
    """Kept as written, so history still reads right if the account goes."""
    changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    version: Mapped[int] = mapped_column(Integer)
    """The concept's version after this edit."""
    old_label: Mapped[str] = mapped_column(String(200), default="")
    new_label: Mapped[str] = mapped_column(String(200), default="")
    old_description: Mapped[str] = mapped_column(Text, default="")
    new_description: Mapped[str] = mapped_column(Text, default="")
    old_tags: Mapped[list[Any]] = mapped_column(default=list)
    new_tags: Mapped[list[Any]] = mapped_column(default=list)

    user: Mapped[User | None] = relationship()


class ShareLink(Base):
    """A read-only audit link to a run, or to a chosen list of its concepts."""

    __tablename__ = "share_links"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    """SHA-256 hex of the token; the token itself is shown once and never stored."""
    scope: Mapped[str] = mapped_column(String(20))
    """run | concepts."""
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    concept_indices: Mapped[list[Any]] = mapped_column(default=list)
    """Concept indices the link shows when scope is `concepts`."""
    note: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]
    handoff: Mapped[str | None] = mapped_column(Text)
    """The token sealed (`app.services.shares.seal_token`, under a key derived from the app's
    secret) for the one page that shows a new link's address; NULL once that page took it."""
    handoff_until: Mapped[dt.datetime | None]
    """When `handoff` stops opening (a redirect followed later shows no address)."""

    run: Mapped[Run] = relationship()
    creator: Mapped[User | None] = relationship()


class Job(Base):
    """A background task (today only `cam`: one CAM image per model) with its progress and outcome."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),
                      Index("ix_jobs_run_concept", "run_id", "concept_index"))

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(20), default="queued")
    """queued | running | done | failed | cancelled."""
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    """Fraction done, 0..1."""
    message: Mapped[str] = mapped_column(Text, default="")
    """Latest human-readable progress line."""
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"), index=True)
    concept_index: Mapped[int | None]
    """The concept a job is about (CAM images), when it is about one."""
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    worker: Mapped[str | None] = mapped_column(String(300))
    """The worker process that claimed it: `host/boot/pid-namespace/pid` (see `worker_identity`)."""

    creator: Mapped[User | None] = relationship()
