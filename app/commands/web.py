"""`usae` commands of this group (filled in by its issue)."""

import typer


def register(cli: typer.Typer) -> None:
    """Add this group's commands to `cli`."""
