"""`usae demo`: the whole main job on the embedded default, then the explorer."""

from __future__ import annotations

import webbrowser
from typing import Annotated

import typer

from app.commands.core import DataDir
from app.commands.web import GRACEFUL_SHUTDOWN_S, check_port
from app.settings import settings_for



def demo_cmd(
    small: Annotated[bool, typer.Option(help="A few hundred images: about two minutes on 2 CPU cores of an otherwise idle machine.")] = False,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the explorer when done.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8000,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open a browser where one exists.")] = True,
    data_dir: DataDir = None,
) -> None:
    """Build the demo images, extract 3 offline backbones, train the USAE, mine it, and serve the explorer."""
    from app.templating import check_page_folders

    check_page_folders()  # the mine renders concept cards from them, served or not
    from app.pipeline import DemoInterrupted, run_demo

    settings = settings_for(data_dir)
    if serve:
        check_port(host, port)  # now, not after minutes of extraction and training
    try:
        result = run_demo(settings, small=small, device=device, echo=typer.echo)
    except KeyboardInterrupt as exc:  # Ctrl+C: one line on where it stopped and how to go on, exit 130 as usual
        message = str(exc) if isinstance(exc, DemoInterrupted) else "usae demo interrupted; run it again to continue"
        typer.secho(message, fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    total = sum(s.seconds for s in result.stages)
    typer.echo(f"done in {total:.0f} s: run {result.run_dir}")
    if result.password:
        typer.secho(f"analyst login: {result.username} / {result.password}", fg=typer.colors.GREEN)
    else:
        typer.echo(f"analyst login: {result.username} (password set earlier; reset it with "
                   f"`usae user set-password {result.username}`)")
    url = f"http://{host}:{port}/runs/{result.run_id}"
    if not serve:
        typer.echo(f"explore it with: usae serve --data-dir {settings.data_dir}  ->  {url}")
        return
    import uvicorn

    from app.jobs import worker_process
    from app.main import create_app

    typer.echo(f"serving the explorer on {url}  (Ctrl+C to stop)")
    if open_browser:
        try:
            webbrowser.open(url)
        except webbrowser.Error:
            pass
    with worker_process(settings):  # runs the CAM jobs analysts start from concept pages
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning",
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def register(cli: typer.Typer) -> None:
    cli.command("demo")(demo_cmd)
