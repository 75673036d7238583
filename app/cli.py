"""The `usae` command. Each command group lives in `app/commands/<name>.py` and exposes
`register(cli)`; this file only assembles them and turns UsaeError into a one-line message."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from usae_core.errors import UsaeError

cli = typer.Typer(
    name="usae",
    help="USAE Concept Explorer: one shared concept dictionary for several vision models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"usae {version('usae-explorer')}")
        raise typer.Exit()


@cli.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Show the version and exit.")] = False) -> None:
    pass


def _register_all() -> None:
    from app.commands import cam, core, demo, extract, mine, runs, web

    for module in (core, extract, mine, runs, cam, web, demo):
        module.register(cli)


_register_all()


def main() -> None:
    from usae_core.extract import use_fast_pinning

    use_fast_pinning()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # upgrade_database says in one line what it did
    try:
        cli()
    except UsaeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
