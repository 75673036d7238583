"""The rendered-page cache: edits show at once, 304 for unchanged pages, and no page is ever
served to a viewer it was not made for."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import session_factory
from app.lru import LruCache
from app.models import Concept, MiningGeneration, Run, User
from app.schemas.labels import LabelEdit
from app.services.labels import update_label
from app.services.runs_view import get_run
from app.services.shares import create_share
from tests.app.webapp import csrf_from, sign_in_as


def _urls(seeded) -> tuple[str, str]:
    """The concept browser sorted by index, and the page of concept 2."""
    run_id = seeded.run.run_id
    return f"/runs/{run_id}/concepts?sort=index", f"/runs/{run_id}/concepts/2"


def _card_title(html: str, index: int) -> str:
    card = html[html.index(f'data-concept="{index}"'):]
    return re.search(r'<div class="title">\s*<strong[^>]*>(.*?)</strong>', card, re.S).group(1)


def _label_name(html: str) -> str:
    return re.search(r'id="label-name">(.*?)</div>', html, re.S).group(1)


def _label_elsewhere(seeded, index: int, label: str) -> None:
    """Edit a label the way another server process would: straight through the database."""
    with session_factory(seeded.settings.db_url)() as session:
        concept = session.scalar(select(Concept).where(Concept.run_id == seeded.run.run_id, Concept.index == index))
        bob = session.scalar(select(User).where(User.username == "bob"))
        update_label(session, concept=concept, editor=bob,
                     edit=LabelEdit(label=label, description="", tags=[], version=concept.version))
        session.commit()


def test_a_label_edit_shows_at_once_on_the_browser_and_the_concept_page(web_client, seeded):
    browser, page = _urls(seeded)
    first = web_client.get(page)
    assert web_client.get(page).text == first.text  # the second one comes from the cache
    assert "Unlabelled" in _card_title(web_client.get(browser).text, 2)
    web_client.post(page + "/label", follow_redirects=False, data={
        "csrf_token": csrf_from(first.text), "version": re.search(r'name="version" value="(\d+)"', first.text).group(1),
        "label": "Fresh scratch", "description": "", "tags": "scratch"})
    assert _label_name(web_client.get(page).text) == "Fresh scratch"
    html = web_client.get(browser).text
    assert _card_title(html, 2) == "Fresh scratch" and '<option value="scratch"' in html
    _label_elsewhere(seeded, 2, "Renamed by bob")
    assert _label_name(web_client.get(page).text) == "Renamed by bob"
    assert _card_title(web_client.get(browser).text, 2) == "Renamed by bob"


def test_a_new_mining_generation_shows_at_once(web_client, seeded):
    browser, _ = _urls(seeded)
    first = seeded.run.universal[0]
    assert f'data-concept="{first}"' in web_client.get(browser).text
    with session_factory(seeded.settings.db_url)() as session:
        session.execute(update(Concept).where(Concept.run_id == seeded.run.run_id, Concept.index == first)
                        .values(dead=True))
        generation = MiningGeneration(run_id=seeded.run.run_id, status="active", media_prefix=seeded.run.media_prefix)
        session.add(generation)
        session.flush()
        session.execute(update(Run).where(Run.id == seeded.run.run_id).values(active_generation_id=generation.id))
        session.commit()
    assert f'data-concept="{first}"' not in web_client.get(browser).text


def test_unchanged_pages_are_not_modified(web_client, seeded):
    for url in _urls(seeded):
        r = web_client.get(url)
        etag = r.headers["etag"]
        assert r.headers["cache-control"] == "private, no-cache"
        again = web_client.get(url, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    _label_elsewhere(seeded, 2, "Changed")
    for url in _urls(seeded):
        r = web_client.get(url, headers={"If-None-Match": etag})
        assert r.status_code == 200 and r.headers["etag"] != etag


def test_a_page_kept_from_another_version_of_the_app_is_sent_again(web_client, seeded, monkeypatch):
    """An upgraded server (other templates, styles or code) never answers 304 to a page the
    browser kept from the old one: the app's fingerprint is part of the ETag."""
    from app import page_cache

    url = _urls(seeded)[0]
    etag = web_client.get(url).headers["etag"]
    assert web_client.get(url, headers={"If-None-Match": etag}).status_code == 304
    monkeypatch.setattr(page_cache, "BUILD", "another-version")
    r = web_client.get(url, headers={"If-None-Match": etag})
    assert r.status_code == 200 and r.headers["etag"] != etag


def test_the_apps_fingerprint_covers_its_templates_styles_and_code(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from app import page_cache

    root = tmp_path / "copy"
    for folder in ("app", "templates", "static"):
        shutil.copytree(Path(page_cache.__file__).resolve().parent.parent / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "vendor"))
    monkeypatch.setattr(page_cache, "__file__", str(root / "app" / "page_cache.py"))
    first = page_cache._build_fingerprint()
    assert page_cache._build_fingerprint() == first  # the same files, the same fingerprint
    for changed in ("templates/base.html", "static/app.css", "app/services/concepts.py"):
        path = root / changed
        path.write_text(path.read_text() + "\n")
        assert page_cache._build_fingerprint() != first, changed
        first = page_cache._build_fingerprint()


@pytest.mark.parametrize("scope", ["run", "concepts"])
def test_share_holders_and_other_analysts_never_get_a_page_made_for_someone_else(web_client, seeded, scope):
    browser, page = _urls(seeded)
    alice_pages = {url: web_client.get(url) for url in (browser, page)}
    for r in alice_pages.values():
        assert "Signed in as </span><strong>alice</strong>" in r.text
    with session_factory(seeded.settings.db_url)() as session:
        run = get_run(session, run_id=seeded.run.run_id)
        alice = session.scalar(select(User).where(User.username == "alice"))
        prefix = create_share(session, run=run, creator=alice, scope=scope, concept_indices=[2, 3], note="Audit",
                              expires_at=None).url
        session.commit()
    with TestClient(web_client.app) as holder:
        for url, alice_page in alice_pages.items():
            r = holder.get(prefix + url, headers={"If-None-Match": alice_page.headers["etag"]})
            assert r.status_code == 200 and "etag" not in r.headers
            assert "Read-only audit view shared by" in r.text
            assert "Signed in as" not in r.text and "csrf_token" not in r.text and 'id="label-form"' not in r.text
            assert all(href.startswith(prefix) for href in re.findall(r'href="(/[^"]*)"', r.text)
                       if not href.startswith("/static/")), "links leave the share"
        with TestClient(web_client.app) as bob:
            sign_in_as(bob, seeded, "bob")
            for url, alice_page in alice_pages.items():
                r = bob.get(url, headers={"If-None-Match": alice_page.headers["etag"]})
                assert r.status_code == 200 and "Signed in as </span><strong>bob</strong>" in r.text
                assert csrf_from(r.text) != csrf_from(alice_page.text)


def test_lru_cache_keeps_the_recently_used_within_its_capacity():
    cache: LruCache[bytes] = LruCache(10, weigh=len)
    cache.put("a", b"1234")
    cache.put("b", b"1234")
    assert cache.get("a") == b"1234"  # now the most recently used
    cache.put("c", b"1234")  # 12 > 10: "b", the least recently used, goes
    assert cache.get("b") is None and cache.get("a") == b"1234" and cache.get("c") == b"1234"
    cache.put("huge", b"x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and cache.get("a") == b"1234"
    cache.put("a", b"12345678")  # replacing a value re-weighs it
    assert cache.get("c") is None and cache.get("a") == b"12345678"
