"""Audit-link holders see a concept's label as it is now, never its history (earlier names,
descriptions and who wrote them are the analysts')."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from tests.app.webapp import csrf_from


def _save_label(client: TestClient, url: str, label: str, description: str) -> None:
    form = client.get(url).text
    version = re.search(r'name="version" value="(\d+)"', form).group(1)
    r = client.post(url + "/label", follow_redirects=False, data={
        "csrf_token": csrf_from(form), "version": version, "label": label, "description": description, "tags": ""})
    assert r.status_code == 303, r.text


def _share(client: TestClient, run_id: int, **fields: str) -> str:
    r = client.post("/api/shares", json={"run_id": run_id, "note": "", **fields},
                    headers={"X-CSRF-Token": client.get("/api/auth/csrf").json()["csrf_token"]})
    assert r.status_code == 201, r.text
    return r.json()["url"]


@pytest.mark.parametrize("scope", ["concepts", "run"])
def test_audit_link_holders_never_see_a_labels_history(web_client, seeded, scope):
    """Earlier labels and descriptions (drafts, internal notes) and who wrote them are the
    analysts': a link shows the label as it is now, on the page and in the API."""
    run_id = seeded.run.run_id
    url = f"/runs/{run_id}/concepts/0"
    _save_label(web_client, url, "Internal draft name", "Not for the customer")
    _save_label(web_client, url, "Rim highlight", "Bright rim of a part")
    assert "Internal draft name" in web_client.get(url).text  # analysts keep the history
    link = _share(web_client, run_id, scope=scope, concept_indices=[0] if scope == "concepts" else [])
    with TestClient(web_client.app) as holder:
        page = holder.get(f"{link}/runs/{run_id}/concepts/0")
        assert page.status_code == 200 and "Rim highlight" in page.text
        assert "Internal draft name" not in page.text and "Not for the customer" not in page.text
        assert 'id="label-history"' not in page.text and "alice" not in page.text.split('id="label"', 1)[1]
        api = holder.get(f"/api{link}/runs/{run_id}/concepts/0").json()
        assert api["card"]["label"] == "Rim highlight" and api["history"] == []
