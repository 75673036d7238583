"""Label edits: history with who/when/old/new, optimistic concurrency, escaping."""

from __future__ import annotations

import re
from html import unescape

from sqlalchemy import select

from app.db import session_factory
from app.models import LabelHistory
from tests.app.webapp import PASSWORD, csrf_from, login, sign_in_as  # noqa: F401


def _indices(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'data-concept="(\d+)"', html)]


def _form(client, url: str) -> dict[str, str]:
    html = client.get(url).text
    version = re.search(r'name="version" value="(\d+)"', html).group(1)
    return {"csrf_token": csrf_from(html), "version": version}


def test_label_edit_is_recorded_in_history(web_client, seeded):
    url = f"/runs/{seeded.run.run_id}/concepts/2"
    r = web_client.post(url + "/label", follow_redirects=False, data={
        **_form(web_client, url), "label": "Hairline crack", "description": "Thin dark lines", "tags": "Defect, crack"})
    assert r.status_code == 303 and r.headers["location"] == url + "#label"
    # Opened from a list, a save without JavaScript comes back to the page in that list.
    listed = url + "?sort=entropy&min_entropy=0.5"
    action = unescape(re.search(r'<form method="post" action="([^"]+)"[^>]*id="label-form"',
                                            web_client.get(listed).text).group(1))
    assert action == url + "/label?sort=entropy&min_entropy=0.5"
    r = web_client.post(action, follow_redirects=False, data={
        **_form(web_client, url), "label": "Crack", "description": "Thin dark lines", "tags": "defect"})
    assert r.status_code == 303 and r.headers["location"] == listed + "#label"
    html = web_client.get(url).text
    history = html[html.index('id="label-history"'):]
    assert history.index("edit 2") < history.index("edit 1")  # newest first, counted from the first edit
    assert "<del>Hairline crack</del> → <ins>Crack</ins>" in history and "alice" in history
    with session_factory(seeded.settings.db_url)() as session:
        rows = session.scalars(select(LabelHistory).order_by(LabelHistory.version)).all()
    assert [(r.version, r.old_label, r.new_label) for r in rows] == [(2, "", "Hairline crack"), (3, "Hairline crack", "Crack")]
    assert rows[0].new_tags == ["crack", "defect"] and rows[1].old_tags == ["crack", "defect"]
    assert rows[1].new_tags == ["defect"] and rows[1].username == "alice" and rows[1].changed_at is not None


def test_second_writer_gets_a_conflict_not_an_overwrite(web_client, seeded, web):
    from fastapi.testclient import TestClient

    url = f"/runs/{seeded.run.run_id}/concepts/4"
    alice_form = _form(web_client, url)
    with TestClient(web.app) as bob:
        sign_in_as(bob, seeded, "bob")
        bob_form = _form(bob, url)
        assert bob.post(url + "/label", data={**bob_form, "label": "Bob's name", "description": "", "tags": ""},
                        follow_redirects=False).status_code == 303
    r = web_client.post(url + "/label", data={**alice_form, "label": "Alice's name", "description": "", "tags": ""})
    assert r.status_code == 409
    assert "bob saved this label while you were editing it" in r.text
    assert 'id="label-name">Bob&#39;s name<' in r.text  # theirs is shown ...
    assert 'value="Alice&#39;s name"' in r.text  # ... and her draft is kept in the form
    api = web_client.get(f"/api/runs/{seeded.run.run_id}/concepts/4").json()
    assert api["card"]["label"] == "Bob's name" and api["version"] == 2


def test_a_save_from_a_stale_tab_of_your_own_says_so(web_client, seeded):
    """Two tabs of one analyst: the older tab's save is a conflict that names no one else."""
    url = f"/runs/{seeded.run.run_id}/concepts/6"
    old_tab, new_tab = _form(web_client, url), _form(web_client, url)
    assert web_client.post(url + "/label", data={**new_tab, "label": "First", "description": "", "tags": ""},
                           follow_redirects=False).status_code == 303
    r = web_client.post(url + "/label", data={**old_tab, "label": "Second", "description": "", "tags": ""})
    assert r.status_code == 409
    assert "You saved this label elsewhere (another tab or window) while editing it here." in r.text
    assert "alice saved" not in r.text and 'value="Second"' in r.text


def test_htmx_save_returns_the_panel(web_client, seeded):
    url = f"/runs/{seeded.run.run_id}/concepts/5"
    r = web_client.post(url + "/label", headers={"HX-Request": "true"},
                        data={**_form(web_client, url), "label": "Weave", "description": "", "tags": ""})
    assert r.status_code == 200
    assert r.text.lstrip().startswith('<section class="panel" id="label">') and "<html" not in r.text
    assert "Label saved." in r.text and 'name="version" value="2"' in r.text


def test_label_html_is_escaped_everywhere(web_client, seeded):
    url = f"/runs/{seeded.run.run_id}/concepts/0"
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    web_client.post(url + "/label", data={**_form(web_client, url), "label": evil, "description": evil, "tags": evil[:60]})
    for page in (url, f"/runs/{seeded.run.run_id}/concepts", f"/runs/{seeded.run.run_id}", url.replace("/0", "/1")):
        html = web_client.get(page).text
        assert "<script>alert" not in html and "<img src=x" not in html, page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in web_client.get(url).text
    # The browser card's tooltip (the whole label, which the card cuts short) is escaped too.
    browser = web_client.get(f"/runs/{seeded.run.run_id}/concepts?sort=index").text
    assert 'title="&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"' in browser


