"""Core commands: import-activations, train, eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from app.paths import resolve_run, resolve_store
from app.settings import settings_for
from usae_core.errors import UsaeError

DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Data directory (default: $USAE_DATA_DIR or ./usae-data).")]


def import_activations_cmd(
    out: Annotated[str, typer.Option("--out", help="Store to create (a path, or a name under DATA_DIR/stores).")],
    model: Annotated[list[str], typer.Option("--model", help="NAME=FILE.npy with shape (n_images, n_tokens, dim); repeat per model.")],
    grid: Annotated[Optional[str], typer.Option(help="Token grid HxW (default: square when the token count is a square, else 1xN).")] = None,
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
    out: Annotated[str, typer.Option("--out", help="Run directory (path or name under DATA_DIR/runs).")],
    concepts: Annotated[Optional[int], typer.Option("--concepts", help="Dictionary size (default: 6144, or --init-from's).")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Active concepts per token (default: 32, or --init-from's).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Tokens per step.")] = 4096,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 3e-4,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Steps of linear warmup to --lr, at most --steps (default: min(100, steps / 10)).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="mlp_bn (paper) or linear (default: mlp_bn, or --init-from's).")] = None,
    loss: Annotated[str, typer.Option(help="l1 (paper) or mse.")] = "l1",
    aux: Annotated[str, typer.Option(help="auxk, paper or none.")] = "auxk",
    seed: Annotated[int, typer.Option(help="Seed for init, data order and source choice.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: final only).")] = 500,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its newest checkpoint, with the settings it was started with (only --device and --checkpoint-every may change; after an interrupted --overwrite: the new run, swapped in when finished).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out (the old one stays until the new one is trained).")] = False,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Start from the weights and standardisation statistics of this run (path or name) or one of its checkpoints (RUN/checkpoints/step-N), at step 0 with a fresh optimizer and warm-up: to train a finished run further, or on another store of the same models. --concepts, --k and --encoder default to its.")] = None,
    distributed: Annotated[bool, typer.Option(help="Data-parallel over torchrun ranks.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Train a USAE on a store."""
    from usae_core.config import TrainConfig, USAEConfig
    from usae_core.distributed import distributed_context
    from usae_core.store import ActivationStore
    from usae_core.train import TrainingInterrupted, init_source_config, train_usae

    settings = settings_for(data_dir)
    st = ActivationStore.open(resolve_store(store, settings))
    source = resolve_run(init_from, settings) if init_from is not None else None
    # Shape options left out are the source run's: a user need not repeat them (given, they must match it).
    shape = init_source_config(source) if source is not None else USAEConfig(model_dims=st.dims)
    ucfg = USAEConfig(model_dims=st.dims, n_concepts=shape.n_concepts if concepts is None else concepts,
                      k=shape.k if k is None else k, encoder=shape.encoder if encoder is None else encoder)  # type: ignore[arg-type]
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, loss=loss, aux=aux,  # type: ignore[arg-type]
                       seed=seed, device=device, checkpoint_every=checkpoint_every)
    try:
        with distributed_context(distributed, device=tcfg.device) as ctx:
            tcfg.device = ctx.device
            train_usae(st, resolve_run(out, settings), ucfg, tcfg, resume=resume, overwrite=overwrite, init_from=source)
    except TrainingInterrupted as exc:  # Ctrl-C: one line on how to continue, no traceback
        typer.echo(str(exc), err=True)
        raise typer.Exit(130) from None
    typer.echo(f"trained {resolve_run(out, settings)}")


def eval_cmd(
    run: Annotated[str, typer.Argument(help="Run directory (path or name).")],
    store: Annotated[str, typer.Option("--store", help="Activation store (path or name).")],
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
    model = USAE.from_pretrained(resolve_run(run, settings))
    st = ActivationStore.open(resolve_store(store, settings))
    res = evaluate_usae(model, st, tau=tau, device=resolve_device(device), progress=not as_json)
    if as_json:
        typer.echo(json.dumps(res.to_dict() if per_concept else res.summary(), indent=2))
        return
    print_eval(res)


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
