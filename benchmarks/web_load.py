"""Latency of the explorer's two busiest pages under load (issue goal: p95 <= 50 ms for one
client and <= 250 ms for 32 concurrent clients, on SQLite, on a 2-core machine).

It fills a SQLite database with one mined run of 32,768 concepts over 3 models and 100,000
images (16 top images per concept and model: 1.5 M rows), starts `usae serve` in a separate
process, signs in, and times full HTTP round trips of

- the concept browser: random pages of random sorts, some with filters, and
- the concept page: random live concepts,

first with one client, then with 32 clients in parallel (each a thread with its own keep-alive
connection). Clients and server share the machine's cores, as they would on a laptop demo.

    python benchmarks/web_load.py [--concepts 32768] [--images 100000] [--requests 1000] [--workers 2]

`--server-cpu N` measures instead the server's CPU time per page: one server process, N random
pages of each kind requested one after another, the process's user + system time from /proc.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_database(data_dir: Path, n_concepts: int, n_images: int) -> int:
    """Seed the run (cached in `data_dir` between invocations); returns its id."""
    from sqlalchemy import select

    from app.db import get_engine, session_factory
    from app.migrations import upgrade_database
    from app.models import Run, User
    from app.services.card_html import refresh_stale_cards
    from app.settings import Settings
    from tests.app.seed import create_analyst, seed_run

    settings = Settings(data_dir=data_dir, database_url=None)
    upgrade_database(settings.db_url)
    with session_factory(settings.db_url)() as session:
        run = session.scalar(select(Run).where(Run.name == "load"))
        if run is not None and run.n_concepts == n_concepts and run.n_images == n_images:
            # Cards of an older card template render live on every page until `usae serve`
            # re-renders them; time the pages as a served run has them.
            if refreshed := refresh_stale_cards(session_factory(settings.db_url)):
                print(f"re-rendered {refreshed:,} stored cards of an older card template")
            return run.id
        if session.scalar(select(User)) is None:
            create_analyst(session)
        started = time.monotonic()
        info = seed_run(session, settings.media_dir, name="load", n_concepts=n_concepts, n_images=n_images, top_n=16,
                        write_files=False, n_tokens=n_images * 256)
        session.commit()
        print(f"seeded {n_concepts:,} concepts / {n_images:,} images in {time.monotonic() - started:.0f} s")
    get_engine(settings.db_url).dispose()
    return info.run_id


def start_server(data_dir: Path, port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "USAE_DATA_DIR": str(data_dir)}
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", str(workers), "--data-dir", str(data_dir)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/login")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"server did not start: {server.stderr.read() if server.stderr else ''}")


def sign_in(port: int) -> str:
    """Session cookie of the seeded analyst, through the real log-in form."""
    from tests.app.seed import PASSWORD

    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", "/login")
    response = connection.getresponse()
    cookie = response.getheader("set-cookie").split(";", 1)[0]
    token = re.search(r'name="csrf_token" value="([^"]+)"', response.read().decode()).group(1)
    body = urlencode({"username": "alice", "password": PASSWORD, "csrf_token": token, "next": "/runs"})
    connection.request("POST", "/login", body=body, headers={
        "Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
    response = connection.getresponse()
    response.read()
    if response.status != 303:
        raise RuntimeError(f"sign-in failed with HTTP {response.status}")
    return response.getheader("set-cookie").split(";", 1)[0]


def browser_urls(run_id: int, n_concepts: int, rng: random.Random, count: int) -> list[str]:
    pages = (n_concepts - 2) // 36
    urls = []
    for _ in range(count):
        query: dict[str, object] = {"sort": rng.choice(["energy", "entropy", "cofire", "frequency", "index"]),
                                    "page": rng.randint(1, pages)}
        if rng.random() < 0.3:
            query.update(min_entropy=0.8, page=rng.randint(1, pages // 2))
        if rng.random() < 0.2:
            query.update(mostly="vit_s", page=rng.randint(1, pages // 4))
        urls.append(f"/runs/{run_id}/concepts?{urlencode(query)}")
    return urls


def concept_urls(run_id: int, n_concepts: int, rng: random.Random, count: int) -> list[str]:
    return [f"/runs/{run_id}/concepts/{rng.randrange(n_concepts - 2)}" for _ in range(count)]


def timed_requests(port: int, cookie: str, urls: list[str]) -> list[float]:
    """Milliseconds per request, over one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times = []
    for url in urls:
        started = time.perf_counter()
        connection.request("GET", url, headers={"Cookie": cookie})
        response = connection.getresponse()
        response.read()
        times.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return times


