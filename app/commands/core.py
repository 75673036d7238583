"""Core commands: import-activations, train, eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from app.paths import resolve_run, resolve_store
from app.settings import Settings, settings_for
from usae_core.config import TrainConfig, USAEConfig
from usae_core.errors import UsaeError

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", metavar="DIR", help="Data directory (default: $USAE_DATA_DIR or ./usae-data).")]


def import_activations_cmd(
    out: Annotated[str, typer.Option("--out", metavar="STORE", help="Store to create (a path, or a name under DATA_DIR/stores).")],
    model: Annotated[list[str], typer.Option("--model", metavar="NAME=FILE", help="A .npy array of shape (n_images, n_tokens, dim); repeat per model.")],
    grid: Annotated[Optional[str], typer.Option(metavar="HxW", help="Token grid (default: square when the token count is a square, else 1xN).")] = None,
    dtype: Annotated[str, typer.Option(help="On-disk dtype: float16, bfloat16 or float32.")] = "float16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Build a store from NumPy arrays extracted elsewhere (same image order for every model)."""
    from usae_core.store import import_activations

    arrays: dict[str, str] = {}
    for spec in model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsaeError(f"--model expects NAME=FILE.npy, got {spec!r}")
        if name in arrays:
            raise UsaeError(f"duplicate model name {name!r}")
        arrays[name] = path
    store = import_activations(
        resolve_store(out, settings_for(data_dir)), arrays, grid=parse_grid(grid) if grid else None,
        dtype=dtype, overwrite=overwrite,
    )
    typer.echo(f"wrote {store.root}: {store.n_images} images x {store.tokens_per_image} tokens, "
               f"models {', '.join(f'{n} ({d})' for n, d in store.dims.items())}")


def parse_grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsaeError(f"grid must look like 14x14, got {text!r}") from None
    return h, w


