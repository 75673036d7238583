"""The main job, stage by stage: demo images -> activations -> USAE -> mined concepts in the DB.

`usae demo` runs it on the embedded default. Every stage writes its output atomically and is
skipped when that output is already complete, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy import select

from app.paths import demo_images_dir
from app.settings import Settings

log = logging.getLogger(__name__)

DEMO_USER = "analyst"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo flavour. `small` must finish in about two minutes on 2 CPU cores of an
    otherwise idle machine."""

    name: str
    small: bool
    concepts: int
    k: int
    steps: int
    batch_size: int
    lr: float
    top_n: int


FULL = DemoPlan(name="demo", small=False, concepts=448, k=16, steps=1000, batch_size=2048, lr=4e-3, top_n=12)
SMALL = DemoPlan(name="demo-small", small=True, concepts=256, k=12, steps=600, batch_size=1024, lr=5e-3, top_n=8)


@dataclass
class StageReport:
    name: str
    seconds: float
    summary: str
    reused: bool


@dataclass
class DemoResult:
    run_dir: Path
    store_dir: Path
    run_id: int
    username: str
    password: str | None
    stages: list[StageReport] = field(default_factory=list)


Echo = Callable[[str], None]


class DemoInterrupted(KeyboardInterrupt):
    """Ctrl+C during a stage of the demo; the message names the stage and how to continue (the
    library's own, about `usae train --resume` or `usae extract`, do not apply to `usae demo`)."""

    def __init__(self, stage: str):
        then = ", and the training continues from its newest checkpoint" if stage.endswith(" train") else ""
        super().__init__(f"usae demo interrupted in [{stage}]; run the same command again to continue: the stages "
                         f"it finished are reused{then}")
        self.stage = stage


def _timed(stages: list[StageReport], echo: Echo, name: str, fn: Callable[[], tuple[str, bool]]) -> None:
    start = time.perf_counter()
    try:
        summary, reused = fn()
    except KeyboardInterrupt as exc:
        raise DemoInterrupted(name) from exc
    report = StageReport(name, time.perf_counter() - start, summary, reused)
    stages.append(report)
    echo(f"[{name}] {'reused: ' if reused else ''}{summary} ({report.seconds:.0f} s)")


def build_images(settings: Settings, plan: DemoPlan, seed: int) -> tuple[Path, str, bool]:
    from usae_core.demo_images import build_demo_set, demo_set_is_current
    from usae_core.images import FolderSource

    root = demo_images_dir(settings, plan.small, seed)
    # A set from an older generator is rebuilt, and every later stage with it.
    reused = demo_set_is_current(root, seed, plan.small)
    if not reused:
        build_demo_set(root, seed=seed, small=plan.small, overwrite=True)
    n = len(FolderSource(root, check=False).ids)  # generated here; extraction decodes every image anyway
    return root, f"{n:,} images with defect masks in {root}", reused


def extract(settings: Settings, plan: DemoPlan, images: Path, device: str, rebuild: bool):
    from usae_core.backbones.registry import default_backbones
    from usae_core.errors import UsaeError
    from usae_core.extract import extract_store
    from usae_core.store import ActivationStore

    out = settings.stores_dir / plan.name
    store = None
    if not rebuild:
        try:
            store = ActivationStore.open(out)
        except UsaeError:
            pass  # missing or unfinished: extract (resuming an unfinished store)
        if store is not None and Path(store.meta.get("image_root", images)).resolve() != Path(images).resolve():
            store, rebuild = None, True  # extracted from another seed's set (each has a folder of its own)
    reused = store is not None
    if store is None:
        store = extract_store(images, default_backbones(), out, device=device, overwrite=rebuild)
    models = ", ".join(f"{n} ({d})" for n, d in store.dims.items())
    grid = "x".join(map(str, store.grid))
    return store, f"{store.n_images:,} images x {grid} tokens from {models}", reused


