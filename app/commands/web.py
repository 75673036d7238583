"""`usae serve` (the explorer), `usae worker` (jobs) and `usae user` (analyst accounts)."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Iterator, Optional

import typer

from app.commands.core import DataDir
from app.settings import Settings, existing_data_for, settings_for
from usae_core.errors import UsaeError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


user_cli = typer.Typer(help="Analyst accounts.", no_args_is_help=True)


def serve_cmd(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[Optional[int], typer.Option(
        min=1, help="Server processes (default: one per CPU core, which serves the most users).")] = None,
    job_worker: Annotated[bool, typer.Option(
        "--job-worker/--no-job-worker",
        help="Also run `usae worker` for background jobs (CAM images); turn off when workers run elsewhere.")] = True,
    data_dir: DataDir = None,
) -> None:
    """Serve the concept explorer (pages, JSON API at /api, API docs at /docs)."""
    from app.templating import check_page_folders

    check_page_folders()  # before the imports below: card_html reads its template as it loads
    from contextlib import nullcontext

    from app.db import session_factory
    from app.jobs import worker_process
    from app.migrations import upgrade_database
    from app.services.card_html import refresh_stale_cards

    settings = settings_for(data_dir)
    check_port(host, port)
    new = not settings.data_dir.exists()
    typer.echo(f"USAE Concept Explorer on http://{host}:{port} (data in {settings.data_dir.resolve()})")
    warning = plain_http_warning(host, settings.secure_cookies)
    if warning:
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)
    # The job worker migrates as it starts: migrate first, so it never races the server to create
    # the tables of a new database.
    upgrade_database(settings.db_url)
    warning = empty_explorer_warning(settings, new=new)
    if warning:
        typer.secho(warning, fg=typer.colors.YELLOW, err=True)
    refreshed = refresh_stale_cards(session_factory(settings.db_url))
    if refreshed:
        typer.echo(f"re-rendered {refreshed:,} concept cards of an older card template")
    with worker_process(settings) if job_worker else nullcontext():
        _serve(settings, host, port, workers or os.cpu_count() or 1)


GRACEFUL_SHUTDOWN_S = 5
"""How long a stopping server lets requests in flight finish (a CSV download, an explain) before
it closes them: the job worker is stopped after the server, and both within the 10 s that
`docker stop` waits before it kills."""


def plain_http_warning(host: str, secure_cookies: bool) -> str | None:
    """A warning when other machines can reach the explorer and its session cookie may travel
    over plain HTTP (then anyone on the network path could take over an analyst's session)."""
    loopback = host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")
    if loopback or secure_cookies:
        return None
    return (f"warning: serving on {host} with session cookies that are also sent over plain HTTP. Put the "
            "explorer behind HTTPS (a reverse proxy) and set USAE_SECURE_COOKIES=true.")


def empty_explorer_warning(settings: Settings, *, new: bool) -> str | None:
    """A warning when nobody can sign in (no analyst accounts) or there is nothing to explore (no
    runs): typically `usae serve` run outside the folder `usae demo` ran in, which serves a new,
    empty data directory where the demo's login does not work. Serving goes on (a new deployment,
    docker's included, starts this way), so the warning says how to fix it."""
    from sqlalchemy import func, select

    from app.db import session_factory
    from app.models import Run, User

    with session_factory(settings.db_url)() as session:
        runs = session.scalar(select(func.count()).select_from(Run))
        analysts = session.scalar(select(func.count()).select_from(User).where(User.is_active))
    if runs and analysts:
        return None
    where = settings.data_dir.resolve()
    held = ("its database (USAE_DATABASE_URL)" if settings.database_url else
            f"the new data directory {where}" if new else f"the data directory {where}")
    add_analyst = f"`usae user add NAME --data-dir {where}`"
    if runs:
        return f"warning: {held} has no analyst accounts, so nobody can sign in: add one with {add_analyst}"
    demo = ("For `usae demo`'s results, run `usae serve` in the folder the demo ran in, or pass --data-dir "
            "with the demo's usae-data folder")
    add_run = f"`usae mine RUN --data-dir {where}`"
    if analysts:
        return f"warning: {held} has no runs: the explorer is empty. {demo}; to add a run here: {add_run}."
    return (f"warning: {held} has no runs and no analyst accounts (nobody can sign in). {demo}; to start "
            f"here: {add_analyst} (an analyst), then {add_run} (a run).")


def _serve(settings, host: str, port: int, workers: int) -> None:
    import uvicorn

    from app.main import create_app

    if workers == 1:
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info",
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        return
    # Worker processes build their own app from the environment. The secret key file is created
    # now (and the database was migrated by serve_cmd), before they start, so every worker reads
    # the same key and no two workers race to create the same tables in a new database.
    settings.resolved_secret_key()
    os.environ["USAE_DATA_DIR"] = str(settings.data_dir.resolve())
    if hasattr(socket, "SO_REUSEPORT"):
        serve_workers(host, port, workers)
        return
    # A worker busy importing torch on a loaded machine can miss uvicorn's 5 s health ping and
    # be killed and restarted for nothing ("Child process died"); give start-up room.
    uvicorn.run("app.main:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="info", timeout_worker_healthcheck=60, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def serve_workers(host: str, port: int, workers: int) -> None:
    """Run `workers` server processes, each listening on its own socket bound with SO_REUSEPORT.

    With one shared listening socket (uvicorn's multi-worker mode) the worker whose event loop
    wakes first accepts every pending connection, and keep-alive connections stay where they
    were accepted: a burst of 32 clients was measured splitting 28 / 4 between two workers
    (docs/benchmarks.md, web section). With a socket per worker the kernel spreads connections
    over the workers. A worker that dies is replaced; one that cannot start stops the server.
    `serve_cmd` has checked the port is free."""
    spawn = multiprocessing.get_context("spawn")
    server = os.getpid()
    procs = [spawn.Process(target=_worker, args=(host, port, server)) for _ in range(workers)]
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    for proc in procs:
        proc.start()
    try:
        while not stopping.wait(0.5):
            for i, proc in enumerate(procs):
                if proc.is_alive():
                    continue
                if proc.exitcode == _STARTUP_FAILURE:
                    raise typer.Exit(code=1)  # the worker logged why (bad app, settings or socket)
                typer.echo(f"server worker {proc.pid} exited with code {proc.exitcode}; starting another", err=True)
                procs[i] = spawn.Process(target=_worker, args=(host, port, server))
                procs[i].start()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        for proc in procs:
            proc.join(timeout=GRACEFUL_SHUTDOWN_S + 5)
            if proc.is_alive():
                proc.kill()
                proc.join()


_STARTUP_FAILURE = 3
"""uvicorn's exit code for a server that could not start."""


def _bound_socket(host: str, port: int, share: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if share:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def check_port(host: str, port: int) -> None:
    """Fail with a clear message, before any worker starts, when the address is taken. The probe
    does not share the port, so it also fails when another `usae serve` (whose workers do
    share it) is still running, instead of silently joining that server."""
    try:
        _bound_socket(host, port, share=False).close()
    except OSError as exc:
        raise UsaeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{_listen_hint(exc.errno, port)}") from None


def _listen_hint(code: int | None, port: int) -> str:
    """What to do about the OSError `code` of binding the server's address."""
    if code == errno.EADDRINUSE:
        return (f"; another server (a `usae serve` or `usae demo` still running?) has that port: stop it, or "
                f"pass another, e.g. --port {port + 1 if port < 65535 else 8000}")
    if code == errno.EACCES:
        return "; ports below 1024 need root: pass --port 1024 or above, e.g. --port 8000"
    if code == errno.EADDRNOTAVAIL:
        return "; no network interface of this machine has that address: check --host (0.0.0.0 for every one)"
    return ""


def _worker(host: str, port: int, server: int) -> None:
    """One server process: its own listening socket (queueing connections from the start), then
    the app built from the environment (USAE_DATA_DIR, set by `serve_cmd`). It stops (SIGTERM:
    uvicorn finishes the requests in flight) once `server`, the `usae serve` process, is gone:
    killed with SIGKILL, it could not stop its children, which would go on answering on the
    port with the old code and keep the next `usae serve` off it."""
    import uvicorn

    from app.jobs import stop_with_parent

    stop_with_parent(server, signal.SIGTERM, "server process")
    try:
        sock = _bound_socket(host, port, share=True)
        sock.listen(2048)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        sys.exit(_STARTUP_FAILURE)
    config = uvicorn.Config("app.main:app_from_environment", factory=True, log_level="info",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    uvicorn.Server(config).run(sockets=[sock])


def _password_option(command: str):
    """--password of `usae user COMMAND`, whose help shows that command reading it from standard input."""
    return Annotated[Optional[str], typer.Option(
        help="Password; when omitted, prompted for (hidden, twice), or read as one line from standard input when "
             f"that is not a terminal (`printf '%s\\n' \"$PW\" | usae user {command} NAME`: kept out of the process "
             "list).")]


AddPassword, NewPassword = _password_option("add"), _password_option("set-password")


def _stdin_is_a_terminal() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _password(given: str | None, prompt: str) -> str:
    if given is not None:
        return given
    if not _stdin_is_a_terminal():
        line = sys.stdin.readline() if sys.stdin is not None else ""  # None: started with stdin closed
        if not line:
            raise UsaeError("no password: pass --password, type it at a terminal, or send it on standard input")
        return line.rstrip("\r\n")
    return typer.prompt(prompt, hide_input=True, confirmation_prompt=True)


@contextmanager
def _accounts(data_dir: Path | None, *, create: bool = False) -> Iterator[Session]:
    """A database session on the (migrated) database of `data_dir`, committed on success; made
    first only with `create` (adding the first analyst)."""
    from app.db import session_factory
    from app.migrations import upgrade_database

    settings = settings_for(data_dir) if create else existing_data_for(data_dir)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url)() as session:
        yield session
        session.commit()


@user_cli.command("add")
def user_add_cmd(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, '.', '_', '@', '-').")],
    password: AddPassword = None,
    data_dir: DataDir = None,
) -> None:
    """Create an analyst account."""
    from app.services.users import create_user

    password = _password(password, "Password")
    with _accounts(data_dir, create=True) as session:
        create_user(session, username=name, password=password)
    typer.echo(f"created analyst {name!r}")


@user_cli.command("set-password")
def user_set_password_cmd(
    name: Annotated[str, typer.Argument(help="User name of an existing analyst.")],
    password: NewPassword = None,
    data_dir: DataDir = None,
) -> None:
    """Give an analyst a new password; their open sessions end."""
    from app.services.users import set_password

    password = _password(password, "New password")
    with _accounts(data_dir) as session:
        set_password(session, username=name, password=password)
    typer.echo(f"new password set for {name!r}; their open sessions have ended")


@user_cli.command("list")
def user_list_cmd(data_dir: DataDir = None) -> None:
    """List the analyst accounts."""
    from app.services.users import list_users

    with _accounts(data_dir) as session:
        users = [(u.username, u.is_active) for u in list_users(session)]
    if not users:
        typer.echo("no analysts yet; add one with `usae user add NAME`")
    for username, active in users:
        typer.echo(username if active else f"{username} (disabled)")


def worker_cmd(
    threads: Annotated[int, typer.Option(min=1, help="Jobs run at once.")] = 1,
    torch_threads: Annotated[Optional[int], typer.Option(
        help="CPU threads a job's PyTorch may use (default: PyTorch's own choice, every core).")] = None,
    parent_pid: Annotated[Optional[int], typer.Option(
        hidden=True, help="Stop once this process (the `usae serve` that started the worker) is gone.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Run background jobs (CAM images) queued from the explorer, until stopped."""
    from app.jobs import run_worker

    if torch_threads is not None:
        if torch_threads < 1:
            raise UsaeError(f"--torch-threads must be >= 1, got {torch_threads}")
        import torch

        torch.set_num_threads(torch_threads)
    settings = settings_for(data_dir)
    typer.echo(f"job worker for {settings.data_dir.resolve()} ({threads} at a time)")
    if run_worker(settings, threads=threads, parent_pid=parent_pid):
        # A stopped job's thread is still inside PyTorch: tearing the interpreter down under it
        # aborts with "terminate called without an active exception". Its job is marked failed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def register(cli: typer.Typer) -> None:
    cli.command("serve")(serve_cmd)
    cli.command("worker")(worker_cmd)
    cli.add_typer(user_cli, name="user")
