"""Media files: served from the media directory and never from anywhere else."""

from __future__ import annotations

import re

import pytest

from tests.app.webapp import PASSWORD, csrf_from, login, sign_in_as  # noqa: F401


def test_analyst_gets_media(reader):
    web_client, seeded = reader
    r = web_client.get(f"/media/{seeded.run.media_prefix}/heatmaps/0/vit_s-0.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"
    assert r.headers["cache-control"] == "private, max-age=3600"


def test_shared_media_is_never_served_from_the_browser_cache(web_client, seeded):
    """A revoked link must stop showing images at once, not when a cached copy runs out."""
    page = web_client.get("/shares").text
    r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id), "scope": "run"})
    share = re.search(r'id="share-url" value="http://testserver(/s/[^"]+)"', r.text).group(1)
    share_id = re.search(r'id="share-(\d+)"', web_client.get("/shares").text).group(1)
    image = f"{share}/media/{seeded.run.media_prefix}/heatmaps/0/vit_s-0.png"
    shown = web_client.get(image)
    assert shown.status_code == 200 and shown.headers["cache-control"] == "private, no-cache"
    web_client.post(f"/shares/{share_id}/revoke", data={"csrf_token": csrf_from(web_client.get("/shares").text)})
    assert web_client.get(image).status_code == 410


@pytest.mark.parametrize("path", [
    "/media/../usae.db",
    "/media/..%2Fusae.db",
    "/media/%2e%2e/%2e%2e/etc/passwd",
    "/media/runs/..%2F..%2Fsecret_key",
    "/media/%2Fetc%2Fpasswd",
    "/media//etc/passwd.png",
    "/media/runs/1/generation-1/heatmaps/0/..%5C..%5Cx.png",
    "/media/runs/1/generation-1/heatmaps/0/vit_s-0.png%00.png",
    "/media/nothing-here.png",
    "/media/runs",
])
def test_path_traversal_and_odd_paths_are_404(reader, path):
    web_client, seeded = reader
    (seeded.data_dir / "secret.png").write_bytes(b"\x89PNG not to be served")
    r = web_client.get(path)
    assert r.status_code == 404
    assert b"PNG not to be served" not in r.content and b"root:" not in r.content


def test_symlink_out_of_media_is_404(reader):
    web_client, seeded = reader
    outside = seeded.data_dir / "outside.png"
    outside.write_bytes(b"\x89PNG outside")
    (seeded.settings.media_dir / "link.png").symlink_to(outside)
    assert web_client.get("/media/link.png").status_code == 404


def test_traversal_through_a_share_is_404(web_client, seeded):
    page = web_client.get("/shares").text
    r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id), "scope": "run"})
    path = re.search(r'id="share-url" value="http://testserver(/s/[^"]+)"', r.text).group(1)
    web_client.cookies.clear()
    prefix = seeded.run.media_prefix
    for evil in (f"{prefix}/..%2F..%2F..%2Fusae.db", f"{prefix}/%2e%2e/%2e%2e/{seeded.other.media_prefix}/heatmaps/0/vit_s-0.png"):
        assert web_client.get(f"{path}/media/{evil}").status_code == 404


def test_a_share_never_follows_a_link_out_of_its_scope(web_client, seeded):
    """A symbolic link inside a shared run's folder to another run's file is not served through
    the share, though its path text lies inside the scope."""
    page = web_client.get("/shares").text
    r = web_client.post("/shares", data={"csrf_token": csrf_from(page), "run_id": str(seeded.run.run_id), "scope": "run"})
    path = re.search(r'id="share-url" value="http://testserver(/s/[^"]+)"', r.text).group(1)
    media = seeded.settings.media_dir
    (media / seeded.run.media_prefix / "borrowed.png").symlink_to(
        media / seeded.other.media_prefix / "heatmaps" / "0" / "vit_s-0.png")
    assert web_client.get(f"/media/{seeded.run.media_prefix}/borrowed.png").status_code == 200  # analysts see all
    web_client.cookies.clear()
    assert web_client.get(f"{path}/media/{seeded.run.media_prefix}/heatmaps/0/vit_s-0.png").status_code == 200
    assert web_client.get(f"{path}/media/{seeded.run.media_prefix}/borrowed.png").status_code == 404

