"""Audit links: unguessable, hashed, read-only, exactly their scope, revocable, expiring."""

from __future__ import annotations

import datetime as dt
import hashlib
import re

import secrets
from html import unescape
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import session_factory
from app.models import Concept, ConceptTopImage, Image, Run, ShareLink
from app.services.shares import list_shares
from tests.app.webapp import PASSWORD, csrf_from, login, sign_in_as  # noqa: F401


def _create(client, seeded, **fields) -> str:
    """Create a link through the form (its answer redirects to the page that shows the link
    once); returns its path."""
    page = client.get("/shares").text
    r = client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id), **fields})
    assert r.status_code == 200 and [h.status_code for h in r.history] == [303], r.text
    return re.search(r'id="share-url" value="http://testserver(/s/[^"]+)"', r.text).group(1)


def _link_count(seeded) -> int:
    with session_factory(seeded.settings.db_url)() as session:
        return len(session.scalars(select(ShareLink.id)).all())


@pytest.fixture
def holder(web):
    """A fresh client with no session, like a manager opening the link."""
    with TestClient(web.app) as client:
        yield client


def test_token_is_long_random_and_stored_only_as_a_hash(web_client, seeded):
    path = _create(web_client, seeded, scope="run", note="Q3 audit")
    token = path.removeprefix("/s/")
    assert len(token) >= 43  # 32 random bytes, URL-safe base64: 256 bits
    with session_factory(seeded.settings.db_url)() as session:
        link = session.scalar(select(ShareLink))
    assert link.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in (link.token_hash, link.note)
    second = _create(web_client, seeded, scope="run")
    assert second != path


def test_run_link_shows_the_run_read_only(web_client, holder, seeded):
    run = seeded.run
    web_client.post(f"/runs/{run.run_id}/concepts/0/label", data={
        "csrf_token": csrf_from(web_client.get(f"/runs/{run.run_id}/concepts/0").text), "version": "1",
        "label": "Shiny rim", "description": "", "tags": ""})
    path = _create(web_client, seeded, scope="run", note="For the steering meeting")
    r = holder.get(path)
    assert r.status_code == 200 and str(r.url).endswith(f"{path}/runs/{run.run_id}")
    assert "For the steering meeting" in r.text and "alice" in r.text
    assert 'id="filters"' in holder.get(f"{path}/runs/{run.run_id}/concepts").text  # a whole run keeps its filters
    concept = holder.get(f"{path}/runs/{run.run_id}/concepts/0")
    assert "Shiny rim" in concept.text
    assert 'id="label-form"' not in concept.text and "csrf_token" not in concept.text
    # CAM images are shown with what they are, never the controls; no panel where there are none.
    assert 'id="cam"' in concept.text and "Make CAM images" not in concept.text and "Make one" not in concept.text
    no_cam = holder.get(f"{path}/runs/{run.run_id}/concepts/3").text
    assert 'id="cam"' not in no_cam
    assert "No CAM image yet" not in no_cam and 'class="cam-slot"' not in no_cam  # no empty slot per model
    assert concept.text.count('class="cam-slot"') == len(run.models)  # one has an image: all columns say
    compare = holder.get(f"{path}/runs/{run.run_id}/compare")
    assert compare.status_code == 200 and 'class="heat mini"' in compare.text
    for img in re.findall(r'<img (?:class="layer" )?src="([^"]+)"', concept.text + compare.text):
        assert img.startswith(path + "/media/"), img
        assert holder.get(img).status_code == 200
    assert holder.cookies.get("usae_session") is None  # holders get no session
    # Refused: edits, the analyst pages, other runs.
    assert holder.post(f"/runs/{run.run_id}/concepts/0/label", data={"version": "2", "label": "x"},
                       follow_redirects=False).status_code == 303  # to the log-in form
    assert holder.post(f"{path}/runs/{run.run_id}/concepts/0/label", data={"label": "x"}).status_code in (404, 405)
    assert holder.get("/shares", follow_redirects=False).status_code == 303
    assert holder.get(f"{path}/runs/{seeded.other.run_id}").status_code == 404
    assert holder.get(f"{path}/runs/{seeded.other.run_id}/concepts/0").status_code == 404


