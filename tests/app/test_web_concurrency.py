"""A burst of concurrent requests against a real server neither stalls nor fails.

Regression test: sync dependencies and endpoints run on a bounded thread pool. When requests
held pooled database connections while waiting for a thread, a burst larger than threads +
connections deadlocked until SQLAlchemy's 30 s pool timeout and then answered 500. The pool
of worker threads is made small here (4) so a modest burst would reach that state."""

from __future__ import annotations

import gc
import socket
import threading
import time

import anyio.to_thread
import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.main import create_app
from app.security import SESSION_COOKIE

CLIENTS = 48
THREADS = 4


@pytest.mark.slow
def test_burst_of_requests_is_served(seeded):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(seeded.settings)

    async def few_threads(scope, receive, send):
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(few_threads, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    statuses: list[int] = []
    barrier = threading.Barrier(CLIENTS)

    def client(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          cookies={SESSION_COOKIE: seeded.session_cookies["alice"]}) as http:
            barrier.wait()
            for url in (f"/runs/{seeded.run.run_id}/concepts/{i % seeded.run.n_concepts}",
                        f"/runs/{seeded.run.run_id}/concepts?page=1"):
                statuses.append(http.get(url).status_code)

    try:
        started = time.monotonic()
        clients = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        elapsed = time.monotonic() - started
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert statuses == [200] * (2 * CLIENTS)
    assert elapsed < 25, f"{2 * CLIENTS} requests took {elapsed:.0f} s"


def test_start_up_objects_are_kept_out_of_full_garbage_collections(seeded):
    """A full collection over start-up's objects paused a worker for ~140 ms under load."""
    gc.unfreeze()
    with TestClient(create_app(seeded.settings)):
        assert gc.get_freeze_count() > 100_000
