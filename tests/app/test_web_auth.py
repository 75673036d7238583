"""Signing in: passwords, the signed session, CSRF on every write, throttling."""

from __future__ import annotations

import re
import time

import pytest
from fastapi.routing import iter_route_contexts
from sqlalchemy import select

from app.db import get_engine, session_factory
from app.models import User
from app.security import SESSION_COOKIE, verify_password
from usae_core.errors import UsaeError
from tests.app.webapp import PASSWORD, csrf_from, login, sign_in_as  # noqa: F401


def test_login_sets_session_and_logout_ends_it(web):
    page = web.get("/login?next=/runs/1/compare")
    r = web.post("/login", follow_redirects=False, data={
        "username": "ALICE", "password": PASSWORD, "csrf_token": csrf_from(page.text), "next": "/runs/1/compare"})
    assert r.status_code == 303 and r.headers["location"] == "/runs/1/compare"
    cookie = r.cookies[SESSION_COOKIE]
    assert PASSWORD not in cookie and "alice" not in cookie.lower()
    assert web.get("/api/auth/me").json()["username"] == "alice"
    runs = web.get("/runs")
    r = web.post("/logout", data={"csrf_token": csrf_from(runs.text)}, follow_redirects=False)
    assert r.status_code == 303
    assert web.get("/api/auth/me").status_code == 401
    # A copy of the signed cookie (another device, or one taken before sign-out) ends with it.
    web.cookies.set(SESSION_COOKIE, cookie)
    assert web.get("/api/auth/me").status_code == 401
    assert web.get("/runs", follow_redirects=False).status_code == 303


def test_signing_out_ends_every_session_of_that_analyst_only(web, seeded):
    sign_in_as(web, seeded, "bob")
    token = web.get("/api/auth/csrf").json()["csrf_token"]
    assert web.post("/api/auth/logout", headers={"X-CSRF-Token": token}).status_code == 204
    for name, still_in in (("bob", False), ("alice", True)):
        sign_in_as(web, seeded, name)
        assert (web.get("/api/auth/me").status_code == 200) is still_in, name
    web.cookies.clear()
    login(web, "bob")  # a new sign-in works at once
    assert web.get("/api/auth/me").json()["username"] == "bob"


def test_wrong_password_and_unknown_user_look_the_same(web):
    token = csrf_from(web.get("/login").text)
    wrong = web.post("/login", data={"username": "alice", "password": "nope-nope", "csrf_token": token})
    nobody = web.post("/login", data={"username": "mallory", "password": "nope-nope", "csrf_token": token})
    assert wrong.status_code == nobody.status_code == 401
    assert "do not match" in wrong.text and "do not match" in nobody.text
    # The name stays filled in and the cursor waits in the password field, to type it again.
    assert re.search(r'<input id="password"[^>]* autofocus>', wrong.text) and 'value="alice"' in wrong.text
    assert not re.search(r'<input id="username"[^>]* autofocus>', wrong.text)
    assert re.search(r'<input id="username"[^>]* autofocus>', web.get("/login").text)
    assert web.get("/api/auth/me").status_code == 401


def test_tampered_session_cookie_is_ignored(web, seeded):
    good = seeded.session_cookies["alice"]
    web.cookies.set(SESSION_COOKIE, good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB"))
    assert web.get("/api/auth/me").status_code == 401


def test_login_needs_csrf_token(web):
    web.get("/login")
    r = web.post("/login", data={"username": "alice", "password": PASSWORD})
    assert r.status_code == 403
    assert web.get("/api/auth/me").status_code == 401


def test_open_redirect_is_refused(web):
    token = csrf_from(web.get("/login").text)
    r = web.post("/login", follow_redirects=False, data={
        "username": "alice", "password": PASSWORD, "csrf_token": token, "next": "//evil.example/x"})
    assert r.headers["location"] == "/runs"


def test_login_rate_limit_per_ip_and_name(seeded):
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = seeded.settings.model_copy(update={"login_attempts_per_minute": 3})
    with TestClient(create_app(settings)) as client:
        token = csrf_from(client.get("/login").text)
        codes = [client.post("/login", data={"username": "bob", "password": "wrong-guess", "csrf_token": token})
                 .status_code for _ in range(4)]
        assert codes == [401, 401, 401, 429]
        # Even the right password is refused while throttled ...
        r = client.post("/login", data={"username": "bob", "password": PASSWORD, "csrf_token": token})
        assert r.status_code == 429 and "Try again in" in r.text
        # ... but another account from the same address is not affected.
        r = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token},
                        follow_redirects=False)
        assert r.status_code == 303


