"""Engines and sessions for the app database: a SQLite file by default, Postgres when
`USAE_DATABASE_URL` names one (for example `postgresql+psycopg://user:pw@host/usae`).

SQLite runs in WAL mode, so pages keep reading while a mining job writes, with foreign keys
enforced and a busy timeout so concurrent writers wait instead of failing.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_POOL_SIZE = 40
"""Connections kept open per process: one per request thread (anyio runs sync endpoints on up to
40). With SQLAlchemy's default of 5, a busy server closed and reopened its overflow connections
on every request, each reopen costing the pragmas, a schema parse and a cold page cache: about
1 ms more server CPU per page under 32 clients (docs/benchmarks.md)."""


def _configure_sqlite(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # WAL with synchronous=NORMAL is durable across application crashes (not power loss of
    # the last commits) and much faster than FULL.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _create_private_file(path: Path) -> None:
    """Create the database file readable by its owner only, if it is new: it holds password and
    audit-link hashes. SQLite gives its -wal and -shm files the database file's permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def make_engine(url: str) -> Engine:
    """A new engine for `url`; SQLite files get their directory created and their pragmas set."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.query.get("uri"):
            _create_private_file(Path(parsed.database))
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                               pool_size=SQLITE_POOL_SIZE, max_overflow=10)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """The process-wide engine for `url` (one connection pool per database)."""
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    """Sessions on the shared engine for `url`. Objects stay readable after commit."""
    return sessionmaker(get_engine(url), expire_on_commit=False)
