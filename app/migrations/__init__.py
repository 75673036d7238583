"""Alembic migrations of the app database; `upgrade_database(url)` brings any database to head."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from app.db import get_engine

log = logging.getLogger(__name__)

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def alembic_config(url: str) -> Config:
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent))
    # ConfigParser interpolation would choke on '%' in passwords.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def foreign_keys_off(connection: Connection) -> Iterator[None]:
    """SQLite alters a table by rebuilding it; with foreign keys on, dropping the old copy
    would cascade-delete every row that references it. So migrations run with them off (the
    pragma only takes effect outside a transaction, hence around it) and `env.run_on` checks
    that none dangles before committing. A no-op on other databases."""
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    try:
        yield
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()


def upgrade_database(url: str) -> None:
    """Create or upgrade the database at `url` to the newest schema (idempotent)."""
    cfg = alembic_config(url)
    with get_engine(url).connect() as connection:
        # Every command opens the database this way: one read, when it is current already.
        current = MigrationContext.configure(connection).get_current_revision()
        connection.rollback()
        head = ScriptDirectory.from_config(cfg).get_current_head()
        if current == head:
            return
        with foreign_keys_off(connection), connection.begin():
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
    log.info("database %s %s", connection.engine.url.render_as_string(hide_password=True),
             f"upgraded from revision {current} to {head}" if current else f"created (revision {head})")
