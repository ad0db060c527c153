"""`Recommender.open(prompt_cache=N)` (`serve --prompt-cache`): a page of several shelves for one user.

    .venv/bin/python -m bench.prompt_cache [--users 12] [--genre Comedy]

An app's home page asks for one user's recommendations more than once, each a different search from the
same prompt: the top ``K`` ("for you"), the top ``K`` from one genre (``only``: a shelf) and, when the user
scrolls, the top ``2K`` ("show more"). Two recommenders over the same model and database, in this process,
one keeping no prompt and one keeping ``--prompt-cache`` of them, both without a result cache, answer every
user's page; which goes first alternates user by user. Reported: p50 latency of each ask for both, the ratio
(kept / not kept) of the follow-up asks and of the whole page, and whether every answer was the same, bit for
bit (titles, scores and LM scores).

Output: ``bench/results/prompt-cache-<date>.{md,json,png}``; ``--render RUN.json`` redraws a saved run.
Absolute times on a shared CPU are noisy; the ratios are of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.saved_run import add_run_arguments, render_saved, run_meta, save_figure, save_run

K = 10
ASKS = ("for you", "shelf", "show more")
LAYOUTS = ("plain", "kept")


def page(genre_items: list[int]) -> list[dict]:
    """The asks of one page, in order: ``recommend`` keyword arguments."""
    return [{"k": K}, {"k": K, "only": genre_items}, {"k": 2 * K}]


def summarize(times: dict, same: int, total: int, prefill: dict | None = None) -> dict:
    """``times``: layout -> ask -> seconds per user (users in the same order in each); ``prefill``: the same
    shape, each request's ``timings.prefill_ms``."""
    p50 = {layout: {ask: statistics.median(times[layout][ask]) for ask in ASKS} for layout in LAYOUTS}
    prefill_p50 = {layout: {ask: statistics.median(prefill[layout][ask]) for ask in ASKS} for layout in LAYOUTS} \
        if prefill else None
    follow = {layout: [sum(t) for t in zip(*(times[layout][ask] for ask in ASKS[1:]), strict=True)]
              for layout in LAYOUTS}
    whole = {layout: [sum(t) for t in zip(*(times[layout][ask] for ask in ASKS), strict=True)] for layout in LAYOUTS}
    return {
        "p50_s": p50, "prefill_p50_ms": prefill_p50,
        "follow_up_ratio": statistics.median(follow["kept"]) / statistics.median(follow["plain"]),
        "page_ratio": statistics.median(whole["kept"]) / statistics.median(whole["plain"]),
        "page_p50_s": {layout: statistics.median(whole[layout]) for layout in LAYOUTS},
        "faster_pages": sum(k < p for k, p in zip(whole["kept"], whole["plain"], strict=True)),
        "users": len(whole["plain"]), "same": same, "answers": total,
    }


