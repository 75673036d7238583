"""`usae serve` (the explorer) and `usae user add` (analyst accounts)."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from app.commands.core import DataDir
from app.settings import settings_for


user_cli = typer.Typer(help="Analyst accounts.", no_args_is_help=True)


def serve_cmd(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[Optional[int], typer.Option(
        help="Server processes (default: one per CPU core, which serves the most users).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Serve the concept explorer (pages, JSON API at /api, API docs at /docs)."""
    import uvicorn

    from app.main import create_app

    settings = settings_for(data_dir)
    workers = workers or os.cpu_count() or 1
    typer.echo(f"USAE Concept Explorer on http://{host}:{port} (data in {settings.data_dir.resolve()})")
    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
        return
    # Worker processes build their own app from the environment. The secret key file is created
    # now, before they start, so every worker reads the same one and signs sessions alike.
    settings.resolved_secret_key()
    os.environ["USAE_DATA_DIR"] = str(settings.data_dir.resolve())
    # A worker busy importing torch on a loaded machine can miss uvicorn's 5 s health ping and
    # be killed and restarted for nothing ("Child process died"); give start-up room.
    uvicorn.run("app.main:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="info", timeout_worker_healthcheck=60)


@user_cli.command("add")
def user_add_cmd(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, '.', '_', '@', '-').")],
    password: Annotated[Optional[str], typer.Option(help="Password; prompted for (hidden, twice) when omitted.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Create an analyst account."""
    from app.db import session_factory
    from app.migrations import upgrade_database
    from app.services.users import create_user

    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    settings = settings_for(data_dir)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url)() as session:
        create_user(session, username=name, password=password)
        session.commit()
    typer.echo(f"created analyst {name!r}")


def register(cli: typer.Typer) -> None:
    cli.command("serve")(serve_cmd)
    cli.add_typer(user_cli, name="user")
