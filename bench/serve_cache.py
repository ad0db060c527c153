"""`genrec-edge serve --cache`: what a repeated request costs, against the search it repeats.

    .venv/bin/python -m bench.serve_cache [--users 8] [--repeats 3] [--workers 1] [--cache 256]

A desktop app asks for the same user's recommendations whenever a screen shows them; until the user's
history changes, the answer is the same. A real ``genrec-edge serve`` process (the default model and
database, its shipped prior, ``--workers``, ``--cache``) is asked over HTTP, one new connection per
request, for each of ``--users`` users once (a search) and then ``--repeats`` times more, one request
after another. Reported: the latency of first asks and of repeats, and whether every repeat came back
marked ``cached`` with the first answer's items (titles, ids and scores, bit for bit).

Output: ``bench/results/serve-cache-<date>.{md,json,png}``; ``--render RUN.json`` redraws a saved run.
Absolute times on a shared CPU are noisy; the ratio is of one run.
"""

from __future__ import annotations

import argparse
import statistics

from bench.saved_run import add_run_arguments, render_saved, run_meta, save_figure, save_run
from bench.serve_workers import K, post_recommend, start_server, stop_server


def summarize(asks: dict) -> dict:
    """``asks``: user -> [{"s", "cached", "items"}, ...] (first ask first)."""
    first = [a[0]["s"] for a in asks.values()]
    repeats = [r["s"] for a in asks.values() for r in a[1:]]
    same = sum(r["cached"] and r["items"] == a[0]["items"] for a in asks.values() for r in a[1:])
    return {"first_p50_s": statistics.median(first), "repeat_p50_s": statistics.median(repeats),
            "ratio": statistics.median(repeats) / statistics.median(first), "first_cached": sum(
                a[0]["cached"] for a in asks.values()), "repeats": len(repeats), "repeats_same": same,
            "users": len(asks)}


def render(data: dict, stem) -> None:
    meta, s = data["meta"], data["summary"]
    lines = [
        "# A repeated request to `genrec-edge serve --cache` (`python -m bench.serve_cache`)", "",
        f"{meta['model']}, {meta['machine']} with {meta['cpus']} CPUs, llama-cpp-python {meta['llama_cpp']}, "
        f"{meta['date']}; `serve --workers {meta['workers']} --cache {meta['cache']}`, top-{K}, the shipped prior; "
        f"{s['users']} users asked once and then {meta['repeats']} times more, one request after another, a new "
        "connection each. Shared, noisy CPU.", "",
        "| | requests | p50 ms |", "|---|---:|---:|",
        f"| first ask (a search) | {s['users']} | {s['first_p50_s'] * 1000:.0f} |",
        f"| repeat (the cache) | {s['repeats']} | {s['repeat_p50_s'] * 1000:.1f} |", "",
        f"repeat / first ask, p50: **{s['ratio']:.4f}×**. Repeats marked cached with the first answer's items, bit "
        f"for bit: **{s['repeats_same']}/{s['repeats']}**; first asks marked cached: {s['first_cached']}.", "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    users = [str(u) for u in data["users"]]
    firsts = [data["asks"][u][0]["s"] * 1000 for u in users]
    repeats = [statistics.median(r["s"] for r in data["asks"][u][1:]) * 1000 for u in users]
    x = range(len(users))
    ax.bar([i - 0.2 for i in x], firsts, 0.4, label="first ask (search)")
    ax.bar([i + 0.2 for i in x], repeats, 0.4, label="repeat, median (cache)")
    ax.set_yscale("log")
    ax.set_xticks(list(x), users, fontsize=8)
    ax.set_xlabel("user")
    ax.set_ylabel("ms (log scale)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(f"serve --cache {meta['cache']}: {meta['date']}", fontsize=10)
    save_figure(fig, stem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cache", type=int, default=256)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.render:
        return render_saved(parser, args.render, render)
    if min(args.users, args.repeats, args.cache) < 1 or args.workers < 0:
        parser.error("--users, --repeats and --cache must be at least 1, --workers at least 0")

    from bench.runtime_bench import bench_users
    from genrec_edge.models import default_model_path
    from genrec_edge.paths import default_db

    model_path = args.model or default_model_path()
    db = args.db or default_db()
    users = bench_users(db, args.users)
    try:
        proc, port = start_server(model_path, db, args.workers, cache=args.cache)
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        asks = {}
        for user in users:
            answers = [post_recommend(port, user) for _ in range(1 + args.repeats)]
            asks[str(user)] = [{"s": s, "cached": a.get("cached", False), "items": a["items"]} for s, a in answers]
    finally:
        stop_server(proc)
    data = {
        "meta": run_meta(model_path, workers=args.workers, cache=args.cache, repeats=args.repeats),
        "users": users, "asks": asks, "summary": summarize(asks),
    }
    save_run(data, args.out, "serve-cache", render)
    return 0


if __name__ == "__main__":
    from bench.entry import run

    raise SystemExit(run(main))
