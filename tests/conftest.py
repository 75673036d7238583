"""Shared fixtures: a temporary data directory, and the app database on both backends.

`db_url` runs each test once on a SQLite file and once on a real PostgreSQL 15 server that
this session starts from Debian's binaries (initdb + pg_ctl as the `postgres` OS user, since
tests run as root), listening only on a unix socket in a temporary folder. Every test gets a
fresh, migrated database: SQLite copies a migrated template file, Postgres clones a migrated
template database.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

def _debian_pg_bin() -> Path:
    """The newest PostgreSQL that Debian's packages installed (any major version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = Path(os.environ.get("USAE_PG_BIN") or _debian_pg_bin())
PG_OS_USER = "postgres"


@pytest.fixture
def ctrl_c_as_in_a_terminal() -> Iterator[None]:
    """SIGINT raising KeyboardInterrupt, as at a terminal, for tests of what Ctrl-C does: a suite
    started in the background of a script (`... &`) inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def restore_ctrl_c() -> None:
    """`preexec_fn` of a child process whose Ctrl-C a test sends: SIGINT back to its default, so
    Python in the child raises KeyboardInterrupt on it even when this suite runs with it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data directory (DB, stores, runs, media live under it)."""
    path = tmp_path / "usae-data"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- PostgreSQL server


@dataclass
class PostgresServer:
    socket_dir: Path
    port: int

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_OS_USER}@/{database}?host={self.socket_dir}&port={self.port}"

    def admin(self, sql: str) -> None:
        """Run one statement on the maintenance database, outside a transaction."""
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=PG_OS_USER, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(sql)


def _as_postgres(*args: str) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", PG_OS_USER, "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *args], check=True, capture_output=True, text=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql, or set USAE_PG_BIN)")
    # Not under pytest's tmp dir: that is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="usae-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, user=PG_OS_USER)
    data, sock = root / "data", root / "sock"
    _as_postgres("mkdir", str(sock))
    _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", PG_OS_USER, "--auth=trust", "-E", "UTF8",
                 "--no-sync")
    port = _free_port()
    options = f"-k {sock} -p {port} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
    _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w",
                 "start")
    server = PostgresServer(sock, port)
    try:
        yield server
    finally:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- databases

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory) -> Path:
    from app.migrations import upgrade_database

    path = tmp_path_factory.mktemp("db-template") / "template.db"
    upgrade_database(f"sqlite:///{path}")
    _checkpoint_sqlite(path)
    return path


def _checkpoint_sqlite(path: Path) -> None:
    """Fold the WAL into the main file so copying the one file copies the database."""
    import sqlite3

    from app.db import get_engine

    get_engine(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA journal_mode=DELETE")


@pytest.fixture(scope="session")
def _pg_template(pg_server: PostgresServer) -> str:
    from app.db import get_engine
    from app.migrations import upgrade_database

    pg_server.admin("CREATE DATABASE usae_template")
    url = pg_server.url("usae_template")
    upgrade_database(url)
    get_engine(url).dispose()  # a template must have no open connections to be cloned
    return "usae_template"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database (no tables) on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    name = f"usae_empty_{next(_db_counter)}"
    server.admin(f"CREATE DATABASE {name}")
    yield server.url(name)
    _drop_pg(server, name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, data_dir: Path) -> Iterator[str]:
    """A URL of a fresh database migrated to head, on each backend. The SQLite file is
    DATA_DIR/usae.db, the default database of `settings_for(data_dir)`."""
    with _fresh_database(request, request.param, data_dir / "usae.db") as url:
        yield url


@pytest.fixture
def sqlite_and_postgres_urls(request, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Fresh migrated databases on both backends at once, to compare them."""
    with _fresh_database(request, "sqlite", tmp_path / "compare.db") as lite, \
            _fresh_database(request, "postgres", tmp_path / "unused") as pg:
        yield {"sqlite": lite, "postgres": pg}


@contextlib.contextmanager
def _fresh_database(request, backend: str, sqlite_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), sqlite_path)
        url = f"sqlite:///{sqlite_path}"
        yield url
        _dispose(url)
        return
    server: PostgresServer = request.getfixturevalue("pg_server")
    template = request.getfixturevalue("_pg_template")
    name = f"usae_test_{next(_db_counter)}"
    server.admin(f"CREATE DATABASE {name} TEMPLATE {template}")
    yield server.url(name)
    _drop_pg(server, name)


def _dispose(url: str) -> None:
    from app.db import get_engine

    get_engine(url).dispose()


def _drop_pg(server: PostgresServer, name: str) -> None:
    _dispose(server.url(name))
    server.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