def test_concurrent_sign_ins_cannot_pass_the_limit_together(seeded):
    """Attempts arriving together while argon2 runs each take a place first: exactly the limit
    gets through, however many race (before, 36 of 40 concurrent wrong passwords were checked)."""
    import threading

    from app.services.sign_in_throttle import LoginThrottle

    throttle = LoginThrottle(session_factory(seeded.settings.db_url), per_name=10, per_address=50)
    start, allowed, lock = threading.Barrier(40), [], threading.Lock()

    def attempt() -> None:
        start.wait()
        if throttle.begin("10.0.0.1", "alice") == 0:
            with lock:
                allowed.append(1)

    threads = [threading.Thread(target=attempt) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 10 and throttle.begin("10.0.0.1", "alice") > 0
    throttle.succeeded("10.0.0.1", "alice")  # the right password clears the name's places
    assert throttle.begin("10.0.0.1", "alice") == 0


def test_every_server_process_counts_the_same_attempts(seeded):
    """Two processes' throttles on one database (as `usae serve` runs one per core) share the
    window: before, each process allowed the limit on its own."""
    from app.services.sign_in_throttle import LoginThrottle

    a, b = (LoginThrottle(session_factory(seeded.settings.db_url), per_name=4, per_address=20) for _ in range(2))
    assert a.name_key("10.0.0.1", "Alice ") == b.name_key("10.0.0.1", "alice")
    assert [a.begin("10.0.0.1", "Alice "), b.begin("10.0.0.1", "alice"), a.begin("10.0.0.1", "alice"),
            b.begin("10.0.0.1", "ALICE")] == [0, 0, 0, 0]
    assert a.begin("10.0.0.1", "alice") > 0 and b.begin("10.0.0.1", "alice") > 0


def test_the_throttle_stores_little_per_name_and_forgets_old_attempts(web, seeded):
    """Huge user names cost the throttle one 64-character digest each, and attempts that left
    the window are deleted as new ones arrive."""
    import datetime as dt

    from app.models import SignInAttempt

    token = web.get("/api/auth/csrf").json()["csrf_token"]
    for i in range(3):
        r = web.post("/api/auth/login", json={"username": f"{i}" + "x" * 500_000, "password": "wrong-guess"},
                     headers={"X-CSRF-Token": token})
        assert r.status_code == 401
    sessions = session_factory(seeded.settings.db_url)
    with sessions() as session:
        stored = session.scalars(select(SignInAttempt.key_hash)).all()
    throttle = web.app.state.login_throttle
    names = {throttle.name_key("testclient", f"{i}" + "x" * 500_000) for i in range(3)}
    assert set(stored) == names | {throttle.address_key("testclient")} and {len(k) for k in stored} == {64}
    throttle.window = dt.timedelta(milliseconds=50)
    time.sleep(0.1)
    assert throttle.begin("10.0.0.2", "carol") == 0
    with sessions() as session:
        assert sorted(session.scalars(select(SignInAttempt.key_hash)).all()) == sorted(
            [throttle.name_key("10.0.0.2", "carol"), throttle.address_key("10.0.0.2")])


def test_one_address_trying_many_names_is_throttled_too(seeded):
    """Spraying one password over many names from one address hits the per-address limit
    (before, 48 names from one address were all checked); other addresses are not affected,
    and an IPv6 client counts by its /64."""
    from app.services.sign_in_throttle import LoginThrottle, client_network

    throttle = LoginThrottle(session_factory(seeded.settings.db_url), per_name=3, per_address=5)
    assert [throttle.begin("10.0.0.7", f"name{i}") for i in range(5)] == [0] * 5
    assert throttle.begin("10.0.0.7", "name5") > 0 and throttle.begin("10.0.0.7", "name0") > 0
    assert throttle.begin("10.0.0.8", "name0") == 0
    throttle.succeeded("10.0.0.7", "name0")  # signing in gives back the name's places, not the address's
    assert throttle.begin("10.0.0.7", "name0") > 0
    assert client_network("2001:db8:1:2:aaaa::1") == client_network("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_network("::ffff:10.0.0.7") == "10.0.0.7" and client_network("testclient") == "testclient"
    # A port or brackets a proxy left on the address do not make each connection count apart.
    assert client_network("10.0.0.7:5678") == "10.0.0.7"
    assert client_network("[2001:db8:1:2::5]:443") == client_network("[2001:db8:1:2::6]") == "2001:db8:1:2::/64"
    assert [throttle.begin(f"2001:db8:1:2::{i}", "alice") for i in range(3)] == [0, 0, 0]
    assert throttle.begin("2001:db8:1:2:ffff::9", "alice") > 0  # the same /64
    assert throttle.begin("2001:db8:1:3::1", "alice") == 0  # the next /64


def test_a_refused_attempt_waits_until_the_place_it_needs_frees(seeded, monkeypatch):
    """Over its limit, a key waits for the attempt whose leaving brings it under the limit."""
    import datetime as dt

    from app.services import sign_in_throttle
    from app.services.sign_in_throttle import LoginThrottle

    now = dt.datetime(2026, 12, 5, 12, 0, 0, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(sign_in_throttle, "utcnow", lambda: now)
    throttle = LoginThrottle(session_factory(seeded.settings.db_url), per_name=3, per_address=50)
    for ago in (50, 40, 30):  # three attempts at -50 s, -40 s and -30 s: the key is full
        now = dt.datetime(2026, 12, 5, 12, 0, 0, tzinfo=dt.timezone.utc) - dt.timedelta(seconds=ago)
        assert throttle.begin("10.0.0.9", "zed") == 0
    now = dt.datetime(2026, 12, 5, 12, 0, 0, tzinfo=dt.timezone.utc)
    assert throttle.begin("10.0.0.9", "zed") == 10  # the -50 s attempt leaves the window in 10 s
    now += dt.timedelta(seconds=9.5)
    assert throttle.begin("10.0.0.9", "zed") == 1  # whole seconds, rounded up
    now += dt.timedelta(seconds=0.5)
    assert throttle.begin("10.0.0.9", "zed") == 0


def test_sign_ins_queueing_too_long_for_a_password_check_are_told_to_retry(web, monkeypatch):
    """Checks run a few at a time; one that waits past PASSWORD_CHECK_WAIT_S is refused (429)
    rather than holding a thread, and it gave its database connection back while waiting."""
    from app.services import users

    monkeypatch.setattr(users, "PASSWORD_CHECK_WAIT_S", 0.05)
    token = web.get("/api/auth/csrf").json()["csrf_token"]
    for _ in range(users.PASSWORD_CHECKS):
        assert users._password_checks.acquire(timeout=1)
    try:
        r = web.post("/api/auth/login", json={"username": "alice", "password": PASSWORD},
                     headers={"X-CSRF-Token": token})
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
    finally:
        for _ in range(users.PASSWORD_CHECKS):
            users._password_checks.release()
    r = web.post("/api/auth/login", json={"username": "alice", "password": PASSWORD}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200


def test_names_no_account_can_have_and_huge_passwords_are_refused_without_a_check(web, seeded, monkeypatch):
    """They cost no argon2 check (64 MiB and ~0.2 s of a core each), and set_password refuses
    a password sign-in would refuse."""
    from app.services import users

    calls = []
    monkeypatch.setattr(users, "verify_password", lambda *args: calls.append(1) or verify_password(*args))
    token = web.get("/api/auth/csrf").json()["csrf_token"]
    for body in ({"username": "no such name!", "password": "wrong-guess"},
                 {"username": "alice", "password": PASSWORD + "x" * 1024}):
        r = web.post("/api/auth/login", json=body, headers={"X-CSRF-Token": token})
        assert r.status_code == 401
    assert calls == []
    r = web.post("/api/auth/login", json={"username": "nobody", "password": "wrong-guess"},
                 headers={"X-CSRF-Token": token})
    assert r.status_code == 401 and calls == [1]  # an unknown but possible name costs a check
    with session_factory(seeded.settings.db_url)() as session:
        with pytest.raises(UsaeError, match="at most 1024"):
            users.set_password(session, username="alice", password="y" * 1025)


def test_api_login_flow(web):
    token = web.get("/api/auth/csrf").json()["csrf_token"]
    assert web.post("/api/auth/login", json={"username": "alice", "password": PASSWORD}).status_code == 403
    r = web.post("/api/auth/login", json={"username": "alice", "password": PASSWORD},
                 headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json()["username"] == "alice"
    assert web.get("/api/runs").status_code == 200


@pytest.mark.parametrize("method, path, body", [
    ("post", "/runs/1/concepts/0/label", {"version": "1", "label": "x"}),
    ("post", "/shares", {"run_id": "1", "scope": "run"}),
    ("post", "/shares/1/revoke", {}),
    ("post", "/logout", {}),
])
def test_every_form_write_needs_the_csrf_token(web_client, method, path, body):
    r = getattr(web_client, method)(path, data=body, follow_redirects=False)
    assert r.status_code == 403
    r = getattr(web_client, method)(path, data={**body, "csrf_token": "forged"}, follow_redirects=False)
    assert r.status_code == 403


def test_every_write_route_requires_an_analyst(web):
    """Walk the app's routes: every POST/PUT/PATCH/DELETE except signing in/out refuses a visitor."""
    open_writes = {"/login", "/logout", "/api/auth/login", "/api/auth/logout"}
    writes = [(m, route.path) for route in iter_route_contexts(web.app.routes) for m in route.methods or ()
              if m in {"POST", "PUT", "PATCH", "DELETE"} and route.path not in open_writes]
    assert len(writes) >= 7
    for method, path in writes:
        url = path.replace("{run_id}", "1").replace("{index}", "0").replace("{share_id}", "1").replace("{token}", "x")
        r = web.request(method, url, follow_redirects=False)
        assert r.status_code in (303, 401), (method, path, r.status_code)


def test_user_add_command(seeded, monkeypatch):
    from typer.testing import CliRunner

    from app.cli import cli

    monkeypatch.setattr("app.commands.web._stdin_is_a_terminal", lambda: True)  # typed, not piped
    runner = CliRunner()
    r = runner.invoke(cli, ["user", "add", "carol", "--password", "s3cret-pass", "--data-dir", str(seeded.data_dir)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["user", "add", "dave", "--data-dir", str(seeded.data_dir)],
                      input="another-pass\nanother-pass\n")
    assert r.exit_code == 0 and "Password:" in r.output and "Repeat for confirmation:" in r.output, r.output
    assert "another-pass" not in r.output  # hidden as typed
    r = runner.invoke(cli, ["user", "add", "carol", "--password", "whatever-1", "--data-dir", str(seeded.data_dir)])
    assert r.exit_code != 0 and "already exists" in str(r.exception)  # `usae` prints UsaeError as one line
    r = runner.invoke(cli, ["user", "add", "erin", "--password", "short", "--data-dir", str(seeded.data_dir)])
    assert r.exit_code != 0 and "at least 8" in str(r.exception)
    with session_factory(seeded.settings.db_url)() as session:
        users = {u.username: u for u in session.scalars(select(User))}
    assert verify_password(users["carol"].password_hash, "s3cret-pass")
    assert verify_password(users["dave"].password_hash, "another-pass")
    assert users["carol"].password_hash.startswith("$argon2id$") and "erin" not in users


def test_a_password_can_come_on_standard_input_and_none_is_a_clear_error(seeded):
    """Scripts send it on a pipe (kept out of the process list); with nothing there the command
    said `Aborted.` after a getpass warning naming a stdlib file."""
    import subprocess
    import sys

    def add(name: str, stdin: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", "user", "add", name, "--data-dir", str(seeded.data_dir)],
                              input=stdin, capture_output=True, text=True, timeout=120)

    done = add("frank", "piped-password-1\n")
    assert done.returncode == 0 and "created analyst 'frank'" in done.stdout, done.stderr
    with session_factory(seeded.settings.db_url)() as session:
        frank = session.scalars(select(User).where(User.username == "frank")).one()
    assert verify_password(frank.password_hash, "piped-password-1")
    empty = add("gina", "")
    assert empty.returncode == 2 and "Warning" not in empty.stderr
    assert empty.stderr.strip() == "error: no password: pass --password, type it at a terminal, or send it on standard input"


def test_user_set_password_ends_sessions_and_user_list_names_the_analysts(web, seeded, monkeypatch):
    """A reset takes effect at once: the new password signs in, the old one and every cookie
    issued before the reset stop working."""
    from typer.testing import CliRunner

    from app.cli import cli

    monkeypatch.setattr("app.commands.web._stdin_is_a_terminal", lambda: True)  # typed, not piped
    runner = CliRunner()
    where = ["--data-dir", str(seeded.data_dir)]
    sign_in_as(web, seeded, "alice")
    assert web.get("/api/auth/me").status_code == 200
    r = runner.invoke(cli, ["user", "set-password", "Alice", *where], input="brand-new-pass\nbrand-new-pass\n")
    assert r.exit_code == 0 and "New password:" in r.output, r.output
    assert web.get("/api/auth/me").status_code == 401  # the cookie from before the reset
    web.cookies.clear()
    for password, works in ((PASSWORD, False), ("brand-new-pass", True)):
        token = csrf_from(web.get("/login").text)
        r = web.post("/login", data={"username": "alice", "password": password, "csrf_token": token, "next": "/runs"},
                     follow_redirects=False)
        assert (r.status_code == 303) is works, (password, r.status_code)
    r = runner.invoke(cli, ["user", "set-password", "nobody", "--password", "long-enough-1", *where])
    assert r.exit_code != 0 and "no analyst named 'nobody'" in str(r.exception)
    r = runner.invoke(cli, ["user", "set-password", "bob", "--password", "short", *where])
    assert r.exit_code != 0 and "at least 8" in str(r.exception)
    with session_factory(seeded.settings.db_url)() as session:
        bob = session.scalar(select(User).where(User.username == "bob"))
        assert verify_password(bob.password_hash, PASSWORD)  # a refused reset changed nothing
    r = runner.invoke(cli, ["user", "list", *where])
    assert r.exit_code == 0 and r.output.split() == ["alice", "bob"]


def test_session_cookie_is_https_only_when_configured(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    for secure in (False, True):
        settings = Settings(data_dir=tmp_path / f"d{secure}", secret_key="s", secure_cookies=secure)
        with TestClient(create_app(settings), base_url="https://testserver") as client:
            response = client.get("/login")
            cookie = response.headers.get("set-cookie", "")
            assert "usae" in cookie.lower() or "session" in cookie.lower(), cookie
            assert ("secure" in cookie.lower()) == secure, cookie


def test_serving_beyond_this_machine_without_secure_cookies_is_warned_about():
    from app.commands.web import plain_http_warning

    for host in ("127.0.0.1", "localhost", "::1"):
        assert plain_http_warning(host, secure_cookies=False) is None
    assert "USAE_SECURE_COOKIES=true" in plain_http_warning("0.0.0.0", secure_cookies=False)
    assert plain_http_warning("0.0.0.0", secure_cookies=True) is None


def test_signing_in_starts_a_fresh_session(web):
    """A CSRF token handed out before sign-in (one an attacker may have planted) stops working after it."""
    before = web.get("/api/auth/csrf").json()["csrf_token"]
    r = web.post("/api/auth/login", json={"username": "alice", "password": PASSWORD}, headers={"X-CSRF-Token": before})
    assert r.status_code == 200
    after = web.get("/api/auth/csrf").json()["csrf_token"]
    assert after != before
    assert web.post("/logout", data={"csrf_token": before}, follow_redirects=False).status_code == 403
    assert web.get("/api/auth/me").json()["username"] == "alice"  # still signed in
    assert web.post("/logout", data={"csrf_token": after}, follow_redirects=False).status_code == 303


def test_the_session_cookie_lasts_14_days_and_is_same_site_lax(web):
    """Signing in sets usae_session with Max-Age 14 days and SameSite=Lax (docs/web.md), HttpOnly."""
    from http.cookies import SimpleCookie

    token = csrf_from(web.get("/login").text)
    r = web.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": token, "next": "/runs"},
                 follow_redirects=False)
    assert r.status_code == 303
    cookie = SimpleCookie(r.headers["set-cookie"])[SESSION_COOKIE]
    assert cookie["max-age"] == str(14 * 24 * 3600)
    assert cookie["samesite"].lower() == "lax"
    assert cookie["httponly"] is True


def test_the_demo_password_is_private_from_its_first_byte_and_not_printed_once_changed(tmp_path, monkeypatch):
    import os
    import stat

    from app.migrations import upgrade_database
    from app.pipeline import ensure_analyst
    from app.services.users import set_password
    from app.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", secret_key="k", database_url=None)
    upgrade_database(settings.db_url)
    created = []
    real_fchmod = os.fchmod
    with monkeypatch.context() as m:
        # the mode the file has while its bytes are written: fchmod runs before the write
        m.setattr(os, "fchmod", lambda fd, mode: created.append(mode) or real_fchmod(fd, mode))
        old_umask = os.umask(0o022)
        try:
            name, password = ensure_analyst(settings)
        finally:
            os.umask(old_umask)
    secret = settings.data_dir / "demo-credentials.txt"
    assert created == [0o600] and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert password and ensure_analyst(settings) == (name, password)  # a rerun prints it again
    with session_factory(settings.db_url).begin() as session:
        set_password(session, username=name, password="a-new-password")
    assert ensure_analyst(settings) == (name, None)  # no longer the password: not printed


def test_the_sign_in_page_says_when_the_explorer_has_no_accounts(web, tmp_path):
    """`usae serve` started away from the demo's folder serves a new, empty data directory: the
    sign-in page says no accounts exist and how to add one, where a sign-in attempt would only
    say the password is wrong."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    assert "data-no-accounts" not in web.get("/login").text  # accounts exist: nothing said
    empty = Settings(data_dir=tmp_path / "elsewhere", secret_key="test-secret-key-for-signing-cookies",
                     database_url=None)
    with TestClient(create_app(empty), base_url="http://testserver") as client:
        page = client.get("/login").text
        assert "data-no-accounts" in page and "usae user add NAME" in page and "--data-dir" in page
        failed = client.post("/login", data={"username": "analyst", "password": "not-the-one",
                                              "csrf_token": csrf_from(page)})
        assert failed.status_code == 401 and "data-no-accounts" in failed.text
    get_engine(empty.db_url).dispose()