def test_concept_link_shows_only_its_concepts(web_client, holder, seeded):
    run = seeded.run
    path = _create(web_client, seeded, scope="concepts", concepts="0, 3")
    landing = holder.get(path)
    assert str(landing.url).endswith(f"{path}/runs/{run.run_id}/concepts")
    # Without the overview's captions, the page explains its terms, unfolded, on both pages.
    for text in (landing.text, holder.get(f"{path}/runs/{run.run_id}/concepts/0").text):
        assert '<details class="reading-guide" id="reading-guide" open>' in text and "Firing entropy</dt>" in text
    assert sorted(int(i) for i in re.findall(r'data-concept="(\d+)"', landing.text)) == [0, 3]
    assert 'id="filters"' not in landing.text  # two concepts need no search or filters
    assert holder.get(f"{path}/runs/{run.run_id}/concepts?show_dead=1&per_page=200").text.count("data-concept=") == 2
    page = holder.get(f"{path}/runs/{run.run_id}/concepts/0").text
    assert f'rel="next" href="{path}/runs/{run.run_id}/concepts/3"' in page  # prev/next stay inside the set
    assert f"/concepts/1" not in page  # neighbour 1 is outside the set: not linked
    for url in (f"{path}/runs/{run.run_id}/concepts/1", f"{path}/runs/{run.run_id}",
                f"{path}/runs/{run.run_id}/compare", f"/api{path}/runs/{run.run_id}/concepts/1"):
        assert holder.get(url).status_code == 404, url
    overview = holder.get(f"{path}/runs/{run.run_id}").text  # the link's own run: say why, not "no such run"
    assert "shares only some concepts of this run" in overview and "No such run" not in overview
    assert "shares only some concepts" not in holder.get(f"{path}/runs/{seeded.other.run_id}").text  # another run
    outside = holder.get(f"{path}/runs/{run.run_id}/concepts/1")  # the error page leads back, and only there
    assert f'id="back-to-shared-view" href="{path}"' in outside.text and "Back to the runs" not in outside.text
    assert "This audit link shares only concepts 0, 3 of this run." in outside.text
    assert 'class="share-banner"' in outside.text and "Read-only audit view shared by" in outside.text  # still its page
    assert f'class="brand" href="{path}"' in outside.text
    assert "set-cookie" not in outside.headers  # a holder gets no session, not even on an error page
    assert holder.get(path, follow_redirects=False).status_code == 303  # ... to a page that opens
    api = holder.get(f"/api{path}").json()
    assert api["scope"] == "concepts" and api["concept_indices"] == [0, 3]


def test_share_media_stays_in_scope(web_client, holder, seeded):
    run, other = seeded.run, seeded.other
    path = _create(web_client, seeded, scope="concepts", concepts="0")
    inside = f"{run.media_prefix}/heatmaps/0/vit_s-0.png"
    outside_concept = f"{run.media_prefix}/heatmaps/2/vit_s-0.png"
    other_run = f"{other.media_prefix}/heatmaps/0/vit_s-0.png"
    assert holder.get(f"{path}/media/{inside}").status_code == 200
    assert holder.get(f"{path}/media/{run.cam_path}").status_code == 200
    with session_factory(seeded.settings.db_url)() as session:  # concept 0's top images' enlarged views, and others'
        gen = session.scalar(select(Run.active_generation_id).where(Run.id == run.run_id))
        top_of_0 = select(ConceptTopImage.image_id).join(Concept, Concept.id == ConceptTopImage.concept_id).where(
            Concept.run_id == run.run_id, Concept.index == 0, ConceptTopImage.generation_id == gen)
        views_of_0 = session.scalars(select(Image.view_path).where(Image.id.in_(top_of_0),
                                                                   Image.view_path.is_not(None))).all()
        views_elsewhere = session.scalars(select(Image.view_path).where(
            Image.generation_id == gen, Image.id.not_in(top_of_0), Image.view_path.is_not(None))).all()
    assert views_of_0 and views_elsewhere
    assert all(holder.get(f"{path}/media/{view}").status_code == 200 for view in views_of_0)
    assert holder.get(f"{path}/media/{views_elsewhere[0]}").status_code == 404
    assert holder.get(f"{path}/media/{outside_concept}").status_code == 404
    assert holder.get(f"{path}/media/{other_run}").status_code == 404
    assert holder.get(f"{path}/media/{other.cam_path}").status_code == 404
    assert holder.get(f"/media/{inside}", follow_redirects=False).status_code == 303  # analyst route: log in
    run_path = _create(web_client, seeded, scope="run")
    assert holder.get(f"{run_path}/media/{outside_concept}").status_code == 200
    assert holder.get(f"{run_path}/media/{other_run}").status_code == 404


