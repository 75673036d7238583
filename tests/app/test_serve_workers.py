"""`usae serve --workers N`: one listening socket per worker process (SO_REUSEPORT).

A real server in a subprocess: connections are spread over the workers (with one shared socket a
burst of clients could land on one worker), a second server on the same port is refused with a
clear message, a dead worker is replaced, and SIGTERM leaves no process behind."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT") or not Path("/proc/net/tcp").exists(),
                                reason="needs Linux (SO_REUSEPORT, /proc)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port),
                             "--data-dir", str(data_dir)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _get(port: int, connection: http.client.HTTPConnection | None = None) -> int:
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/login")
    response = connection.getresponse()
    response.read()
    return response.status


def _wait_until(predicate, timeout: float = 90, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def _connections_per_worker(port: int, pids: list[int]) -> dict[int, int]:
    """Established server-side connections on `port`, counted per worker pid."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            inodes.add(fields[9])
    counts = {}
    for pid in pids:
        held = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            held += target.startswith("socket:[") and target[8:-1] in inodes
        counts[pid] = held
    return counts


def test_workers_each_listen_and_share_the_clients(tmp_path):
    port = _free_port()
    server = _serve(port, tmp_path / "data")
    try:
        _wait_until(lambda: _get(port) == 200, what="the server")
        _wait_until(lambda: len(_workers(server.pid)) == 2, what="two workers")
        workers = _workers(server.pid)

        # 40 clients connecting at once, as a burst of users (or the load benchmark) does. Spread
        # by hash, fewer than 9 land on one worker in ~2 of 10,000 runs; one shared socket gave
        # 0 / 24, 24 / 0 and 3 / 21 for 24 clients.
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(40)]
        barrier = threading.Barrier(len(connections))
        statuses = []

        def client(c: http.client.HTTPConnection) -> None:
            barrier.wait()
            statuses.append(_get(port, c))

        threads = [threading.Thread(target=client, args=(c,)) for c in connections]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * len(connections)
        counts = _connections_per_worker(port, workers)
        assert sum(counts.values()) == len(connections), counts
        assert min(counts.values()) >= 9, f"connections piled onto one worker: {counts}"
        for c in connections:
            c.close()

        second = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port),
                                 "--data-dir", str(tmp_path / "other")], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr

        os.kill(workers[0], signal.SIGKILL)
        _wait_until(lambda: len(_workers(server.pid)) == 2 and workers[0] not in _workers(server.pid),
                    what="a replacement worker")
        _wait_until(lambda: _get(port) == 200, what="the server after a worker died")

        everyone = [server.pid, *_workers(server.pid)]
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        _wait_until(lambda: not any(Path(f"/proc/{pid}").exists() and
                                    "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in everyone),
                    timeout=30, what="every server process to exit")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_access_log_never_holds_an_audit_link_token(tmp_path):
    """Served for real (worker processes, uvicorn's own access log): a share URL is logged with
    the start of its token's hash, the form `share_links.token_hash` stores, never the token."""
    from app.services.shares import hash_token

    port, token = _free_port(), "SecretShareToken-" + "x" * 26
    log = tmp_path / "access.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--port", str(port),
                                   "--no-job-worker", "--data-dir", str(tmp_path / "data")], cwd=ROOT, stdout=out,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            _wait_until(lambda: _get(port) == 200, what="the server")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", f"/s/{token}/runs/1?x=1")
            assert connection.getresponse().status == 404  # no such link; the request is logged all the same
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    text = log.read_text()
    assert f"/s/#{hash_token(token)[:8]}/runs/1" in text, text[-2000:]
    assert token not in text
