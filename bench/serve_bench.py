"""The HTTP service's own cost, side by side for several checkouts: start-up and per-request overhead.

Why: the service moved from 828 lines on ``http.server`` to FastAPI on uvicorn (issue 16); this measures what
that costs or saves, on routes whose handler does almost nothing, so the server itself is what is timed::

    git worktree add /tmp/serve-old cb018b2~1      # the last commit with the http.server service
    ln -s ../convert /tmp/serve-old/genrec_edge/convert   # what the editable install maps, for a bare checkout
    python -m bench.serve_bench --server old=/tmp/serve-old --server new=. --requests 300

Each server is its own process (``python -m genrec_edge serve`` with the checkout first on PYTHONPATH), on
the same model and database, started and measured in turn, each measure interleaved over ``--rounds``.
Reported per server: start-up (process start to the first 200 from /health: imports, model and trie load),
p50 of GET /health and of GET /users/U/history?limit=20 on a new connection per request and on one kept-alive
connection (HTTP/1.0 servers close it: those cells are empty), and requests/s of the history route from 8
client threads, each with its own connection per request.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> float:
    start = time.perf_counter()
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    response = c.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: {response.status}")
    if conn is None:
        c.close()
    return (time.perf_counter() - start) * 1000


def _keepalive(port: int, path: str, n: int) -> list[float] | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    try:
        for _ in range(n):
            times.append(_get(port, path, conn))
            if conn.sock is None:  # the server closed it: no keep-alive
                return None
    finally:
        conn.close()
    return times


def start(checkout: Path, port: int, model: str | None, db: str | None, threads: int) -> tuple[subprocess.Popen, float]:
    env = dict(os.environ, PYTHONPATH=str(checkout) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "genrec_edge", "serve", "--port", str(port), "--threads", str(threads)]
    cmd += ["--model", model] if model else []
    cmd += ["--db", db] if db else []
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile()  # not a pipe: a server that logs every request would fill it and block
    proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=log)
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{checkout}: serve exited {proc.returncode}: {log.read().decode()[-500:]}")
        try:
            _get(port, "/health")
            log.close()  # the child keeps its own descriptor
            return proc, time.perf_counter() - t0
        except (OSError, RuntimeError, http.client.HTTPException):
            time.sleep(0.02)


def measure(checkout: Path, args) -> dict:
    port = _free_port()
    proc, startup = start(checkout, port, args.model, args.db, args.threads)
    try:
        history = f"/users/{args.user}/history?limit=20"
        for _ in range(20):  # warm-up
            _get(port, history)
        out = {"startup_s": startup}
        for name, path in (("health", "/health"), ("history", history)):
            out[f"{name}_new_ms"] = statistics.median(_get(port, path) for _ in range(args.requests))
            kept = _keepalive(port, path, args.requests)
            out[f"{name}_keepalive_ms"] = statistics.median(kept) if kept else None
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: _get(port, history), range(args.requests * 4)))
        out["history_8_clients_rps"] = args.requests * 4 / (time.perf_counter() - t0)
        return out
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", action="append", required=True, help="name=checkout directory (repeat)")
    parser.add_argument("--model", help="GGUF (default: the default model)")
    parser.add_argument("--db", help="history database (default: the one `init` builds)")
    parser.add_argument("--user", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    servers: dict[str, Path] = {}
    for spec in args.server:
        name, sep, path = spec.partition("=")
        if not (sep and name and Path(path).is_dir()):
            parser.error(f"--server takes name=checkout-directory (got {spec!r})")
        servers[name] = Path(path).resolve()
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    for r in range(args.rounds):
        for name, checkout in servers.items():
            runs[name].append(measure(checkout, args))
            print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", file=sys.stderr)
    keys = list(next(iter(runs.values()))[0])
    print("| measure | " + " | ".join(servers) + " |")
    print("|---|" + "---:|" * len(servers))
    for key in keys:
        cells = []
        for name in servers:
            values = [run[key] for run in runs[name] if run[key] is not None]
            cells.append(f"{statistics.median(values):.3g}" if values else "–")
        print(f"| {key} (median of {args.rounds}) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