def test_revoked_link_says_so(web_client, holder, seeded):
    path = _create(web_client, seeded, scope="run")
    assert holder.get(path).status_code == 200
    with session_factory(seeded.settings.db_url)() as session:
        share_id = session.scalar(select(ShareLink.id))
    listing = web_client.get("/shares").text
    assert f'id="share-{share_id}" data-status="active"' in listing
    r = web_client.post(f"/shares/{share_id}/revoke", data={"csrf_token": csrf_from(listing)}, follow_redirects=False)
    assert r.status_code == 303
    gone = holder.get(path)
    assert gone.status_code == 410 and "This audit link was revoked on" in gone.text
    assert "Ask whoever shared it with you for a new link." in gone.text  # what the holder can do now
    assert holder.get(f"{path}/runs/{seeded.run.run_id}/concepts/0").status_code == 410
    assert holder.get(f"/api{path}").status_code == 410
    assert f'id="share-{share_id}" data-status="revoked"' in web_client.get("/shares").text


def test_a_new_link_is_built_on_the_public_address_when_one_is_set(web_client, seeded, monkeypatch):
    """Unset, the link names the address the analyst's browser used; set, never a Host header
    that a misconfigured proxy let through."""
    page = web_client.get("/shares").text
    form = {"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id), "scope": "run"}
    r = web_client.post("/shares", data=form, headers={"Host": "evil.example"})
    assert 'value="http://evil.example/s/' in r.text
    settings = web_client.app.state.settings
    monkeypatch.setattr(web_client.app.state, "settings", settings.model_copy(update={"public_url": "https://usae.example.com/x/"}))
    r = web_client.post("/shares", data=form, headers={"Host": "evil.example"})
    assert r.status_code == 200 and 'value="https://usae.example.com/x/s/' in r.text and "evil" not in r.text
    with pytest.raises(ValueError, match="public_url"):
        type(settings)(data_dir=settings.data_dir, public_url="usae.example.com")


def test_browsers_keep_no_copy_of_a_link_or_its_pages(web_client, holder, seeded):
    """A revoked link's pages must not come back from history or the back/forward cache, nor
    the page that shows a new link's token once."""
    page = web_client.get("/shares").text
    created = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id),
                                                "scope": "run"})
    assert created.status_code == 200 and created.headers["cache-control"] == "no-store"
    assert created.history[0].headers["cache-control"] == "no-store"  # the POST's redirect too
    assert web_client.get(str(created.url)).headers["cache-control"] == "no-store"  # and the page once shown
    path = re.search(r'id="share-url" value="http://testserver(/s/[^"]+)"', created.text).group(1)
    run = seeded.run.run_id
    for url in (f"{path}/runs/{run}", f"{path}/runs/{run}/concepts", f"{path}/runs/{run}/concepts/0",
                f"{path}/runs/{run}/concepts.csv", f"/api{path}", f"/api{path}/runs/{run}/concepts/0"):
        r = holder.get(url)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store", url
    image = re.search(r'<img (?:class="layer" )?src="([^"]+)"', holder.get(f"{path}/runs/{run}/concepts/0").text).group(1)
    assert holder.get(image).headers["cache-control"] == "private, no-cache"  # revalidated on every use
    assert "no-store" not in web_client.get(f"/runs/{run}").headers.get("cache-control", "")  # analysts' pages may be kept


def test_expired_link_says_so(web_client, holder, seeded):
    tomorrow = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).date().isoformat()
    path = _create(web_client, seeded, scope="run", expires_on=tomorrow)
    assert holder.get(path).status_code == 200
    with session_factory(seeded.settings.db_url)() as session:
        session.execute(update(ShareLink).values(expires_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)))
        session.commit()
    gone = holder.get(path)
    assert gone.status_code == 410 and "This audit link expired on" in gone.text
    assert 'data-status="expired"' in web_client.get("/shares").text


def test_unknown_token_is_404(holder):
    for token in ("A" * 43, "A" * 5000):
        assert holder.get("/s/" + token).status_code == 404
        assert holder.get(f"/api/s/{token}/runs/1/concepts").status_code == 404
    # The page offers no "Back to the shared view": that view is this same 404.
    for path in ("/s/" + "A" * 43, f"/s/{'A' * 43}/runs/1/concepts"):
        page = holder.get(path)
        assert page.status_code == 404 and "no audit link at this address" in page.text
        assert "ask whoever shared it with you for the link again" in page.text  # what the holder can do
        assert "back-to-shared-view" not in page.text and "Back to the runs" not in page.text, path


