"""`usae runs list` and `usae runs delete`: the runs the explorer shows."""

from __future__ import annotations

import csv
import io
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer

from app.commands.core import DataDir
from app.settings import existing_data_for
from usae_core.errors import UsaeError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

runs_cli = typer.Typer(help="Runs in the explorer's database.", no_args_is_help=True)


@contextmanager
def _database(data_dir: Path | None) -> Iterator[tuple[Session, Path]]:
    """A session on the (migrated) database of `data_dir`, and its media directory."""
    from app.db import session_factory
    from app.migrations import upgrade_database

    settings = existing_data_for(data_dir)
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
        typer.echo("no runs yet; `usae mine RUN` adds one (or `usae demo`)")
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


@runs_cli.command("export")
def runs_export_cmd(
    run: Annotated[str, typer.Argument(help="Name (or id) of the run, as `usae runs list` shows it.")],
    out: Annotated[Optional[Path], typer.Option("--out", metavar="FILE", help="CSV file to write (default: standard output).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Write every concept of a run as CSV: the explorer's Download CSV, dead concepts included."""
    from usae_core.atomic import atomic_path

    from app.schemas.concepts import ConceptFilters
    from app.services.concept_table import EXCEL_BOM, concept_csv
    from app.services.runs import find_run

    with _database(data_dir) as (session, _):
        target = find_run(session, run)
        body = concept_csv(session, run=target, filters=ConceptFilters(sort="index", show_dead=True))
    if out is None:
        typer.echo(body, nl=False)
        return
    if out.is_dir():
        raise UsaeError(f"--out {out} is a folder; name a file, e.g. {out / (target.name + '-concepts.csv')}")
    with atomic_path(out) as tmp:  # an interrupted export never leaves half a table
        tmp.write_text(EXCEL_BOM + body, encoding="utf-8", newline="")
    typer.echo(f"wrote {len(list(csv.reader(io.StringIO(body)))) - 1:,} concepts of run {target.name} to {out}",
               err=True)


def _some(n: int, thing: str) -> str:
    return f"{n:,} {thing}{'s' if n != 1 else ''}"


def register(cli: typer.Typer) -> None:
    cli.add_typer(runs_cli, name="runs")
