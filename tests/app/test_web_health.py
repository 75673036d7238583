"""`/healthz`, which the Docker image's HEALTHCHECK and load balancers call."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import _free_port


def test_healthz_answers_without_sign_in_and_reveals_no_data(web):
    r = web.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "ok"}
    assert r.headers["cache-control"] == "no-store"
    assert "/healthz" not in web.get("/openapi.json").text  # not part of the documented API


def test_healthz_says_503_when_the_database_is_unreachable(tmp_path, caplog):
    """A Postgres URL on a port nothing listens on: the server is up, its database is not."""
    url = f"postgresql+psycopg://usae@127.0.0.1:{_free_port()}/usae?connect_timeout=2"
    settings = Settings(data_dir=tmp_path / "data", secret_key="k" * 32, database_url=url)
    client = TestClient(create_app(settings))  # no lifespan: start-up would stop on the same error
    with caplog.at_level(logging.ERROR, logger="app.routes.health"):
        r = client.get("/healthz")
    assert r.status_code == 503 and r.json() == {"status": "unavailable", "database": "unreachable"}
    assert "127.0.0.1" not in r.text and "database unreachable (OperationalError)" in caplog.text