def test_bad_share_requests_get_clear_messages(web_client, seeded):
    page = web_client.get("/shares").text
    for fields, message in [({"scope": "concepts", "concepts": ""}, "choose at least one concept"),
                            ({"scope": "concepts", "concepts": "1, 9999"}, "has no concept 9999"),
                            ({"scope": "concepts", "concepts": "one"}, "whole numbers"),
                            ({"scope": "run", "expires_on": "2001-01-01"}, "the expiry is in the past")]:
        r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id), **fields})
        assert r.status_code == 422 and message in r.text.lower(), fields  # shown as a sentence


def test_listed_concepts_with_whole_run_chosen_are_not_shared_as_the_run(web_client, seeded):
    """Concept numbers typed while "the whole run" stays chosen would share far more than the
    analyst listed: refused with the choice spelled out, nothing created, the numbers kept."""
    page = web_client.get("/shares").text
    r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id),
                                         "scope": "run", "concepts": "3, 0"})
    assert r.status_code == 422 and "only these concepts" in r.text and 'value="3, 0"' in r.text
    assert 'id="shares"' not in r.text  # no link was made
    r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id),
                                         "scope": "run", "concepts": "  "})
    assert r.status_code == 200 and r.history and "the whole run" in r.text


def test_every_link_expires_within_a_year(web_client, seeded):
    headers = {"X-CSRF-Token": web_client.get("/api/auth/csrf").json()["csrf_token"]}
    now = dt.datetime.now(dt.timezone.utc)
    r = web_client.post("/api/shares", json={"run_id": seeded.run.run_id}, headers=headers)
    assert r.status_code == 201
    expires = dt.datetime.fromisoformat(r.json()["expires_at"])
    assert abs(expires - (now + dt.timedelta(days=30))) < dt.timedelta(minutes=5)
    # The form proposes the same default and offers no day past the limit.
    today = now.date()
    form = web_client.get("/shares").text
    assert f'value="{today + dt.timedelta(days=30)}" min="{today}" max="{today + dt.timedelta(days=364)}"' in form
    for too_late in ("9999-12-31T23:00:00-05:00", (now + dt.timedelta(days=366)).isoformat()):
        r = web_client.post("/api/shares", json={"run_id": seeded.run.run_id, "expires_at": too_late}, headers=headers)
        assert r.status_code == 422 and "at most 365 days" in r.json()["detail"], too_late
    r = web_client.post("/shares", data={"csrf_token": csrf_from(form), "run_id": str(seeded.run.run_id),
                                         "scope": "run", "expires_on": str(today + dt.timedelta(days=400))})
    assert r.status_code == 422 and "at most 365 days" in r.text


def test_a_link_shows_at_most_500_concepts(web_client, seeded):
    """POST /api/shares with 501 concepts is refused with 422 naming the limit; 500 are accepted."""
    from tests.app.seed import seed_run

    with session_factory(seeded.settings.db_url)() as session:
        big = seed_run(session, seeded.settings.media_dir, name="big-run", n_concepts=501, write_files=False)
        session.commit()
    headers = {"X-CSRF-Token": web_client.get("/api/auth/csrf").json()["csrf_token"]}
    body = {"run_id": big.run_id, "scope": "concepts"}
    r = web_client.post("/api/shares", json={**body, "concept_indices": list(range(501))}, headers=headers)
    assert r.status_code == 422 and "at most 500 concepts" in r.json()["detail"]
    r = web_client.post("/api/shares", json={**body, "concept_indices": list(range(500))}, headers=headers)
    assert r.status_code == 201 and r.json()["concept_indices"] == list(range(500))


def test_a_link_valid_until_a_day_works_through_the_end_of_that_day_utc(web_client, holder, seeded):
    """The form's expires_on=D gives a link that expires at D 23:59:59 UTC; today itself is accepted."""
    today = dt.datetime.now(dt.timezone.utc).date()
    for day in (today, today + dt.timedelta(days=10)):
        path = _create(web_client, seeded, scope="run", expires_on=day.isoformat())
        expires = dt.datetime.fromisoformat(holder.get(f"/api{path}").json()["expires_at"])
        assert expires == dt.datetime.combine(day, dt.time(23, 59, 59), dt.timezone.utc), day


