"""Alembic environment: runs migrations on the connection `upgrade_database` hands over, or
on an engine for the configured URL when alembic is run by hand."""

from __future__ import annotations

from alembic import context

from app.db import make_engine
from app.migrations import foreign_keys_off
from app.models import Base

config = context.config
target_metadata = Base.metadata


def run_on(connection) -> None:
    # Batch mode lets ALTERs work on SQLite (it rebuilds the table).
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
        if connection.dialect.name == "sqlite":  # rebuilt tables ran with foreign keys off (foreign_keys_off)
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"migration left dangling foreign keys: {broken[:5]}")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    with engine.connect() as conn, foreign_keys_off(conn):
        run_on(conn)
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run against a database")
run_migrations_online()