def load(port: int, cookie: str, urls: list[str], clients: int) -> list[float]:
    """Split `urls` over `clients` parallel clients; all latencies in milliseconds."""
    results: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            barrier.wait()
            results[i] = timed_requests(port, cookie, urls[i::clients])
        except BaseException as exc:  # reported after the threads finish
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [t for r in results for t in r]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(port: int, pid: int, cookie: str, urls: list[str]) -> float:
    """Milliseconds of server CPU per request, the requests sent one at a time."""
    before = process_cpu_seconds(pid)
    timed_requests(port, cookie, urls)
    return (process_cpu_seconds(pid) - before) * 1000 / len(urls)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", type=int, default=32768)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=1000, help="Requests per page and scenario.")
    parser.add_argument("--workers", type=int, default=2, help="Server processes (`usae serve --workers`).")
    parser.add_argument("--data-dir", type=Path, help="Keep the seeded database here (reused next time).")
    parser.add_argument("--json", type=Path, help="Also write the results to this file.")
    parser.add_argument("--server-cpu", type=int, metavar="N",
                        help="Instead: server CPU time per page over N pages of each kind (one server process).")
    args = parser.parse_args()
    if args.server_cpu:
        args.workers = 1

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="usae-web-load-")) / "usae-data"
    run_id = build_database(data_dir, args.concepts, args.images)
    port = 18000 + os.getpid() % 1000
    server = start_server(data_dir, port, args.workers)
    try:
        cookie = sign_in(port)
        rng = random.Random(0)
        # Warm every worker: the kernel spreads connections over the workers' sockets, so only
        # many connections reach all of them. A cold worker builds each browser view's order on
        # first use (~20 ms) and compiles templates and queries; that start-up cost is not what
        # the load figures measure.
        warm = browser_urls(run_id, args.concepts, rng, 640) + concept_urls(run_id, args.concepts, rng, 320)
        load(port, cookie, warm, 32)
        if args.server_cpu:
            for name, make in (("concept browser", browser_urls), ("concept page", concept_urls)):
                ms = server_cpu(port, server.pid, cookie, make(run_id, args.concepts, rng, args.server_cpu))
                print(f"{name}: {ms:.1f} ms of server CPU per request ({args.server_cpu} requests)", flush=True)
            return
        results = {}
        for clients in (1, 32):
            for name, make in (("concept browser", browser_urls), ("concept page", concept_urls)):
                started = time.monotonic()
                times = load(port, cookie, make(run_id, args.concepts, rng, args.requests), clients)
                print(f"{name}, {clients} client(s): {len(times)} requests in {time.monotonic() - started:.1f} s",
                      flush=True)
                results[f"{name}, {clients} client{'s' if clients > 1 else ''}"] = {
                    "p50_ms": round(percentile(times, 50), 1), "p95_ms": round(percentile(times, 95), 1),
                    "requests": len(times)}
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not args.data_dir:
            shutil.rmtree(data_dir.parent, ignore_errors=True)

    print(f"\n{args.concepts:,} concepts, {args.images:,} images, SQLite, {args.workers} server worker(s), "
          f"{os.cpu_count()} CPU cores")
    print(f"{'scenario':<32} {'p50 ms':>8} {'p95 ms':>8} {'requests':>9}")
    for name, r in results.items():
        print(f"{name:<32} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['requests']:>9}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