def test_share_api(web_client, holder, seeded):
    headers = {"X-CSRF-Token": web_client.get("/api/auth/csrf").json()["csrf_token"]}
    r = web_client.post("/api/shares", json={"run_id": seeded.run.run_id, "scope": "concepts",
                                             "concept_indices": [3, 1, 3], "note": "two concepts"}, headers=headers)
    assert r.status_code == 201
    created = r.json()
    assert created["concept_indices"] == [1, 3] and created["status"] == "active"
    body = holder.get(f"/api{created['url']}/runs/{seeded.run.run_id}/concepts").json()
    # The browser's default order, energy highest first: seeded concept 3 has more energy than concept 1.
    assert [c["index"] for c in body["concepts"]] == [3, 1]
    listed = web_client.get("/api/shares").json()
    assert [s["id"] for s in listed] == [created["id"]] and "token" not in listed[0]
    revoked = web_client.post(f"/api/shares/{created['id']}/revoke", headers=headers).json()
    assert revoked["status"] == "revoked"
    assert holder.get(f"/api{created['url']}/runs/{seeded.run.run_id}/concepts").status_code == 410


def test_a_mine_that_did_not_finish_is_told_to_analysts_not_to_link_holders(web_client, holder, seeded):
    from app.models import Run

    run_id = seeded.run.run_id
    with session_factory(seeded.settings.db_url)() as s:
        s.execute(update(Run).where(Run.id == run_id).values(
            error="a re-mine was interrupted (KeyboardInterrupt) <at /srv/x>"))
        s.commit()
    analyst = web_client.get(f"/runs/{run_id}").text
    note = analyst[analyst.index('id="last-mine-error"'):]
    assert "did not finish.</strong>" in note and "These pages show the mine of" in note
    assert "(KeyboardInterrupt) &lt;at /srv/x&gt;" in note  # escaped
    path = _create(web_client, seeded, scope="run")
    shared = holder.get(f"{path}/runs/{run_id}").text
    assert "last-mine-error" not in shared and "KeyboardInterrupt" not in shared  # internals stay inside


def test_the_list_of_links_names_the_concepts_a_link_shows(web_client, seeded):
    """A concept link's row names its first six concepts with their labels (escaped), each
    linking to the concept, says how many more, and the htmx revoke answer keeps them."""
    run = seeded.run.run_id
    page = web_client.get(f"/runs/{run}/concepts/2").text
    web_client.post(f"/runs/{run}/concepts/2/label", data={
        "csrf_token": csrf_from(page), "version": "1", "label": "<b>Crack</b> & dent", "description": "", "tags": ""})
    _create(web_client, seeded, scope="concepts", concepts="9, 2, 4, 5, 6, 7, 8, 1")
    listing = web_client.get("/shares").text
    row = re.search(r'<tr id="share-(\d+)".*?</tr>', listing, re.S)
    assert "8 concepts" in row.group(0)
    named = re.findall(r'<a href="/runs/\d+/concepts/(\d+)">#\d+</a> (.*?)</li>', row.group(0))
    assert [int(i) for i, _ in named] == [1, 2, 4, 5, 6, 7]  # stored sorted; the first six
    assert dict(named)["2"] == "&lt;b&gt;Crack&lt;/b&gt; &amp; dent"
    assert dict(named)["1"] == '<span class="muted">unlabelled</span>'
    assert "and 2 more" in row.group(0) and "<b>Crack</b>" not in listing
    # Labels are per run: concept 2 of another run, labelled there, leaves this run's unlabelled one alone.
    from app.services.shares import listed_concept_labels
    from tests.app.seed import seed_run

    with session_factory(seeded.settings.db_url)() as session:
        other = seed_run(session, seeded.settings.media_dir, name="third-run", n_concepts=10, write_files=False)
        session.execute(update(Concept).where(Concept.run_id == other.run_id, Concept.index.in_([1, 2]))
                        .values(label="Other run's label"))
        session.commit()
        shares = list_shares(session)
        labels = listed_concept_labels(session, shares)
    assert labels == {(run, 2): "<b>Crack</b> & dent"}
    revoked = web_client.post(f"/shares/{row.group(1)}/revoke", data={"csrf_token": csrf_from(listing)},
                              headers={"HX-Request": "true"}).text
    assert 'data-status="revoked"' in revoked and "&lt;b&gt;Crack&lt;/b&gt; &amp; dent" in revoked


