"""`usae runs list` and `usae runs delete`: the runs the explorer shows."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator

import typer

from app.commands.core import DataDir
from app.settings import settings_for

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

runs_cli = typer.Typer(help="Runs in the explorer's database.", no_args_is_help=True)


@contextmanager
def _database(data_dir: Path | None) -> Iterator[tuple[Session, Path]]:
    """A session on the (migrated) database of `data_dir`, and its media directory."""
    from app.db import session_factory
    from app.migrations import upgrade_database

    settings = settings_for(data_dir)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url)() as session:
        yield session, settings.media_dir


@runs_cli.command("list")
def runs_list_cmd(data_dir: DataDir = None) -> None:
    """List the runs: id, name, status, models, concepts, labelled concepts, when mined."""
    from sqlalchemy import func, select

    from app.models import Concept
    from app.services.runs_view import list_runs

    with _database(data_dir) as (session, _):
        runs = list_runs(session)
        labelled = dict(session.execute(select(Concept.run_id, func.count()).where(Concept.label != "")
                                        .group_by(Concept.run_id)).all())
    if not runs:
        typer.echo("no runs yet; `usae mine RUN --store STORE` adds one (or `usae demo`)")
        return
    rows = [("id", "name", "status", "concepts", "labelled", "mined", "models")]
    rows += [(str(r.id), r.name, r.status, f"{r.n_concepts:,}", f"{labelled.get(r.id, 0):,}",
              r.mined_at.strftime("%Y-%m-%d %H:%M") if r.mined_at else "-", ", ".join(m.name for m in r.models))
             for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@runs_cli.command("delete")
def runs_delete_cmd(
    run: Annotated[str, typer.Argument(help="Name (or id) of the run, as `usae runs list` shows it.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Remove a run from the explorer, with its labels, mined images, CAM images and audit links.

    Its run directory and activation store stay on disk: `usae mine` brings it back, unlabelled."""
    from app.services.runs import delete_run, find_run, remove_orphaned_run_media, run_contents

    with _database(data_dir) as (session, media_dir):
        target = find_run(session, run)
        lost = run_contents(session, run=target)
        typer.echo(f"run {target.name} (id {target.id}): {_some(lost.concepts, 'concept')}, {lost.labelled:,} labelled "
                   f"({_some(lost.label_edits, 'label edit')}), {_some(lost.cam_images, 'CAM image')}, "
                   f"{_some(lost.audit_links, 'open audit link')}")
        if not yes and not typer.confirm("Delete it from the explorer? Labels and audit links cannot be restored"):
            typer.echo("nothing deleted")
            raise typer.Exit(1)
        name, run_dir = target.name, target.run_dir
        delete_run(session, run=target, media_dir=media_dir)
        remove_orphaned_run_media(session, media_dir=media_dir)
    typer.echo(f"deleted run {name}; its run directory {run_dir} was kept (`usae mine` it again to bring it back, "
               "without its labels)")


def _some(n: int, thing: str) -> str:
    return f"{n:,} {thing}{'s' if n != 1 else ''}"


def register(cli: typer.Typer) -> None:
    cli.add_typer(runs_cli, name="runs")
