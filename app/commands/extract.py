"""Extraction commands: `usae extract` (images -> activation store) and `usae models list`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from app.commands.core import DataDir, parse_grid
from app.paths import demo_images_dir, resolve_store
from app.settings import settings_for
from usae_core.errors import UsaeError

models_cli = typer.Typer(help="Vision backbones.", no_args_is_help=True)


def parse_assignments(specs: list[str], option: str) -> dict[str, str]:
    """`NAME=VALUE` options (repeatable) -> {NAME: VALUE}."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise UsaeError(f"{option} expects NAME=VALUE, got {spec!r}")
        out[name] = value
    return out


def extract_cmd(
    out: Annotated[str, typer.Option("--out", metavar="STORE", help="Store to create (a path, or a name under DATA_DIR/stores).")],
    images: Annotated[str, typer.Option("--images", metavar="FOLDER", help="Image folder, or 'demo' for the built-in demo set.")] = "demo",
    models: Annotated[Optional[str], typer.Option("--models", help="Comma-separated backbone names "
                                                  "(default: the embedded offline set; see `usae models list`).")] = None,
    layer: Annotated[list[str], typer.Option("--layer", metavar="NAME=LAYER", help="Read another layer of a model; repeatable.")] = [],  # noqa: B006
    weights: Annotated[list[str], typer.Option("--weights", metavar="NAME=PATH", help="Local weight file or directory; repeatable.")] = [],  # noqa: B006
    grid: Annotated[Optional[str], typer.Option(metavar="HxW", help="Common token grid (default: the smallest native grid).")] = None,
    small: Annotated[bool, typer.Option("--small", help="With --images demo: a few hundred images instead of thousands.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the demo set (default 0).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    workers: Annotated[Optional[int], typer.Option(min=0, help="DataLoader worker processes (default: up to 8 on GPU; on CPU 0 up to 4 cores, else 2).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="On-disk dtype: float16, bfloat16 or float32.")] = "float16",
    shard_images: Annotated[int, typer.Option(help="Images per store shard (the unit of resuming).")] = 256,
    random_init: Annotated[bool, typer.Option(help="Random weights (benchmarks and tests only).")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the backbones (GPU).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the store instead of resuming it (once the new one is complete); with --images demo, also rebuild an older demo set.")] = False,
    distributed: Annotated[bool, typer.Option(help="Split shards over torchrun ranks.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Run images through backbones into an activation store (resumes an interrupted run)."""
    import torch.distributed

    from usae_core.backbones import default_backbones
    from usae_core.demo_images import build_demo_set
    from usae_core.distributed import distributed_context
    from usae_core.extract import ExtractInterrupted, ExtractTimings, build_backbones, extract_store
    from usae_core.store import check_storage_dtype

    settings = settings_for(data_dir)
    names = [m.strip() for m in models.split(",") if m.strip()] if models else default_backbones()
    if images != "demo" and (small or seed is not None):
        raise UsaeError(f"{'--small' if small else '--seed'} applies only to --images demo")
    if images == "demo" and Path("demo").is_dir():
        typer.secho("note: --images demo is the built-in demo set, not the folder ./demo here; "
                    "pass --images ./demo for that folder", fg=typer.colors.YELLOW, err=True)
    seed = seed or 0
    target = resolve_store(out, settings)
    weight_files, layers = parse_assignments(weights, "--weights"), parse_assignments(layer, "--layer")
    common_grid = parse_grid(grid) if grid else None
    check_storage_dtype(dtype)
    # Before the demo set (seconds to minutes to build): a mistyped name or missing weights fail first.
    backbones = build_backbones(names, weight_files, layers, random_init)
    timings = ExtractTimings()
    try:
        with distributed_context(distributed, device=device) as ctx:
            source = Path(images)
            if images == "demo":
                # Rank 0 builds the set; the others then find it complete. --overwrite also rebuilds
                # a set of an older generator version in place (the message asking for it says so).
                demo_dir = demo_images_dir(settings, small, seed)
                if ctx.rank == 0:
                    build_demo_set(demo_dir, seed=seed, small=small, overwrite=overwrite, progress=True)
                if ctx.world_size > 1:
                    torch.distributed.barrier()
                source = build_demo_set(demo_dir, seed=seed, small=small)
            store = extract_store(
                source, backbones, target, grid=common_grid, batch_size=batch_size, device=ctx.device,
                num_workers=workers, dtype=dtype, shard_images=shard_images, overwrite=overwrite, compile=compile,
                timings=timings,
            )
    except KeyboardInterrupt as exc:  # Ctrl-C: one line on how far it got, no traceback, and 130 as usual
        message = str(exc) if isinstance(exc, ExtractInterrupted) else "interrupted; rerun the same command to continue"
        typer.secho(message, fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    if ctx.rank == 0:
        skipped = store.meta.get("skipped_images", {})
        done = "wrote" if timings.images else "already complete, nothing to extract:"
        typer.echo(f"{done} {store.root}: {store.n_images:,} images x {store.grid[0]}x{store.grid[1]} tokens, models "
                   + ", ".join(f"{n} ({d})" for n, d in store.dims.items())
                   + (f"; skipped {len(skipped)} unreadable file{'s' if len(skipped) != 1 else ''}" if skipped else ""))
        if timings.images:  # nothing to say when every shard was already done
            typer.echo(timings.summary())


@models_cli.command("list")
def models_list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    data_dir: DataDir = None,  # noqa: ARG001 - accepted like every command, nothing here reads it
) -> None:
    """Registered backbones and whether their weights are on this machine (usable offline)."""
    from usae_core.backbones import list_backbones

    rows = []
    for entry in list_backbones():
        location = None if entry.is_pattern else entry.find_weights()
        rows.append({
            "name": entry.name,
            "family": entry.family,
            "default": entry.default,
            "default_layer": entry.default_layer,
            "offline": None if entry.is_pattern else location is not None,
            "weights": location,
            "description": entry.description,
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Backbones (`usae extract --models NAME,...`)")
    for col in ("name", "family", "default", "layer", "weights offline", "description"):
        table.add_column(col)
    for r in rows:
        status = "per model: hub cache or --weights" if r["offline"] is None else ("yes" if r["offline"] else "missing")
        table.add_row(r["name"], r["family"], "yes" if r["default"] else "", r["default_layer"], status,
                      r["description"])
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: long lines, not wrapped cells


def register(cli: typer.Typer) -> None:
    cli.command("extract")(extract_cmd)
    cli.add_typer(models_cli, name="models")