def test_the_expiry_field_names_its_day_in_words(web_client, seeded):
    """A date field shows the browser's own format (01/04/2027 is ambiguous): the line under it
    names the default day, and a form sent back with an error names the day it was sent with
    (nothing for a value that is no date)."""
    from app.templating import _day_in_words

    today = dt.datetime.now(dt.timezone.utc).date()
    page = web_client.get("/shares").text
    assert f"Works through {today + dt.timedelta(days=30):%a %d %b %Y}, 23:59 UTC." in page
    later = today + dt.timedelta(days=400)
    r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id),
                                         "scope": "run", "expires_on": later.isoformat()})
    assert r.status_code == 422 and f"Works through {later:%a %d %b %Y}, 23:59 UTC." in r.text
    assert _day_in_words("2027-01-04") == "Mon 04 Jan 2027"
    assert _day_in_words("04/01/2027") == "" and _day_in_words("") == ""


def test_creating_a_link_redirects_and_a_reload_creates_nothing(web_client, seeded):
    """Post/Redirect/Get: the form's answer is a 303 to a page that shows the new link's address
    once. Reloading that page (or going back to it) creates no second link and never shows the
    address again, but says the link exists and where it is listed."""
    page = web_client.get("/shares").text
    r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id),
                                         "scope": "concepts", "concepts": "0, 3", "note": "Reload me"},
                        follow_redirects=False)
    with session_factory(seeded.settings.db_url)() as session:
        share_id = session.scalar(select(ShareLink.id))
    assert r.status_code == 303 and r.headers["location"] == f"/shares/{share_id}/created"
    assert "/s/" not in r.text
    with session_factory(seeded.settings.db_url)() as session:  # kept sealed for the page, in the database
        handed_off = session.get(ShareLink, share_id).handoff
    assert handed_off
    # Another site's link to the page (the cookie is SameSite=Lax, so it goes along) leaves the
    # address for the creator's own load.
    elsewhere = web_client.get(r.headers["location"], headers={"Sec-Fetch-Site": "cross-site"},
                               follow_redirects=False)
    assert elsewhere.status_code == 303 and elsewhere.headers["location"] == f"/shares#share-{share_id}"
    with session_factory(seeded.settings.db_url)() as session:
        assert session.get(ShareLink, share_id).handoff == handed_off
    shown = web_client.get(r.headers["location"], headers={"Sec-Fetch-Site": "same-origin"})
    assert shown.status_code == 200 and "<h1>Audit link created</h1>" in shown.text
    token = re.search(r'id="share-url" value="http://testserver/s/([^"]+)"', shown.text).group(1)
    with session_factory(seeded.settings.db_url)() as session:
        link = session.get(ShareLink, share_id)
        assert link.token_hash == hashlib.sha256(token.encode()).hexdigest()
        assert (link.handoff, link.handoff_until) == (None, None)  # taken as shown
    assert token not in handed_off and "set-cookie" not in r.headers  # sealed in its row; no cookie carries it
    assert "can read 2 concepts of" in shown.text
    for _ in range(2):  # reload: nothing created, nothing revealed, and the page says why
        again = web_client.get(r.headers["location"])
        assert again.status_code == 200 and again.headers["cache-control"] == "no-store"
        assert token not in again.text and 'id="share-url"' not in again.text
        assert "<h1>Audit link already created</h1>" in again.text
        assert "its address was shown only once" in again.text and f'href="/shares#share-{share_id}"' in again.text
        assert "Reload me" in again.text
    assert _link_count(seeded) == 1
    assert web_client.get("/shares/999/created").status_code == 404