def train_cmd(
    store: Annotated[str, typer.Option("--store", help="Activation store (path or name).")],
    out: Annotated[str, typer.Option("--out", metavar="RUN", help="Run directory (path or name under DATA_DIR/runs).")],
    concepts: Annotated[Optional[int], typer.Option("--concepts", help=f"Dictionary size (default: {USAEConfig.n_concepts}).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help=f"Concepts per token (default: {USAEConfig.k}).")] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Optimizer steps (default: {TrainConfig.steps}).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Tokens per step (default: {TrainConfig.batch_size}).")] = None,
    lr: Annotated[Optional[float], typer.Option(help=f"Peak learning rate (default: {TrainConfig.lr:g}).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up to --lr (default: min(100, steps / 10)).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help=f"mlp_bn (paper) or linear (default: {USAEConfig.encoder}).")] = None,
    loss: Annotated[Optional[str], typer.Option(help=f"l1 (paper) or mse (default: {TrainConfig.loss}).")] = None,
    aux: Annotated[Optional[str], typer.Option(help=f"auxk, paper or none (default: {TrainConfig.aux}).")] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Seed of init, data order and sources (default: {TrainConfig.seed}).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    checkpoint_every: Annotated[Optional[int], typer.Option(help=f"Steps between checkpoints, 0: final only (default: {TrainConfig.checkpoint_every}).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out (once the new one is trained).")] = False,
    init_from: Annotated[Optional[str], typer.Option("--init-from", metavar="RUN", help="Start from this run's (or checkpoint's) weights, at step 0.")] = None,
    distributed: Annotated[bool, typer.Option(help="Data-parallel over torchrun ranks.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Train a USAE on a store.

    With --resume, options left out are the run's own (given, they must match it; only --device and --checkpoint-every may change); with --init-from, --concepts, --k and --encoder default to that run's (docs/formats.md, "USAE run directory")."""
    from usae_core.distributed import distributed_context
    from usae_core.store import ActivationStore
    from usae_core.train import TrainingInterrupted, resume_config, train_usae

    settings = settings_for(data_dir)
    st = ActivationStore.open(existing_store(store, settings))
    run_dir = resolve_run(out, settings)
    source = existing_run(init_from, settings) if init_from is not None else None
    # Options left out are the resumed run's, else (the shape) --init-from's, else the built-in
    # defaults: a user need not repeat them. Given, they are checked against the run or source.
    saved = resume_config(run_dir) if resume else None
    ucfg = _shape(st.dims, {"n_concepts": concepts, "k": k, "encoder": encoder}, saved, source)
    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps, "loss": loss,
             "aux": aux, "seed": seed, "checkpoint_every": checkpoint_every}
    tcfg = _train_settings({key: value for key, value in given.items() if value is not None}, device, saved)
    try:
        with distributed_context(distributed, device=tcfg.device) as ctx:
            tcfg.device = ctx.device
            train_usae(st, run_dir, ucfg, tcfg, resume=resume, overwrite=overwrite, init_from=source)
    except TrainingInterrupted as exc:  # Ctrl-C: one line on how to continue, no traceback
        typer.echo(str(exc), err=True)
        raise typer.Exit(130) from None
    finished = saved is not None and isinstance(saved.get("step"), int) and saved["step"] >= tcfg.steps
    typer.echo(f"{run_dir} had already finished its {tcfg.steps} steps: nothing to train (to train it further, "
               f"start a new run from its weights with --init-from {run_dir})" if finished else f"trained {run_dir}")


def _shape(dims: dict[str, int], given: dict, saved: dict | None, source: Path | None) -> USAEConfig:
    """The USAE shape to train: the options given, else the resumed run's, else --init-from's, else the defaults."""
    from usae_core.train import init_source_config

    base = saved["usae"] if saved is not None else init_source_config(source).to_dict() if source is not None else {}
    values = {key: value if value is not None else base.get(key, getattr(USAEConfig, key)) for key, value in given.items()}
    n, k = values["n_concepts"], values["k"]
    if given["k"] is None and isinstance(n, int) and isinstance(k, int) and 1 <= n < k:
        # k left out is more than the --concepts given: say where that k came from
        if saved is not None:
            raise UsaeError(f"the run that --resume continues has --k {k}, more than --concepts {n}: leave "
                            f"--concepts out to resume it with its own ({base.get('n_concepts')}), or start a new "
                            f"run (--overwrite or another --out) with --k {n} or less")
        if source is not None:
            raise UsaeError(f"--init-from {source} has --k {k}, more than --concepts {n}: leave --concepts out "
                            f"(a run started from its weights keeps its shape: --concepts {base.get('n_concepts')})")
        raise UsaeError(f"the default --k {k} is more than --concepts {n}: pass --k {n} or less")
    return USAEConfig(model_dims=dims, **values)


def _train_settings(given: dict, device: str, saved: dict | None) -> TrainConfig:
    """The TrainConfig to train with: the options given, else the resumed run's settings (those
    `usae train` has no option for too, e.g. `usae demo`'s), else the defaults. Where the run
    trains (device, autocast) is never the run's: a resume may move it."""
    if saved is None or not isinstance(saved.get("train"), dict):
        return TrainConfig(**given, device=device)
    kept = {key: value for key, value in saved["train"].items() if key not in ("device", "autocast")}
    return TrainConfig.from_dict({**kept, **given, "device": device})  # from_dict: a run of the old warm-up too


RunStore = Annotated[Optional[str], typer.Option(
    "--store", help="Activation store (path or name; default: the one the run was trained on).")]
"""--store of a command on a trained run: optional, the run's config.json names its store (`store_of_run`)."""


def eval_cmd(
    run: Annotated[str, typer.Argument(help="Run directory (path or name).")],
    store: RunStore = None,
    tau: Annotated[float, typer.Option(help="Firing threshold.")] = 0.1,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    per_concept: Annotated[bool, typer.Option(help="With --json, include per-concept arrays.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    data_dir: DataDir = None,
) -> None:
    """R² matrix, L0, dead fraction and per-concept firing statistics."""
    from usae_core.metrics import evaluate_usae
    from usae_core.model import USAE
    from usae_core.store import ActivationStore
    from usae_core.devices import resolve_device

    if per_concept and not as_json:
        raise UsaeError("--per-concept adds arrays to the JSON output: pass --json too")
    settings = settings_for(data_dir)
    run_dir = existing_run(run, settings)
    model = USAE.from_pretrained(run_dir)
    st = ActivationStore.open(store_of_run(store, run_dir, settings))
    res = evaluate_usae(model, st, tau=tau, device=resolve_device(device), progress=not as_json)
    if as_json:
        typer.echo(json.dumps(res.to_dict() if per_concept else res.summary(), indent=2))
        return
    print_eval(res)


def store_of_run(store: str | None, run_dir: Path, settings: Settings) -> Path:
    """The store a command on the run `run_dir` reads: --store (a path or name) where given, else
    the one the run was trained on."""
    from usae_core.train import trained_store_path

    return existing_store(store, settings) if store is not None else trained_store_path(run_dir, "pass --store")


def existing_run(run: str, settings: Settings) -> Path:
    """The run a command reads, named by a path or a name under DATA_DIR/runs (`resolve_run`)."""
    return _in_data_dir(resolve_run(run, settings), settings, "run")


def existing_store(store: str, settings: Settings) -> Path:
    """The store a command reads, named by a path or a name under DATA_DIR/stores (`resolve_store`)."""
    return _in_data_dir(resolve_store(store, settings), settings, "store")


def _in_data_dir(path: Path, settings: Settings, what: str) -> Path:
    """`path`; UsaeError naming the data directory when `path` is in one that is not there (a name
    looked up with the wrong --data-dir, or outside the folder that holds ./usae-data), where the
    next step would say only that there is no such run or store."""
    data_dir = settings.data_dir
    if not path.exists() and data_dir in path.parents and not data_dir.exists():
        raise UsaeError(f"there is no data directory at {data_dir.resolve()} (looking for the {what} {path.name} "
                        "in it): check --data-dir (or USAE_DATA_DIR), or run this in the folder you ran `usae demo` in")
    return path


def print_eval(res) -> None:
    console = Console()
    table = Table(title="R² (row: encode from, column: decode into)")
    table.add_column("source \\ target")
    for m in res.models:
        table.add_column(m, justify="right")
    for i, m in enumerate(res.models):
        table.add_row(m, *(f"{v:.3f}" for v in res.r2[i]))
    console.print(table)
    console.print(f"R² self {res.r2_self:.3f} / cross {res.r2_cross:.3f}")
    console.print("L0 " + ", ".join(f"{m} {v:.1f}" for m, v in zip(res.models, res.l0)))
    n = res.fire_counts.shape[1]
    live = ~res.dead
    universal = int((res.firing_entropy[live] >= 0.8).sum())
    console.print(f"{int(live.sum()):,} live of {n:,} concepts ({res.dead_fraction:.1%} dead), "
                  f"{universal:,} universal (firing entropy >= 0.8)")
    top = res.energy.argsort()[::-1][:10]
    t2 = Table(title="Top concepts by energy")
    for col in ("concept", "energy", "entropy", "co-fire", *[f"fires {m}" for m in res.models]):
        t2.add_column(col, justify="right")
    for c in top:
        t2.add_row(str(c), f"{res.energy[c]:.3f}", f"{res.firing_entropy[c]:.2f}", f"{res.cofire[:, c].mean():.2f}",
                   *(f"{int(v):,}" for v in res.fire_counts[:, c]))
    console.print(t2)


def register(cli: typer.Typer) -> None:
    cli.command("import-activations")(import_activations_cmd)
    cli.command("train")(train_cmd)
    cli.command("eval")(eval_cmd)
