"""Uploads to the explain page: read only for a signed-in analyst, and explained one at a time
per server process, so they can fill neither the disk nor the memory."""

from __future__ import annotations

import pytest


def _multipart(size: int) -> tuple[bytes, str]:
    boundary = "review-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"run_id\"\r\n\r\n1\r\n--{boundary}\r\n"
            "Content-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
            ).encode() + b"\0" * size + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("path", ["/explain", "/api/explain"])
def test_a_visitors_upload_is_refused_before_it_is_read(web, path):
    """Without a session the upload is never read. FastAPI reads (and spools to disk) a body
    parameter before any dependency runs: each visitor's unfinished 10 MB upload held 10 MB of
    the server's disk (200 MB for 20 connections, measured)."""
    import anyio

    body, content_type = _multipart(3 * 65536)
    chunks = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", content_type.encode()),
                         (b"content-length", str(len(body)).encode())],
             "client": ("192.0.2.1", 1234), "server": ("testserver", 80), "state": {}}
    anyio.run(web.app, scope, receive, send)
    assert sent[0]["status"] in (303, 401)
    assert pulled == 0, f"{pulled} of {len(chunks)} body chunks read for a visitor"


def test_explanations_run_one_at_a_time_and_the_rest_wait_or_are_refused(web_client, seeded, monkeypatch):
    """Each explanation decodes its image whole (a 154 KB PNG of 6300x6300 pixels took about
    500 MB; 12 at once raised the server from 1.4 to 7.6 GB) and shares the loaded backbones,
    which gave "layer ... was not reached by the forward pass" to 5 of 12 concurrent requests.
    One runs at a time per process, three more wait, the rest get 429 at once."""
    import threading
    import time

    from app.routes import explain

    monkeypatch.setattr(explain, "GATE", explain.ExplainGate(waiting=3, wait_s=30))
    running, most = 0, 0
    lock = threading.Lock()

    def slow_explain(request, session, settings, run_id, data, framing):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.5)
        with lock:
            running -= 1
        raise explain.UploadRejected("explained (stub)")

    monkeypatch.setattr(explain, "_explain_now", slow_explain)  # the work done in a worker thread
    headers = {"X-CSRF-Token": web_client.get("/api/auth/csrf").json()["csrf_token"]}
    codes: list[int] = []

    def post() -> None:
        r = web_client.post("/api/explain", data={"run_id": str(seeded.run.run_id)}, headers=headers,
                            files={"image": ("a.png", b"\x89PNG" + b"\0" * 1000, "image/png")})
        with lock:
            codes.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    assert sorted(codes) == [422] * 4 + [429] * 4, codes  # 422: the stub's answer, in turn
    r = web_client.post("/api/explain", data={"run_id": str(seeded.run.run_id)}, headers=headers,
                        files={"image": ("a.png", b"\x89PNG", "image/png")})
    assert r.status_code == 422  # the places are given back