def test_a_new_links_address_is_shown_only_to_its_creator_and_only_soon(web_client, seeded, monkeypatch):
    """The hand-off is bound to the analyst who created the link and to the link, and expires:
    another analyst, another link's page, or a redirect followed too late shows no address."""
    import app.routes.shares as shares_routes

    page = web_client.get("/shares").text
    form = {"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id), "scope": "run"}
    first = web_client.post("/shares", data=form, follow_redirects=False).headers["location"]
    second = web_client.post("/shares", data=form, follow_redirects=False).headers["location"]
    alice = web_client.cookies.get("usae_session")
    bob = sign_in_as(web_client, seeded, "bob").get(first)
    assert bob.status_code == 200 and 'id="share-url"' not in bob.text and "shown only once" in bob.text
    web_client.cookies.clear()
    web_client.cookies.set("usae_session", alice)
    assert 'id="share-url"' in web_client.get(second).text  # each link's page takes its own hand-off
    assert 'id="share-url"' in web_client.get(first).text  # bob's look took nothing from alice
    monkeypatch.setattr(shares_routes, "HANDOFF_SECONDS", -1)  # a redirect followed after its deadline
    late = web_client.get(web_client.post("/shares", data=form, follow_redirects=False).headers["location"])
    assert 'id="share-url"' not in late.text and "shown only once" in late.text


def test_a_stale_copy_of_the_session_cookie_neither_loses_nor_repeats_the_address(web_client, seeded):
    """A response of the same session that was in flight while the link was made (another tab's
    polling) sets the session cookie as it was before the POST: the hand-off is not in the
    cookie, so the address is still shown, once."""
    page = web_client.get("/shares")
    before = web_client.cookies.get("usae_session")
    made = web_client.post("/shares", data={"csrf_token": csrf_from(page.text), "run_id": str(seeded.run.run_id),
                                            "scope": "run"}, follow_redirects=False)
    assert made.status_code == 303 and "set-cookie" not in made.headers
    web_client.get("/shares")  # another page of the session, answered meanwhile
    web_client.cookies.set("usae_session", before)
    assert 'id="share-url"' in web_client.get(made.headers["location"]).text
    web_client.cookies.set("usae_session", before)
    again = web_client.get(made.headers["location"]).text
    assert 'id="share-url"' not in again and "shown only once" in again


def test_sealed_tokens_open_only_with_their_key_and_context():
    from app.services.shares import open_token, seal_token

    token, key = secrets.token_urlsafe(32), secrets.token_bytes(32)
    sealed = seal_token(key, token, context="1|csrf|7")
    assert token not in sealed and seal_token(key, token, context="1|csrf|7") != sealed  # a fresh nonce each time
    assert open_token(key, sealed, context="1|csrf|7") == token
    assert open_token(key, sealed, context="2|csrf|7") != token
    assert open_token(secrets.token_bytes(32), sealed, context="1|csrf|7") != token
    assert open_token(key, "not base64!", context="x") is None and open_token(key, None, context="x") is None


def test_a_new_links_address_is_revealed_only_to_its_creator_with_its_own_token(seeded):
    from app.models import User
    from app.services.shares import create_share, reveal_share, revoke_share

    with session_factory(seeded.settings.db_url)() as session:
        alice, bob = (session.scalar(select(User).where(User.username == name)) for name in ("alice", "bob"))
        run = session.get(Run, seeded.run.run_id)
        made = create_share(session, run=run, creator=alice, scope="run", concept_indices=[], note="", expires_at=None)
        other = create_share(session, run=run, creator=alice, scope="run", concept_indices=[], note="", expires_at=None)
        session.commit()
        revealed = reveal_share(session, share_id=made.id, creator_id=alice.id, token=made.token)
        assert revealed is not None and revealed.url == made.url
        assert reveal_share(session, share_id=made.id, creator_id=bob.id, token=made.token) is None  # not its creator
        assert reveal_share(session, share_id=made.id, creator_id=alice.id, token=other.token) is None  # another's token
        assert reveal_share(session, share_id=10**6, creator_id=alice.id, token=made.token) is None
        revoke_share(session, share_id=made.id)
        session.commit()
        assert reveal_share(session, share_id=made.id, creator_id=alice.id, token=made.token) is None  # revoked


def test_expired_and_revoked_links_offer_no_revoke_button(web_client, seeded):
    for _ in range(3):
        _create(web_client, seeded, scope="run")
    with session_factory(seeded.settings.db_url)() as session:
        expired, revoked, active = session.scalars(select(ShareLink.id).order_by(ShareLink.id)).all()
        session.execute(update(ShareLink).where(ShareLink.id == expired).values(
            expires_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)))
        session.execute(update(ShareLink).where(ShareLink.id == revoked).values(revoked_at=dt.datetime.now(dt.timezone.utc)))
        session.commit()
    listing = web_client.get("/shares").text
    rows = dict(re.findall(r'<tr id="share-(\d+)" data-status="(\w+)"', listing))
    assert rows == {str(expired): "expired", str(revoked): "revoked", str(active): "active"}
    assert f'action="/shares/{active}/revoke"' in listing
    assert f"/shares/{expired}/revoke" not in listing and f"/shares/{revoked}/revoke" not in listing


def _share_button(html: str) -> str:
    return unescape(re.search(r'<a class="button" id="share-list" href="([^"]+)"', html).group(1))