def train(settings: Settings, plan: DemoPlan, store, device: str, seed: int, rebuild: bool):
    from usae_core.atomic import atomic_write_json
    from usae_core.config import TrainConfig, USAEConfig
    from usae_core.model import USAE
    from usae_core.train import train_usae

    run_dir = settings.runs_dir / plan.name
    config_path = run_dir / "config.json"
    ucfg = USAEConfig(model_dims=store.dims, n_concepts=plan.concepts, k=plan.k)
    saved = json.loads(config_path.read_text()) if config_path.exists() else {}
    same_plan = saved.get("usae", {}).get("n_concepts") == plan.concepts and saved["usae"].get("k") == plan.k
    summary = f"{plan.concepts:,} concepts, k={plan.k}, {plan.steps:,} steps"
    if not rebuild and same_plan and saved.get("step") == plan.steps:
        return USAE.from_pretrained(run_dir), run_dir, summary, True
    tcfg = TrainConfig(steps=plan.steps, batch_size=plan.batch_size, lr=plan.lr, seed=seed, device=device,
                       checkpoint_every=max(plan.steps // 4, 1),
                       dead_after_tokens=20 * plan.batch_size)
    # A training cut short is continued only if it was started on this very store with this plan:
    # the record names both, and is written before training starts and removed when it ends.
    record = _training_record(settings, plan)
    started = {"store": _store_fingerprint(store), "usae": ucfg.to_dict(), "train": tcfg.to_dict()}
    started = json.loads(json.dumps(started))  # as read back from the file: tuples become lists
    resume = _read_record(record) == started and _checkpointed_since(record, run_dir)
    if not resume:
        atomic_write_json(record, started)
    model = train_usae(store, run_dir, ucfg, tcfg, resume=resume, overwrite=not resume)
    record.unlink(missing_ok=True)
    return model, run_dir, summary + (" (continued an interrupted training)" if resume else ""), False


def _training_record(settings: Settings, plan: DemoPlan) -> Path:
    return settings.data_dir / f".demo-{plan.name}-training.json"


def _checkpointed_since(record: Path, run_dir: Path) -> bool:
    """Whether the unfinished run a resume would continue (an interrupted overwrite's new run,
    else an unfinished first run) has a checkpoint written after `record`: checkpoints older than
    the record belong to an earlier training, e.g. one on another store, left behind when the
    demo stopped between writing the record and starting the new run."""
    from usae_core.atomic import replacement_folders

    new = replacement_folders(run_dir)[0]
    build = new if new.is_dir() else run_dir
    if build == run_dir and (run_dir / "config.json").exists():
        return False  # a finished run: nothing to continue
    since = record.stat().st_mtime_ns
    return any(c.stat().st_mtime_ns >= since for c in (build / "checkpoints").glob("step-*"))


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or edited by hand into something else: train afresh
        return None


def _store_fingerprint(store) -> str:
    """What the store holds, not where: a store extracted again replaces the same folder."""
    digest = hashlib.sha256()
    for name in ("manifest.json", "image_ids.json"):
        digest.update((Path(store.root) / name).read_bytes())
    return digest.hexdigest()


def mine(settings: Settings, plan: DemoPlan, run_dir: Path, store, model, device: str,
         rebuild: bool) -> tuple[int, str, bool]:
    from app.db import session_factory
    from app.models import Run
    from app.services.mining import mine_run
    from usae_core.mining import MiningConfig

    Session = session_factory(settings.db_url)
    with Session() as s:
        run = s.scalars(select(Run).where(Run.run_dir == str(run_dir.resolve()))).first()
        # An interrupted re-mine leaves the run "mined" on its previous mine, noted in `error`:
        # only a mine that finished last is current.
        if run is not None and run.status == "mined" and run.error is None and not rebuild:
            return run.id, _mined_summary(run.metrics), True
    outcome = mine_run(settings.db_url, settings.media_dir, run_dir, store, model,
                       cfg=MiningConfig(top_n=plan.top_n), device=device, progress=True)
    with Session() as s:
        run = s.get(Run, outcome.run_id)
        return run.id, _mined_summary(run.metrics), False


def _mined_summary(metrics: dict) -> str:
    def r2(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.2f}"

    live = metrics.get("live_concepts")
    return f"R² self {r2('r2_self')} / cross {r2('r2_cross')}, {live:,} live concepts" if live is not None else "mined"


def ensure_analyst(settings: Settings) -> tuple[str, str | None]:
    """Create the demo analyst once; its password is kept in the data dir (mode 0600 from its
    first byte) so reruns can print it again, while it still signs in (None once
    `usae user set-password` changed it)."""
    from app.db import session_factory
    from app.security import verify_password
    from app.services.users import create_user, find_user
    from usae_core.atomic import atomic_write_bytes

    secret = settings.data_dir / "demo-credentials.txt"
    with session_factory(settings.db_url)() as s:
        user = find_user(s, username=DEMO_USER)
        if user is not None:
            kept = secret.read_text().strip() if secret.exists() else None
            return DEMO_USER, kept if kept and verify_password(user.password_hash, kept) else None
        password = secrets.token_urlsafe(12)
        create_user(s, username=DEMO_USER, password=password)
        s.commit()
    atomic_write_bytes(secret, password.encode(), mode=0o600)
    return DEMO_USER, password


_STAGES = ("extract", "train", "mine")


def _stale_marker(settings: Settings, plan: DemoPlan) -> Path:
    return settings.data_dir / f".demo-{plan.name}-stale"


def run_demo(settings: Settings, *, small: bool = False, device: str = "auto", seed: int = 0,
             echo: Echo = print) -> DemoResult:
    from app.migrations import upgrade_database
    from usae_core.atomic import atomic_write_bytes
    from usae_core.devices import resolve_device

    plan = SMALL if small else FULL
    device = str(resolve_device(device))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.db_url)
    stages: list[StageReport] = []

    # A stage that ran again invalidates every stage after it, also across runs: its old outputs
    # stay complete on disk until replaced, so a rebuild cut short would leave them looking
    # current. The marker names the first stage still to redo until the last one finishes.
    stale = _stale_marker(settings, plan)
    marked = stale.read_text().strip() if stale.exists() else None
    redo_from = len(_STAGES) if marked is None else _STAGES.index(marked) if marked in _STAGES else 0
    box: dict = {"rebuild": False}

    def rebuild(stage: str) -> bool:
        return box["rebuild"] or _STAGES.index(stage) >= redo_from

    def ran_again(next_stage: str) -> None:
        """A stage was built again: it is current, every stage from `next_stage` on is stale."""
        box["rebuild"] = True
        atomic_write_bytes(stale, next_stage.encode())

    def images_stage():
        box["images"], summary, reused = build_images(settings, plan, seed)
        if not reused:
            ran_again("extract")
        return summary, reused

    def extract_stage():
        box["store"], summary, reused = extract(settings, plan, box["images"], device, rebuild("extract"))
        if not reused:
            ran_again("train")
        return summary, reused

    def train_stage():
        box["model"], box["run_dir"], summary, reused = train(settings, plan, box["store"], device, seed,
                                                              rebuild("train"))
        if not reused:
            ran_again("mine")
        return summary, reused

    def mine_stage():
        box["run_id"], summary, reused = mine(settings, plan, box["run_dir"], box["store"], box["model"], device,
                                              rebuild("mine"))
        stale.unlink(missing_ok=True)  # every stage is current again
        return summary, reused

    _timed(stages, echo, "1/4 images", images_stage)
    _timed(stages, echo, "2/4 extract", extract_stage)
    _timed(stages, echo, "3/4 train", train_stage)
    _timed(stages, echo, "4/4 mine", mine_stage)
    username, password = ensure_analyst(settings)
    return DemoResult(box["run_dir"], Path(box["store"].root), box["run_id"], username, password, stages)
