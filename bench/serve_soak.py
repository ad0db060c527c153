"""`genrec-edge serve` over many requests: does its memory level off? (A desktop app runs it for weeks.)

    .venv/bin/python -m bench.serve_soak [--requests 400] [--every 25] [--workers 1] [--cache 64]

A real ``genrec-edge serve`` process (the default model and a copy of the default database, since the run
writes histories; its shipped prior, its default beam, ``--workers``, ``--cache``) is asked one request after another, new
connection each, a seeded mix of what an app sends:

- ``{"user", "k": 10}`` for the benches' users, a third of them users asked before (a cache hit when the
  history, filters and k are those of a kept search: about one request in ten in the run of record);
- a third with ``"exclude"``: 1-5 item ids of an earlier answer;
- a few with ``"k": 40`` and ``"k": 100`` (the wide and the repeated search) and a few ad-hoc histories;
- every 20th request a ``POST /history`` (an item of an earlier answer), then that user asked again.

Every ``--every`` requests the resident memory (VmRSS) and its peak (VmHWM) of the server process and of each
search worker it spawned are read from ``/proc``. Reported: memory against the request count, the growth per 100
requests over the second half (a least-squares slope), error answers (there should be none), and whether the
server stopped cleanly on SIGTERM. Linux only (``/proc``).

Output: ``bench/results/serve-soak-<date>.{md,json,png}``; ``--render RUN.json`` redraws a saved run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from bench.saved_run import add_run_arguments, render_saved, run_meta, save_figure, save_run
from bench.serve_workers import start_server, stop_server

HISTORY_EVERY = 20


def proc_memory(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of a process in MB, or None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def search_workers(pid: int) -> list[int]:
    """The processes ``pid`` spawned to search (multiprocessing's resource tracker left out), by pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in status and b"resource_tracker" not in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def call(port: int, method: str, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def next_requests(rng: random.Random, i: int, users: list[int], asked: list[int], answers: list[tuple]) -> list:
    """The request(s) to send as request number ``i`` (0-based): [(method, path, body), ...]."""
    if (i + 1) % HISTORY_EVERY == 0 and answers:
        user, items = rng.choice(answers)
        item = rng.choice(items)["item_ids"][0]
        return [("POST", "/history", {"user": user, "item_id": item}), ("POST", "/recommend", {"user": user, "k": 10})]
    user = rng.choice(asked) if asked and rng.random() < 1 / 3 else rng.choice(users)
    body: dict = {"user": user, "k": 10}
    draw = rng.random()
    if draw < 0.04:
        body["k"] = 40
    elif draw < 0.07:
        body["k"] = 100
    elif draw < 0.11 and answers:
        items = rng.choice(answers)[1]
        body = {"history": [r["title"] for r in items[: rng.randint(1, 5)]], "k": 10}
    elif draw < 0.44 and answers:
        ids = [i for r in rng.choice(answers)[1] for i in r["item_ids"]]
        body["exclude"] = rng.sample(ids, min(len(ids), rng.randint(1, 5)))
    return [("POST", "/recommend", body)]


def growth_per_100(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of MB against requests over the second half of ``points``, per 100 requests."""
    half = [(n, mb) for n, mb in points if n >= points[-1][0] / 2]
    if len(half) < 2:
        return None
    mean_n = sum(n for n, _ in half) / len(half)
    mean_mb = sum(mb for _, mb in half) / len(half)
    spread = sum((n - mean_n) ** 2 for n, _ in half)
    return 100 * sum((n - mean_n) * (mb - mean_mb) for n, mb in half) / spread if spread else None


def summarize(samples: list[dict]) -> dict:
    """``samples``: [{"requests", "server": [rss, hwm], "workers": {pid: [rss, hwm]}}, ...]."""
    series = {"server": [(s["requests"], s["server"][0]) for s in samples]}
    for s in samples:
        for index, pid in enumerate(sorted(s["workers"], key=int)):
            series.setdefault(f"worker {index + 1}", []).append((s["requests"], s["workers"][pid][0]))
    return {name: {"first_mb": points[0][1], "last_mb": points[-1][1], "max_mb": max(mb for _, mb in points),
                   "growth_mb_per_100": growth_per_100(points)} for name, points in series.items()}


def render(data: dict, stem: Path) -> None:
    meta, summ, samples = data["meta"], data["summary"], data["samples"]
    names = list(summ)
    lines = [
        "# `genrec-edge serve` over many requests (`python -m bench.serve_soak`)", "",
        f"{meta['model']}, {meta['machine']} with {meta['cpus']} CPUs, {meta['date']}; `serve --workers "
        f"{meta['workers']} --cache {meta['cache']}` on a copy of the database; {meta['requests']} requests one after "
        f"another ({meta['recommends']} POST /recommend, {meta['cached']} of them answered from the cache, "
        f"{meta['histories']} POST /history); resident memory read every {meta['every']} requests.", "",
        "| requests | " + " | ".join(f"{n} MB" for n in names) + " |", "|---:|" + "---:|" * len(names),
    ]
    for s in samples:
        row = [f"{s['server'][0]:.1f}"] + [f"{s['workers'][pid][0]:.1f}" for pid in sorted(s["workers"], key=int)]
        lines.append(f"| {s['requests']} | " + " | ".join(row) + " |")
    lines += ["", "| process | first MB | last MB | peak of the samples | growth per 100 requests, second half |",
              "|---|---:|---:|---:|---:|"]
    for name, s in summ.items():
        growth = "–" if s["growth_mb_per_100"] is None else f"{s['growth_mb_per_100']:+.2f} MB"
        lines.append(f"| {name} | {s['first_mb']:.1f} | {s['last_mb']:.1f} | {s['max_mb']:.1f} | {growth} |")
    lines += ["", f"Error answers: **{len(data['errors'])}**. The server stopped on SIGTERM with exit code "
              f"{meta['exit_code']} in {meta['stop_s']:.1f} s.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    requests = [s["requests"] for s in samples]
    ax.plot(requests, [s["server"][0] for s in samples], "o-", label="server")
    for index in range(len(names) - 1):
        ax.plot(requests, [s["workers"][sorted(s["workers"], key=int)[index]][0] if len(s["workers"]) > index
                           else float("nan") for s in samples], "s-", label=f"worker {index + 1}")
    ax.set_xlabel("requests")
    ax.set_ylabel("resident MB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"serve --workers {meta['workers']} --cache {meta['cache']}: {meta['date']}", fontsize=10)
    save_figure(fig, stem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--every", type=int, default=25, help="read memory every N requests")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cache", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.render:
        return render_saved(parser, args.render, render)
    if min(args.requests, args.every) < 1 or args.workers < 0 or args.cache < 0:
        parser.error("--requests and --every must be at least 1, --workers and --cache at least 0")
    if not Path("/proc/self/status").is_file():
        parser.error("this bench reads memory from /proc (Linux)")

    from tqdm.auto import tqdm

    from bench.runtime_bench import bench_users
    from genrec_edge.models import default_model_path
    from genrec_edge.paths import default_db

    model_path = args.model or default_model_path()
    source_db = args.db or default_db()
    users = bench_users(source_db, 1000)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="serve-soak-") as scratch:
        db = Path(scratch) / "soak.db"
        with sqlite3.connect(source_db) as source, sqlite3.connect(db) as copy:
            source.backup(copy)  # the run writes histories: never into the user's database
        try:
            proc, port = start_server(model_path, db, args.workers, cache=args.cache, beam=None)  # as users run it
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}") from None
        samples, errors, asked, answers = [], [], [], []
        counts = {"recommends": 0, "cached": 0, "histories": 0}

        def sample(done: int) -> None:
            workers = {str(pid): proc_memory(pid) for pid in search_workers(proc.pid)}
            samples.append({"requests": done, "server": proc_memory(proc.pid),
                            "workers": {pid: mem for pid, mem in workers.items() if mem is not None}})

        try:
            sample(0)
            done = 0
            with tqdm(total=args.requests, desc="requests", unit="req") as bar:
                while done < args.requests:
                    for method, path, body in next_requests(rng, done, users, asked, answers)[: args.requests - done]:
                        status, payload = call(port, method, path, body)
                        done += 1
                        bar.update(1)
                        if status >= 300:
                            errors.append({"request": done, "path": path, "body": body, "status": status,
                                           "answer": payload})
                        elif path == "/recommend":
                            counts["recommends"] += 1
                            counts["cached"] += bool(payload.get("cached"))
                            if "user" in body:
                                asked.append(body["user"])
                                answers.append((body["user"], payload["items"]))
                        else:
                            counts["histories"] += 1
                        if done % args.every == 0:
                            sample(done)
            if done % args.every:
                sample(done)
        finally:
            began = time.perf_counter()
            stop_server(proc)
            stop_s = time.perf_counter() - began
    data = {
        "meta": run_meta(model_path, workers=args.workers, cache=args.cache, requests=args.requests,
                         every=args.every, seed=args.seed, exit_code=proc.returncode, stop_s=stop_s, **counts),
        "samples": samples, "errors": errors, "summary": summarize(samples),
    }
    save_run(data, args.out, "serve-soak", render)
    return 1 if errors else 0


if __name__ == "__main__":
    from bench.entry import run

    raise SystemExit(run(main))
