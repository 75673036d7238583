"""The `usae` command. Each command group lives in `app/commands/<name>.py` and exposes
`register(cli)`; this file only assembles them and turns UsaeError into a one-line message."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from usae_core.errors import UsaeError


class _ReadableHelp:
    """What every `usae` command's help shows of its parameters, set here for all of them.

    Typer 0.29's help puts its type placeholder after every parameter, flags included (`--small
    --no-small <bool>`, `--help <bool>`, `run <str>`); an option's `metavar`, where one is set,
    takes its place (typer/core.py, `display_type_rich`). So a flag gets an empty one, a value
    option the kind of value it takes (N, NUMBER, PATH, else its name: `--store STORE`) unless it
    names its own (`--out RUN`), and an argument is its name alone (`RUN`, in the usage line too,
    where Typer writes `{run}`). A flag that is off by default shows only its switch (`--resume`,
    not also `--no-resume`, which only widened the table); the off switch is still accepted, so
    scripts that pass it keep working."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _readable(param)

    def format_help(self, ctx: typer.Context, formatter) -> None:
        hidden = [(p, p.secondary_opts) for p in self.get_params(ctx) if getattr(p, "hide_off_switch", False)]
        for param, _ in hidden:
            param.secondary_opts = []
        try:
            super().format_help(ctx, formatter)
        finally:
            for param, opts in hidden:
                param.secondary_opts = opts

    def get_help_option(self, ctx: typer.Context) -> TyperOption | None:
        option = super().get_help_option(ctx)
        if option is not None:
            _readable(option)
        return option


def _readable(param) -> None:
    if isinstance(param, TyperOption) and (param.is_flag or param.count):
        param.metavar = ""
        if param.default is False and param.secondary_opts == [f"--no-{param.opts[-1].removeprefix('--')}"]:
            param.hide_off_switch = True
        return
    if type(param) is TyperArgument:
        param.__class__ = _Argument  # same fields, one method more
    if param.metavar is not None or not isinstance(param, (TyperOption, TyperArgument)):
        return
    kind = param.type_descriptor.annotation
    param.metavar = ("N" if kind is int else "NUMBER" if kind is float
                     else "PATH" if isinstance(kind, type) and issubclass(kind, Path) else param.name.upper())


class _Argument(TyperArgument):
    def display_type_rich(self, ctx: typer.Context) -> str | None:
        """Nothing beside the name: an argument's metavar names what it takes, where Typer adds `<str>`."""
        return None


class _Command(_ReadableHelp, TyperCommand):
    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class _Group(_ReadableHelp, TyperGroup):
    pass


def _readable_help(app: typer.Typer) -> None:
    """Every command and command group of `app` shows its help as `_ReadableHelp` says."""
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):
            command.cls = _Command
    for group in app.registered_groups:
        group.cls = _Group
        _readable_help(group.typer_instance)


cli = typer.Typer(
    cls=_Group,
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
_readable_help(cli)


MIN_TYPER = (0, 29)
"""The help formatting above uses Typer 0.29's parameter classes (pyproject.toml says so too)."""


def _typer_too_old(version: str) -> bool:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())  # "29rc1" -> 29
        parts.append(int(digits or 0))
    return tuple(parts) < MIN_TYPER


def main() -> None:
    from usae_core.extract import use_fast_pinning

    if _typer_too_old(typer.__version__):  # else every command fails in the help set-up with an AttributeError
        need = ".".join(map(str, MIN_TYPER))
        typer.echo(f"error: usae needs typer >= {need}, this Python has {typer.__version__}: "
                   f"pip install -U 'typer>={need}'", err=True)
        sys.exit(2)
    use_fast_pinning()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # upgrade_database says in one line what it did
    # The job queue's start-up lines ("Periodic tasks are disabled.", "The following commands are
    # available: ...") and one per task taken: its warnings and errors still show.
    logging.getLogger("huey").setLevel(logging.WARNING)
    try:
        cli()
    except UsaeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
