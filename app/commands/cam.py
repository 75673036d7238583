"""`usae cam`: CAM images of one concept from the command line, without the web app or its database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from app.commands.core import DataDir, existing_run, store_of_run
from app.settings import settings_for
from usae_core.errors import UsaeError


def cam_cmd(
    run: Annotated[str, typer.Argument(help="Run directory (path or name under DATA_DIR/runs).")],
    concept: Annotated[int, typer.Option("--concept", help="Concept index.")],
    store: Annotated[Optional[str], typer.Option(
        "--store", help="The run's activation store, which names each model's backbone (default: the one it was trained on).")] = None,
    steps: Annotated[int, typer.Option(help="Optimisation steps per model.")] = 256,
    image_size: Annotated[int, typer.Option(help="Side of each image in pixels.")] = 224,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
    out: Annotated[Optional[Path], typer.Option(metavar="FOLDER", help="Folder for the PNGs (default: RUN/cam/concept-N).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    data_dir: DataDir = None,
) -> None:
    """Optimise one image per model that excites the same concept (coordinated activation maximisation)."""
    from PIL import Image
    from tqdm.auto import tqdm

    from app.services.explain import load_backbones
    from usae_core.atomic import atomic_path
    from usae_core.cam import CamConfig, coordinated_activation_maximization
    from usae_core.model import CONFIG_FILE, USAE, not_a_run_message
    from usae_core.store import ActivationStore, check_model_name
    from usae_core.devices import resolve_device

    settings = settings_for(data_dir)
    run_dir = existing_run(run, settings)
    folder = out or run_dir / "cam" / f"concept-{concept}"
    _check_writable_folder(folder)  # before minutes of optimisation, not after
    if not (run_dir / CONFIG_FILE).is_file():
        raise UsaeError(not_a_run_message(run_dir))
    store_path = store_of_run(store, run_dir, settings)
    activations = ActivationStore.open(store_path)
    dev = resolve_device(device)
    usae = USAE.from_pretrained(run_dir, map_location=dev).eval()
    missing = [n for n in usae.names if n not in activations.model_names]
    if missing:
        raise UsaeError(f"the store {store_path} has no model {', '.join(missing)} of this run; pass the run's --store")
    for name in usae.names:
        check_model_name(name)  # it becomes a file name
    cfg = CamConfig(steps=steps, image_size=image_size, seed=seed, device=str(dev))
    backbones, skipped = load_backbones({name: activations.model_info(name) for name in usae.names})
    for name, why in skipped.items():
        typer.echo(f"skipping {name}: {why}", err=True)
    if not backbones:
        raise UsaeError("no model of this run has a backbone to optimise images for")

    bars: dict[str, tqdm] = {}

    def on_step(model: str, step: int, total: int) -> None:
        bar = bars.setdefault(model, tqdm(total=total, desc=f"cam {model}", unit="step"))
        bar.update(step - bar.n)

    results = coordinated_activation_maximization(usae, backbones, concept, cfg,
                                                  grids={n: tuple(activations.grid) for n in backbones},
                                                  on_step=on_step)
    for bar in bars.values():
        bar.close()
    folder.mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        target = folder / f"{name}.png"
        with atomic_path(target) as tmp:
            Image.fromarray(result.image).save(tmp, format="PNG")
        typer.echo(f"{target}: concept {concept} activation {result.start_activation:.3g} -> "
                   f"{result.final_activation:.3g}")


def _check_writable_folder(folder: Path) -> None:
    """`folder`, or the nearest part of its path that exists, must be a folder."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise UsaeError(f"cannot write the CAM images into {folder}: {existing} is a file, not a folder")


def register(cli: typer.Typer) -> None:
    cli.command("cam")(cam_cmd)