def render(data: dict, stem) -> None:
    meta, s = data["meta"], data["summary"]
    p50 = s["p50_s"]
    lines = [
        "# A page of shelves with and without the prompt cache (`python -m bench.prompt_cache`)", "",
        f"{meta['model']}, {meta['machine']} with {meta['cpus']} CPUs, llama-cpp-python {meta['llama_cpp']}, "
        f"{meta['date']}; {s['users']} users, each asked for a page: top-{K} (\"for you\"), top-{K} of the "
        f"{meta['genre']} titles (\"shelf\", `only`) and top-{2 * K} (\"show more\"), the shipped prior, no result "
        f"cache. \"kept\": `prompt_cache={meta['prompt_cache']}`; which recommender answers a user first "
        "alternates. Shared, noisy CPU: compare the ratios.", "",
        "| ask | p50 ms, no prompt kept | p50 ms, kept | kept / not | prefill p50 ms, not kept | kept |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    pre = s.get("prefill_p50_ms")
    for ask in ASKS:
        cells = f" {pre['plain'][ask]:.0f} | {pre['kept'][ask]:.2f} |" if pre else " | |"
        lines.append(f"| {ask} | {p50['plain'][ask] * 1000:.0f} | {p50['kept'][ask] * 1000:.0f} | "
                     f"{p50['kept'][ask] / p50['plain'][ask]:.2f}× |" + cells)
    lines += [
        f"| **the page** | {s['page_p50_s']['plain'] * 1000:.0f} | {s['page_p50_s']['kept'] * 1000:.0f} | "
        f"**{s['page_ratio']:.2f}×** | | |", "",
        f"The two follow-up asks, p50 of their sum: **{s['follow_up_ratio']:.2f}×**. Pages faster with the prompt "
        f"kept: {s['faster_pages']}/{s['users']}. The same answers, bit for bit: **{s['same']}/{s['answers']}**. "
        "The first ask decodes the prompt either way (and, kept, also copies its cells out); a follow-up's "
        "prefill, kept, is the copy of its cells back.", "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = range(len(ASKS))
    for offset, layout, label in ((-0.2, "plain", "no prompt kept"), (0.2, "kept", f"prompt_cache={meta['prompt_cache']}")):
        ax.bar([i + offset for i in x], [p50[layout][ask] * 1000 for ask in ASKS], 0.4, label=label)
    ax.set_xticks(list(x), ASKS)
    ax.set_ylabel("p50 ms")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(f"one page of shelves, {s['users']} users: {meta['date']}", fontsize=10)
    save_figure(fig, stem)


def genre_items(db, genre: str) -> list[int]:
    from genrec_edge.history import HistoryDB

    with HistoryDB.open(db, readonly=True) as history:
        rows = history.conn.execute("SELECT id FROM items WHERE instr(genres, ?) > 0 ORDER BY id", (genre,)).fetchall()
    return [r[0] for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--genre", default="Comedy", help="the shelf's genre (items whose genres name it)")
    parser.add_argument("--prompt-cache", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.render:
        return render_saved(parser, args.render, render)
    if min(args.users, args.prompt_cache) < 1:
        parser.error("--users and --prompt-cache must be at least 1")

    from bench.runtime_bench import bench_users
    from genrec_edge.models import default_model_path
    from genrec_edge.paths import default_db
    from genrec_edge.recommend import Recommender

    model_path = args.model or default_model_path()
    db = args.db or default_db()
    shelf = genre_items(db, args.genre)
    if not shelf:
        parser.error(f"--genre {args.genre}: no item has it")
    users = bench_users(db, args.users)
    asks = page(shelf)
    times = {layout: {ask: [] for ask in ASKS} for layout in LAYOUTS}
    prefill = {layout: {ask: [] for ask in ASKS} for layout in LAYOUTS}
    same = total = 0
    quiet = {"threads": args.threads, "warn": lambda message: None}
    with (Recommender.open(model_path, db, **quiet) as plain,
          Recommender.open(model_path, db, prompt_cache=args.prompt_cache, **quiet) as kept):
        recs = {"plain": plain, "kept": kept}
        began = time.perf_counter()
        for n, user in enumerate(users):
            answers = {}
            for layout in LAYOUTS if n % 2 == 0 else LAYOUTS[::-1]:
                answers[layout] = []
                for ask, options in zip(ASKS, asks, strict=True):
                    started = time.perf_counter()
                    result = recs[layout].recommend(user=user, **options)
                    times[layout][ask].append(time.perf_counter() - started)
                    prefill[layout][ask].append(result.timings.prefill_ms)
                    answers[layout].append([(r.title, r.score, r.lm_score) for r in result.items])
            same += sum(a == b for a, b in zip(answers["plain"], answers["kept"], strict=True))
            total += len(asks)
            elapsed = time.perf_counter() - began
            print(f"user {user} ({n + 1}/{len(users)}): page {sum(times['plain'][a][-1] for a in ASKS):.2f} s "
                  f"plain, {sum(times['kept'][a][-1] for a in ASKS):.2f} s kept; ETA "
                  f"{elapsed / (n + 1) * (len(users) - n - 1):.0f} s", flush=True)
        hits = kept.prompt_hits
    data = {
        "meta": run_meta(model_path, genre=args.genre, prompt_cache=args.prompt_cache, shelf_items=len(shelf),
                         prompt_hits=hits),
        "users": users, "times": times, "prefill_ms": prefill, "summary": summarize(times, same, total, prefill),
    }
    save_run(data, args.out, "prompt-cache", render)
    return 0


if __name__ == "__main__":
    from bench.entry import run

    raise SystemExit(run(main))