def test_share_these_concepts_shares_the_whole_filtered_list(web_client, seeded):
    """The browser's button leads to the form filled in with every concept of its list, on all
    pages (not only the page shown), in the list's own filters."""
    run = seeded.run.run_id
    browser = web_client.get(f"/runs/{run}/concepts?per_page=2&sort=index&min_entropy=0.1&page=2").text
    listed = web_client.get(f"/api/runs/{run}/concepts?per_page=200&sort=index&min_entropy=0.1").json()
    expected = sorted(c["index"] for c in listed["concepts"])
    assert listed["total"] == len(expected) > 2
    assert f"every concept in this list, on all its pages ({len(expected)})" in browser
    href = _share_button(browser)
    assert not re.search(r"[?&]page=", href)  # the list, not one of its pages
    form = web_client.get(href).text
    assert re.search(r'id="concepts" value="([^"]*)"', form).group(1) == ", ".join(map(str, expected))
    assert 'value="concepts" id="scope-concepts" checked' in form
    assert f"all {len(expected)} concepts of its list, on every page" in form
    # A list emptied since (by an edit elsewhere) fills nothing in and says so; bad filters are refused.
    empty = web_client.get(f"/shares?run={run}&browser=1&q=no-such-label-anywhere").text
    assert re.search(r'id="concepts" value=""', empty) and "list is empty now" in empty
    assert web_client.get(f"/shares?run={run}&browser=1&min_entropy=7").status_code == 400


def test_a_list_longer_than_a_link_allows_says_so(web_client, seeded):
    """More than 500 concepts: the first 500 in the list's order are filled in, and the form says
    that the rest are left out, never silently."""
    from tests.app.seed import seed_run

    with session_factory(seeded.settings.db_url)() as session:
        big = seed_run(session, seeded.settings.media_dir, name="big-run", n_concepts=520, write_files=False)
        session.commit()
    form = web_client.get(f"/shares?run={big.run_id}&browser=1&sort=index&show_dead=1").text
    numbers = re.search(r'id="concepts" value="([^"]*)"', form).group(1)
    assert numbers == ", ".join(map(str, range(500)))
    assert "has 520 concepts, but a link shows at most 500" in form and "first 500 in the list" in form
    page = web_client.get("/shares").text
    r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(big.run_id),
                                         "scope": "concepts", "concepts": numbers})
    assert r.status_code == 200 and "can read 500 concepts of" in r.text


@pytest.mark.slow
@pytest.mark.browser
def test_notes_in_the_list_wrap_between_words_at_laptop_width(web_client, seeded, tmp_path):
    """At 1366 px the Note column keeps room for its words: none is broken across lines (the
    cells' overflow-wrap: anywhere once squeezed it to "concept / s"), and a concept link's long
    labels are cut on one line instead of widening their column."""
    from playwright.sync_api import sync_playwright

    run = seeded.run.run_id
    page = web_client.get(f"/runs/{run}/concepts/2").text
    web_client.post(f"/runs/{run}/concepts/2/label", data={
        "csrf_token": csrf_from(page), "version": "1", "description": "", "tags": "",
        "label": "A very long label that goes on and on about a crack in a painted surface"})
    for note in ("UI review (design pass)", "Review round 2: three defect concepts", "crack/stain/dent check"):
        _create(web_client, seeded, scope="concepts", concepts="2, 3, 4", note=note)
    html = web_client.get("/shares").text
    css = (Path(__file__).resolve().parents[2] / "static" / "app.css").read_text()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            view = browser.new_page(viewport={"width": 1366, "height": 900})
            view.set_content(re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S))
            view.add_style_tag(content=css)
            broken = view.evaluate("""() => {
              const broken = [];
              for (const cell of document.querySelectorAll('#shares td[data-label="Note"]')) {
                const text = cell.firstChild;
                for (const m of text.data.matchAll(/\\S+/g)) {
                  const range = document.createRange();
                  range.setStart(text, m.index); range.setEnd(text, m.index + m[0].length);
                  const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
                  if (tops.size > 1) broken.push(m[0]);
                }
              }
              return broken;
            }""")
            widths = view.evaluate("""() => [...document.querySelectorAll('#shares td[data-label="Note"]')]
                                       .map(c => c.clientWidth)""")
            overflow = view.evaluate("() => document.querySelector('#shares').scrollWidth - "
                                     "document.querySelector('#shares').parentElement.clientWidth")
        finally:
            browser.close()
    assert broken == [] and min(widths) >= 130, (broken, widths)
    assert overflow <= 0  # the table still fits its panel
