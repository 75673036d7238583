"""`usae mine`: turn a trained run and its store into browsable concept records."""

from __future__ import annotations

from typing import Annotated

import typer

from app.commands.core import DataDir, RunStore, existing_run, store_of_run
from app.settings import settings_for


def mine_cmd(
    run: Annotated[str, typer.Argument(help="Run directory (path or name under DATA_DIR/runs).")],
    store: RunStore = None,
    top_n: Annotated[int, typer.Option("--top-n", help="Top images kept per concept per model.")] = 16,
    tau: Annotated[float, typer.Option(help="Firing threshold.")] = 0.1,
    batch_images: Annotated[int, typer.Option(help="Images encoded at once.")] = 64,
    batch_concepts: Annotated[int, typer.Option(help="Concepts rendered and written per transaction.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    data_dir: DataDir = None,
) -> None:
    """Mine top images, heatmaps, histograms and statistics of every concept into the database.

    Re-mining replaces the run's mined data in one final step; labels are kept."""
    from app.templating import check_page_folders

    check_page_folders()  # the mine renders concept cards; before the imports below, as card_html reads its template
    from app.migrations import upgrade_database
    from app.services.mining import mine_run
    from usae_core.errors import UsaeError
    from usae_core.mining import MiningConfig
    from usae_core.model import USAE
    from usae_core.store import ActivationStore
    from usae_core.devices import resolve_device

    if batch_concepts < 1:
        raise UsaeError(f"--batch-concepts must be >= 1, got {batch_concepts}")
    settings = settings_for(data_dir)
    cfg = MiningConfig(top_n=top_n, tau=tau, batch_images=batch_images)
    dev = resolve_device(device)
    run_dir = existing_run(run, settings)
    model = USAE.from_pretrained(run_dir, map_location=dev)
    st = ActivationStore.open(store_of_run(store, run_dir, settings))
    upgrade_database(settings.db_url)
    out = mine_run(settings.db_url, settings.media_dir, run_dir, st, model, cfg=cfg, device=str(dev),
                   batch_concepts=batch_concepts, progress=True)
    typer.echo(f"mined run {run_dir.name}: {out.n_concepts:,} concepts, {out.n_top_images:,} top images "
               f"in {out.seconds:.1f} s (database mining generation #{out.generation_id})")


def register(cli: typer.Typer) -> None:
    cli.command("mine")(mine_cmd)
