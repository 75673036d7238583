"""`/healthz`, which the Docker image's HEALTHCHECK and load balancers call, and the security headers."""

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


def test_every_response_carries_the_security_headers(web, seeded):
    """Pages, static files, errors and API answers: no framing, no sniffing, no Referer (a share
    link's URL is its token), scripts only from this site; /docs alone may run its inline script."""
    for path in ("/login", "/static/app.js", "/runs", "/healthz", "/no-such-page", "/api/auth/csrf",
                 f"/s/{'x' * 43}/runs/1"):
        headers = web.get(path, follow_redirects=False).headers
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "no-referrer", path
        policy = headers["content-security-policy"]
        assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy, (path, policy)
    assert "script-src 'self' 'unsafe-inline'" in web.get("/docs").headers["content-security-policy"]
    assert web.get("/healthz").headers["cache-control"] == "no-store"  # the endpoint's own headers stay


def test_the_secret_key_file_is_private_from_the_start_and_one_for_all_processes(tmp_path):
    """Made with mode 0600 (never briefly world-readable under umask 022), and server processes
    starting together all read the one key that won, not each its own."""
    import os
    import stat
    import threading

    old_umask = os.umask(0o022)
    try:
        keys, start = [], threading.Barrier(16)

        def resolve() -> None:
            start.wait()
            keys.append(Settings(data_dir=tmp_path / "data", secret_key=None).resolved_secret_key())

        threads = [threading.Thread(target=resolve) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.umask(old_umask)
    path = tmp_path / "data" / "secret_key"
    assert len(set(keys)) == 1 and keys[0] == path.read_text().strip() and len(keys[0]) >= 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret_key"]  # no temporary files left
