"""The app database on SQLite and a real PostgreSQL: migrations, pragmas, constraints."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from app.db import get_engine, make_engine, session_factory
from app.migrations import alembic_config, upgrade_database
from app.models import Base, Concept, MiningGeneration, Run, User


def _head() -> str:
    url = "sqlite://"
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def _make_run(session, name: str = "r1") -> Run:
    run = Run(name=name, run_dir=f"/runs/{name}", store_dir="/stores/s", n_concepts=4, k=2)
    session.add(run)
    session.flush()
    return run


def test_migrations_upgrade_empty_database_to_head(empty_db_url: str) -> None:
    engine = get_engine(empty_db_url)
    assert sa.inspect(engine).get_table_names() == []
    upgrade_database(empty_db_url)
    upgrade_database(empty_db_url)  # idempotent: a second start changes nothing
    inspector = sa.inspect(engine)
    assert set(inspector.get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == _head()
    # The migrated columns are exactly the models' columns.
    for name, table in Base.metadata.tables.items():
        assert {c["name"] for c in inspector.get_columns(name)} == set(table.columns.keys()), name
    fks = {fk["referred_table"] for fk in inspector.get_foreign_keys("runs")}
    assert fks == {"mining_generations"}


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'usae.db'}"
    upgrade_database(url)
    with get_engine(url).connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert conn.execute(sa.text("PRAGMA foreign_keys")).scalar_one() == 1


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path) -> None:
    """It holds password and audit-link hashes: mode 0600 from its creation under umask 022,
    and so are the WAL files SQLite makes beside it; an existing file keeps its mode."""
    import os
    import stat

    old_umask = os.umask(0o022)
    try:
        url = f"sqlite:///{tmp_path / 'new' / 'usae.db'}"
        upgrade_database(url)
        with get_engine(url).connect() as conn:
            conn.execute(sa.text("SELECT count(*) FROM users"))
            files = sorted((tmp_path / "new").iterdir())
            assert [f.name for f in files] == ["usae.db", "usae.db-shm", "usae.db-wal"]
            assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
        shared = tmp_path / "shared.db"
        shared.touch(mode=0o640)
        make_engine(f"sqlite:///{shared}").dispose()
        assert stat.S_IMODE(shared.stat().st_mode) == 0o640
    finally:
        os.umask(old_umask)


def test_sqlite_keeps_a_connection_per_request_thread_open(tmp_path) -> None:
    """A busy server holds one session per request thread; returning them must not close and
    reopen SQLite connections (each reopen repeats the pragmas and a schema parse)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'pool.db'}")
    opened = []
    sa.event.listen(engine, "connect", lambda *_: opened.append(1))
    for _ in range(3):  # three bursts of 32 concurrent sessions
        connections = [engine.connect() for _ in range(32)]
        for connection in connections:
            connection.execute(sa.text("SELECT 1"))
        for connection in connections:
            connection.close()
    assert len(opened) == 32
    engine.dispose()


def test_foreign_keys_are_enforced_and_cascade(db_url: str) -> None:
    Session = session_factory(db_url)
    with Session.begin() as s:
        run = _make_run(s)
        s.add(Concept(run_id=run.id, index=0))
    with pytest.raises(IntegrityError), Session.begin() as s:
        s.add(Concept(run_id=999_999, index=0))
    with Session.begin() as s:
        s.execute(sa.delete(Run))
    with Session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Concept)) == 0


def test_label_version_detects_concurrent_edits(db_url: str) -> None:
    Session = session_factory(db_url)
    with Session.begin() as s:
        run = _make_run(s)
        s.add(Concept(run_id=run.id, index=3))
    first, second = Session(), Session()
    a = first.scalars(sa.select(Concept)).one()
    b = second.scalars(sa.select(Concept)).one()
    assert a.version == b.version == 1
    a.label = "wheel"
    first.commit()
    b.label = "tyre"
    with pytest.raises(StaleDataError):
        second.commit()
    second.rollback()
    with Session() as s:
        concept = s.scalars(sa.select(Concept)).one()
        assert (concept.label, concept.version) == ("wheel", 2)
    first.close()
    second.close()


def test_tags_replace_keeps_unchanged_rows(db_url: str) -> None:
    Session = session_factory(db_url)
    with Session.begin() as s:
        run = _make_run(s)
        concept = Concept(run_id=run.id, index=0)
        concept.replace_tags(["texture", "metal"])
        s.add(concept)
    with Session.begin() as s:
        concept = s.scalars(sa.select(Concept)).one()
        concept.replace_tags(["metal", "rust", "metal"])
    with Session() as s:
        assert s.scalars(sa.select(Concept)).one().tags == ["metal", "rust"]


