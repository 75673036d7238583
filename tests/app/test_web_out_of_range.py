"""Numbers beyond what the database stores are bad input, never a server error.

Ids, concept indices, versions and page numbers are compared with BIGINT columns; SQLite cannot
even bind a larger integer. The test client re-raises server errors, so a 500 fails loudly."""

from __future__ import annotations

import re

from tests.app.webapp import csrf_from

HUGE = 10**20


def test_huge_numbers_in_analyst_requests_are_refused(web_client, seeded):
    run = seeded.run.run_id
    for url in (f"/api/runs/{HUGE}", f"/api/runs/{run}/concepts/{HUGE}", f"/runs/{run}/concepts?q=x&page={HUGE}",
                f"/api/runs/{run}/concepts?q=x&page={HUGE}", f"/api/jobs/{HUGE}"):
        assert web_client.get(url).status_code in (400, 422), url  # a bad page is a bad filter: 400
    for url in (f"/runs/{HUGE}", f"/runs/{run}/concepts/{HUGE}", f"/runs/{HUGE}/compare", f"/runs/{HUGE}/concepts/0/cam"):
        assert web_client.get(url).status_code == 404, url  # an address no page can have
    token = csrf_from(web_client.get("/shares").text)
    for url, form in ((f"/jobs/{HUGE}/cancel", {}), (f"/shares/{HUGE}/revoke", {}), (f"/runs/{run}/concepts/{HUGE}/cam", {}),
                      (f"/runs/{run}/concepts/0/label", {"version": str(HUGE), "label": "crack"}),
                      ("/shares", {"run_id": str(HUGE), "scope": "run"})):
        assert web_client.post(url, data={"csrf_token": token, **form}).status_code == 422, url
    r = web_client.post("/shares", data={"csrf_token": token, "run_id": str(run), "scope": "concepts",
                                         "concepts": f"1, {HUGE}"})
    assert r.status_code == 422 and f"there is no concept {HUGE}" in r.text.lower()  # shown as a sentence
    r = web_client.post("/explain", data={"csrf_token": token, "run_id": str(HUGE)},
                        files={"image": ("x.png", b"\x89PNG", "image/png")})
    assert r.status_code == 422
    headers = {"X-CSRF-Token": web_client.get("/api/auth/csrf").json()["csrf_token"]}
    for body in ({"run_id": HUGE}, {"run_id": run, "scope": "concepts", "concept_indices": [HUGE]}):
        assert web_client.post("/api/shares", json=body, headers=headers).status_code == 422, body
    r = web_client.put(f"/api/runs/{run}/concepts/0/label", json={"label": "crack", "version": HUGE}, headers=headers)
    assert r.status_code == 422


def test_huge_numbers_through_an_audit_link_are_refused(web_client, seeded):
    run = seeded.run.run_id
    created = web_client.post("/shares", data={"csrf_token": csrf_from(web_client.get("/shares").text),
                                               "run_id": str(run), "scope": "run"})
    link = re.search(r'id="share-url" value="http://testserver(/s/[^"]+)"', created.text).group(1)
    web_client.cookies.clear()
    for url in (f"{link}/runs/{run}/concepts?q=a&page={HUGE}", f"/api{link}/runs/{run}/concepts/{HUGE}"):
        assert web_client.get(url).status_code in (400, 422), url
    assert web_client.get(f"{link}/runs/{run}/concepts/{HUGE}").status_code == 404
    assert web_client.get(f"{link}/runs/{run}/concepts/0").status_code == 200
