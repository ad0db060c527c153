"""Two one-off checks of ``RecommenderPool``'s dispatch (``serve --workers N``), for a checkout given on PYTHONPATH.

    # follow-ups that find their user's decoded prompt, 2 workers, users 1-8, a page of 3 asks each
    .venv/bin/python bench/pool_affinity.py hits
    git worktree add /tmp/old fc757fe && PYTHONPATH=/tmp/old .venv/bin/python bench/pool_affinity.py hits

    # busy throughput of `serve --workers 2` (32 users by 4 clients), two checkouts in alternating order
    .venv/bin/python bench/pool_affinity.py throughput --trees /tmp/old,. --reps 7

Run as a file (not ``-m``) so that ``hits`` measures the ``genrec_edge`` PYTHONPATH names. Nothing is saved:
both print one line per measurement (docs/FINDINGS.md quotes them). Shared, noisy CPU: read ratios within a run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def page(shown: int) -> tuple[dict, ...]:
    """A user's first ask, then two follow-ups: without the item ``shown`` (Toy Story in MovieLens), and more."""
    return {"k": 10}, {"k": 10, "exclude": [shown]}, {"k": 20}


def follow_up_hits(pool, users, shown: int = 1) -> tuple[int, int]:
    """(follow-ups whose prompt was restored, follow-ups), asking each user's page one ask after another."""
    hits = asks = 0
    for user in users:
        for number, ask in enumerate(page(shown)):
            result = pool.recommend(user=user, **ask)
            if number:
                asks += 1
                hits += result.timings.prefilled_tokens == 0
    return hits, asks


def hits(model, db, users) -> None:
    from genrec_edge import paths
    from genrec_edge.pool import RecommenderPool

    began = time.monotonic()
    with RecommenderPool.open(model, db or paths.default_db(), workers=2, cache=0, prompt_cache=8) as pool:
        got, asks = follow_up_hits(pool, users)
        print(f"follow-ups restored from the prompt cache: {got}/{asks}; calls per worker: "
              f"{sorted(pool.served.values())}; {time.monotonic() - began:.0f} s")


def throughput(trees: list[Path], reps: int, users: int, clients: int) -> None:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from bench.serve_workers import concurrent, stop_server
    from genrec_edge import paths
    from genrec_edge.models import default_model_path

    def start(tree: Path) -> tuple[subprocess.Popen, int]:
        env = dict(os.environ, OMP_WAIT_POLICY="passive", PYTHONUNBUFFERED="1", PYTHONPATH=str(tree))
        proc = subprocess.Popen(
            [sys.executable, "-m", "genrec_edge", "serve", "--port", "0", "--quiet", "--model",
             str(default_model_path()), "--db", str(paths.default_db()), "--beam", "20", "--workers", "2",
             "--cache", "0"], cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        for line in proc.stderr:
            if line.startswith("serving on http://127.0.0.1:"):
                threading.Thread(target=proc.stderr.read, daemon=True).start()
                return proc, int(line.split("http://127.0.0.1:", 1)[1].split(" ", 1)[0])
        raise SystemExit(f"the server of {tree} did not start")

    rates: dict[Path, list[float]] = {tree: [] for tree in trees}
    answers = []
    for rep in range(reps):
        for tree in trees if rep % 2 == 0 else trees[::-1]:
            proc, port = start(tree)
            try:
                busy = concurrent(port, list(range(1, users + 1)), clients)
            finally:
                stop_server(proc)
            rates[tree].append(users / busy["seconds"])
            answers.append(busy["answers"])
            print(f"rep {rep + 1} {tree}: {rates[tree][-1]:.3f} users/s", flush=True)
    first, last = trees
    ratios = [b / a for a, b in zip(rates[first], rates[last], strict=True)]
    print(f"{last} / {first}: median {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x), "
          f"{last} slower in {sum(r < 1 for r in ratios)} of {reps}; same answers in every run: "
          f"{all(a == answers[0] for a in answers)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="check", required=True)
    one = sub.add_parser("hits", help="follow-ups restored from the prompt cache with 2 workers")
    one.add_argument("--model", type=Path, default=None, help="GGUF (default: the default model)")
    one.add_argument("--db", type=Path, default=None)
    one.add_argument("--users", type=int, default=8, help="users 1..N")
    two = sub.add_parser("throughput", help="serve --workers 2 users/s, two checkouts side by side")
    two.add_argument("--trees", required=True, help="OLD,NEW: two checkouts with a .venv-usable genrec_edge")
    two.add_argument("--reps", type=int, default=7)
    two.add_argument("--users", type=int, default=32)
    two.add_argument("--clients", type=int, default=4)
    args = parser.parse_args(argv)
    if args.users < 1 or getattr(args, "reps", 1) < 1:
        parser.error("--users and --reps must be at least 1")
    if args.check == "hits":
        hits(args.model, args.db, range(1, args.users + 1))
    else:
        trees = [Path(t).resolve() for t in args.trees.split(",")]
        if len(trees) != 2 or not all((t / "genrec_edge").is_dir() for t in trees):
            parser.error("--trees takes two checkouts, OLD,NEW, each with a genrec_edge folder")
        throughput(trees, args.reps, args.users, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