def test_label_api_with_versions(web_client, seeded):
    base = f"/api/runs/{seeded.run.run_id}/concepts/7/label"
    csrf = web_client.get("/api/auth/csrf").json()["csrf_token"]
    headers = {"X-CSRF-Token": csrf}
    r = web_client.put(base, json={"label": "Edge", "tags": ["Edge ", "edge", "line"], "version": 1}, headers=headers)
    assert r.status_code == 200 and r.json() == {"index": 7, "label": "Edge", "description": "", "tags": ["edge", "line"],
                                                 "version": 2}
    stale = web_client.put(base, json={"label": "Other", "version": 1}, headers=headers)
    assert stale.status_code == 409 and stale.json()["current"]["label"] == "Edge"
    assert web_client.put(base, json={"label": "Other", "version": 2}).status_code == 403  # no CSRF header
    too_long = web_client.put(base, json={"label": "x" * 201, "version": 2}, headers=headers)
    assert too_long.status_code == 422
    nul = web_client.put(base, json={"label": "Ed\x00ge", "version": 2}, headers=headers)
    assert nul.status_code == 422 and "NUL" in nul.json()["detail"]
    page = web_client.get(f"/runs/{seeded.run.run_id}/concepts/7").text
    form = web_client.post(f"/runs/{seeded.run.run_id}/concepts/7/label", data={
        "csrf_token": csrf_from(page), "version": "2", "label": "Edge", "tags": "edge, li\x00ne"})
    assert form.status_code == 422 and "NUL character" in form.text


def test_browser_search_and_tag_filter(web_client, seeded):
    run = seeded.run
    for index, label, tags in [(3, "Rust streak", "defect, rust"), (6, "Fabric weave", "texture")]:
        page = web_client.get(f"/runs/{run.run_id}/concepts/{index}").text
        r = web_client.post(f"/runs/{run.run_id}/concepts/{index}/label", follow_redirects=False, data={
            "csrf_token": csrf_from(page), "version": "1", "label": label, "description": "", "tags": tags})
        assert r.status_code == 303
    assert _indices(web_client.get(f"/runs/{run.run_id}/concepts?q=STREAK").text) == [3]
    for q in ("6", "%236", " 6 "):  # a concept number, with or without '#', finds that concept
        assert _indices(web_client.get(f"/runs/{run.run_id}/concepts?q={q}").text) == [6], q
    assert _indices(web_client.get(f"/runs/{run.run_id}/concepts?q={10**30}").text) == []  # beyond any index
    assert _indices(web_client.get(f"/runs/{run.run_id}/concepts?q=%25").text) == []  # LIKE wildcards are literal
    assert _indices(web_client.get(f"/runs/{run.run_id}/concepts?tag=texture").text) == [6]
    assert sorted(_indices(web_client.get(f"/runs/{run.run_id}/concepts?labelled=labelled").text)) == [3, 6]
    api = web_client.get(f"/api/runs/{run.run_id}/concepts", params={"tag": "rust"}).json()
    assert [c["index"] for c in api["concepts"]] == [3] and api["tags"] == ["defect", "rust", "texture"]


def test_an_empty_search_says_whether_hidden_dead_concepts_would_match(web_client, seeded):
    run = seeded.run
    dead = run.dead[0]
    csrf = web_client.get("/api/auth/csrf").json()["csrf_token"]
    r = web_client.put(f"/api/runs/{run.run_id}/concepts/{dead}/label", json={"label": "Ghost", "version": 1},
                       headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    page = web_client.get(f"/runs/{run.run_id}/concepts?q=ghost").text
    assert "No concept matches" in page and "1 dead concept would" in page
    assert "that match the filters below" in page and "Every concept of" not in page
    include = unescape(re.search(r'href="([^"]+)" id="include-dead"', page).group(1))
    assert include == f"/runs/{run.run_id}/concepts?q=ghost&show_dead=1"
    assert _indices(web_client.get(include).text) == [dead]
    nothing = web_client.get(f"/runs/{run.run_id}/concepts?q=no-such-word").text
    assert "dead concept" not in nothing  # no hint that would not help, only the way back
    assert re.search(rf'No concept matches these filters.\s*<a href="/runs/{run.run_id}/concepts" id="clear-filters">', nothing)
    assert "Every concept of" in web_client.get(f"/runs/{run.run_id}/concepts?sort=index&page=2").text


def test_counts_follow_a_new_mining_generation(web_client, seeded):
    """Match counts are cached per active generation; a re-mine (new generation, new
    statistics) shows the new count at once."""
    from sqlalchemy import update

    from app.models import Concept, MiningGeneration, Run

    run = seeded.run
    count = lambda: web_client.get(f"/api/runs/{run.run_id}/concepts", params={"min_entropy": 0.5}).json()["total"]  # noqa: E731
    assert count() == len(run.universal)
    with session_factory(seeded.settings.db_url)() as session:
        session.execute(update(Concept).where(Concept.run_id == run.run_id, Concept.index == run.universal[0])
                        .values(dead=True))
        generation = MiningGeneration(run_id=run.run_id, status="active", media_prefix=run.media_prefix)
        session.add(generation)
        session.flush()
        session.execute(update(Run).where(Run.id == run.run_id).values(active_generation_id=generation.id))
        session.commit()
    assert count() == len(run.universal) - 1
