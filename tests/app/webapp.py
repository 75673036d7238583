"""Fixtures for the web tests: a seeded data directory (real SQLite file + media files) and a
TestClient on `create_app`, plus helpers to sign in and to read CSRF tokens from pages.

tests/app/conftest.py registers the fixtures; test modules import only the helpers.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from app.db import get_engine, session_factory
from app.main import create_app
from app.migrations import upgrade_database
from app.security import SESSION_COOKIE
from app.settings import Settings
from tests.app.seed import PASSWORD, SeedRun, create_analyst, seed_run



@dataclass
class Seeded:
    data_dir: Path
    settings: Settings
    run: SeedRun
    other: SeedRun
    """A second run: share links of `run` must not reach it."""
    session_cookies: dict[str, str]
    """Signed session cookie of each analyst (argon2 makes signing in cost ~0.4 s, so tests
    sign in once and reuse the cookie; same secret key, same user ids in every copy)."""


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, secret_key="test-secret-key-for-signing-cookies", database_url=None)


@pytest.fixture(scope="session")
def seeded_template(tmp_path_factory) -> Seeded:
    """Built once: migrated DB with analysts alice and bob and two mined runs."""
    data_dir = tmp_path_factory.mktemp("web-template") / "usae-data"
    settings = _settings(data_dir)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url)() as session:
        create_analyst(session, "alice")
        create_analyst(session, "bob")
        run = seed_run(session, settings.media_dir, name="demo-run")
        other = seed_run(session, settings.media_dir, name="other-run", n_concepts=6, seed=1)
        session.commit()
    cookies = {}
    with TestClient(create_app(settings)) as client:
        for name in ("alice", "bob"):
            client.cookies.clear()
            login(client, name)
            cookies[name] = client.cookies[SESSION_COOKIE]
    get_engine(settings.db_url).dispose()
    return Seeded(data_dir, settings, run, other, cookies)


def _copy(template: Seeded, data_dir: Path) -> Seeded:
    """The database is copied; media files are hard-linked (fast, and no test rewrites them)."""
    shutil.copytree(template.data_dir, data_dir, copy_function=os.link, ignore=shutil.ignore_patterns("usae.db*"))
    shutil.copyfile(template.data_dir / "usae.db", data_dir / "usae.db")
    return Seeded(data_dir, _settings(data_dir), template.run, template.other, template.session_cookies)


@pytest.fixture
def seeded(seeded_template: Seeded, tmp_path: Path) -> Iterator[Seeded]:
    """A private copy of the seeded data directory for one test."""
    copy = _copy(seeded_template, tmp_path / "usae-data")
    yield copy
    get_engine(copy.settings.db_url).dispose()


@pytest.fixture(scope="module")
def reader(seeded_template: Seeded, tmp_path_factory) -> Iterator[tuple[TestClient, Seeded]]:
    """One app and client (signed in as alice) for a whole module of tests that only read."""
    copy = _copy(seeded_template, tmp_path_factory.mktemp("web-reader") / "usae-data")
    with TestClient(create_app(copy.settings), base_url="http://testserver") as client:
        yield sign_in_as(client, copy, "alice"), copy
    get_engine(copy.settings.db_url).dispose()


@pytest.fixture
def web(seeded: Seeded) -> Iterator[TestClient]:
    """A client (not signed in) on the seeded app; the lifespan (migrations) runs."""
    with TestClient(create_app(seeded.settings), base_url="http://testserver") as client:
        yield client


@pytest.fixture
def web_client(web: TestClient, seeded: Seeded) -> TestClient:
    """Signed in as alice."""
    return sign_in_as(web, seeded, "alice")


def sign_in_as(client: TestClient, seeded: Seeded, username: str) -> TestClient:
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, seeded.session_cookies[username])
    return client


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "page has no CSRF field"
    return match.group(1)


def login(client: TestClient, username: str, password: str = PASSWORD) -> None:
    token = csrf_from(client.get("/login").text)
    response = client.post("/login", data={"username": username, "password": password, "csrf_token": token,
                                           "next": "/runs"}, follow_redirects=False)
    assert response.status_code == 303, response.text