def test_datetimes_come_back_as_aware_utc(db_url: str) -> None:
    Session = session_factory(db_url)
    when = dt.datetime(2025, 3, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with Session.begin() as s:
        s.add(User(username="ana", password_hash="x", created_at=when))
    with Session() as s:
        got = s.scalars(sa.select(User)).one().created_at
    assert got == when and got.tzinfo == dt.timezone.utc


def test_sqlite_migrations_keep_existing_rows(tmp_path) -> None:
    """Revisions that rebuild a SQLite table must not cascade-delete the rows pointing at it."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}"
    cfg = alembic_config(url)
    with get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.exec_driver_sql("INSERT INTO runs (id, name, run_dir, store_dir, image_set, n_images, n_tokens, "
                             "n_concepts, k, config, metrics, status, created_at, updated_at) VALUES "
                             "(1, 'r', '/r', '/s', '', 0, 0, 4, 2, '{}', '{}', 'mined', '2025-01-01', '2025-01-01')")
        conn.exec_driver_sql("INSERT INTO mining_generations (id, run_id, status, params, media_prefix, started_at) "
                             "VALUES (7, 1, 'active', '{}', 'runs/1/g7', '2025-01-01')")
        conn.exec_driver_sql("INSERT INTO images (generation_id, store_index, image_key) VALUES (7, 0, 'a.png')")
        conn.exec_driver_sql("UPDATE runs SET active_generation_id = 7")
    upgrade_database(url)
    with get_engine(url).connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM images").scalar_one() == 1
        assert conn.exec_driver_sql("SELECT active_generation_id FROM runs").scalar_one() == 7
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    # A deleted generation's id is never handed out again.
    Session = session_factory(url)
    with Session.begin() as s:
        s.execute(sa.update(Run).values(active_generation_id=None))
        s.execute(sa.delete(MiningGeneration))
        s.add(MiningGeneration(run_id=1, media_prefix="x"))
    with Session() as s:
        assert s.scalars(sa.select(MiningGeneration.id)).one() == 8
    # Nor a deleted run's id (migration 0011), though the run existed before that revision.
    with Session.begin() as s:
        s.execute(sa.delete(Run))
        s.add(Run(name="r2", run_dir="/r2", store_dir="/s", n_concepts=4, k=2))
    with Session() as s:
        assert s.scalars(sa.select(Run.id)).one() == 2 and s.scalar(sa.select(sa.func.count(MiningGeneration.id))) == 0


def test_alembic_run_by_hand_keeps_rows_of_rebuilt_tables(tmp_path) -> None:
    """`alembic upgrade head` run by hand (env.py opens its own connection, foreign keys on by
    default) rebuilds `runs` in 0011 without cascading away the concepts that point at it."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'by-hand.db'}"
    cfg = alembic_config(url)
    with get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0010")
    get_engine(url).dispose()
    with session_factory(url).begin() as s:
        s.add(Concept(run_id=_make_run(s).id, index=0, label="kept"))
    command.upgrade(alembic_config(url), "head")  # no connection handed over: env.py's own
    with session_factory(url)() as s:
        assert s.scalars(sa.select(Concept.label)).all() == ["kept"]
        assert s.scalar(sa.text("SELECT version_num FROM alembic_version")) == _head()
    with get_engine(url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1


def test_text_a_database_cannot_store_is_refused_before_writing(db_url: str) -> None:
    """PostgreSQL text cannot hold NUL characters; both backends refuse them the same way, with
    nothing written, instead of SQLite storing them and Postgres failing at the flush."""
    from app.schemas.labels import LabelEdit
    from app.services.labels import update_label
    from app.services.shares import create_share
    from usae_core.errors import UsaeError

    Session = session_factory(db_url)
    with Session.begin() as s:
        run = _make_run(s)
        s.add(Concept(run_id=run.id, index=0))
        s.add(User(username="alice", password_hash="x"))
    with Session() as s:
        concept, alice, run = s.scalars(sa.select(Concept)).one(), s.scalars(sa.select(User)).one(), s.get(Run, 1)
        for edit in (LabelEdit(label="cr\x00ack", version=1), LabelEdit(description="a\x00b", version=1),
                     LabelEdit(tags=["ru\x00st"], version=1)):
            with pytest.raises(UsaeError, match="NUL"):
                update_label(s, concept=concept, editor=alice, edit=edit)
        with pytest.raises(UsaeError, match="NUL"):
            create_share(s, run=run, creator=alice, scope="run", concept_indices=[], note="Q3\x00", expires_at=None)
        assert update_label(s, concept=concept, editor=alice, edit=LabelEdit(label="crack", version=1)).version == 2
        s.commit()
