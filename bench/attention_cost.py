"""What attention costs in a request, and why llama.cpp's other attention paths are not the way out.

    .venv/bin/python -m bench.attention_cost [--users 16] [--reps 5] [--model PATH] [--db PATH]

On the default model (Q8_0) unless told otherwise, threads as shipped (up to ``--threads``, adapted to
other programs' load with a short spin: cpu_share.py; run it on an otherwise idle machine), prior off,
top-10, beam 20, the users of ``bench.runtime_bench``:

1. **Context length.** One call of 32 tokens with logits at every position (the search's kind of call,
   ``Engine.decode``) after a context of L cells of the same sequence, for flash attention on (what ships:
   llama.cpp's row-by-row CPU kernel, engine.py) and off (llama.cpp's matrix-product attention). Medians
   of ``--reps`` calls, each on a freshly filled context. The row-by-row kernel's cost grows with L.
2. **Prefill grouping.** A 230-token prompt decoded in calls of at most 63 tokens (what ships: every call
   stays on the row-by-row kernel) vs one call (the tiled kernel, whose rounding depends on what else the
   cache holds: docs/FINDINGS.md).
3. **Whole requests, flash attention on vs off**, interleaved user by user with the order alternating:
   p50s, the paired per-user ratio, and how many top-10 lists and scores agree.

Output: ``bench/results/attention-cost-<date>.{md,json,png}``. The CPU is shared: compare ratios of one
run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before llama_cpp (FINDINGS.md)

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.saved_run import add_run_arguments, render_saved, save_figure, save_run  # noqa: E402

K, BEAM = 10, 20
CALL_TOKENS = 32
CONTEXTS = (0, 63, 252, 504)
PROMPT_TOKENS = 230
ATTENTION = {"on": None, "off": False}  # Engine.open(flash_attn=...): None is llama.cpp's choice (ships)


def _random_tokens(engine, n: int, rng: np.random.Generator) -> list[int]:
    from genrec_edge.engine import llama_cpp

    n_vocab = int(llama_cpp.llama_vocab_n_tokens(engine.vocab))
    return rng.integers(min(100, n_vocab - 1), n_vocab, size=n).tolist()


def context_costs(model_path: Path, threads: int, reps: int, contexts=CONTEXTS) -> dict:
    """Part 1: {attention: {L: median ms of a CALL_TOKENS-token call after L cells}}."""
    from genrec_edge.engine import Engine

    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for name, flash in ATTENTION.items():
        with Engine.open(model_path, n_ctx=max(contexts) + CALL_TOKENS + 64, n_seq_max=1, threads=threads,
                         flash_attn=flash) as engine:
            times: dict[int, list[float]] = {L: [] for L in contexts}
            for _ in range(reps):
                for L in contexts:
                    engine.seq_clear(0)
                    engine.reset()
                    if L:
                        engine.decode_sequence(_random_tokens(engine, L, rng), 0, 0, last_logits=False)
                    tokens = _random_tokens(engine, CALL_TOKENS, rng)
                    began = time.perf_counter()
                    engine.decode(tokens, list(range(L, L + CALL_TOKENS)), [0] * CALL_TOKENS, [True] * CALL_TOKENS)
                    times[L].append((time.perf_counter() - began) * 1000)
            out[name] = {str(L): statistics.median(ms) for L, ms in times.items()}
    return out


def prefill_costs(model_path: Path, threads: int, reps: int, n_tokens: int = PROMPT_TOKENS) -> dict:
    """Part 2: median ms of an ``n_tokens`` prompt in 63-token calls vs one call (flash attention as shipped).

    An ``Engine`` on a context of our own whose micro-batch holds the whole prompt (``Engine.open`` never
    allows more than 63 tokens a call); its thread count stays fixed.
    """
    from genrec_edge.engine import EXACT_BATCH, Engine, EngineError, llama_cpp

    model = Engine.load_model(model_path)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = int(-(-(n_tokens + 64) // 256) * 256)
    params.n_batch = params.n_ubatch = n_tokens
    params.n_seq_max = 2  # the prompt's sequence + the engine's padding sequence
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise EngineError(f"llama.cpp could not create a context for a {n_tokens}-token call")
    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {f"calls of {EXACT_BATCH}": [], "one call": []}
    with Engine(model_path, model, llama_cpp.llama_model_get_vocab(model), ctx, params.n_ctx, 1, n_tokens,
                threads) as engine:
        for _ in range(reps):
            prompt = _random_tokens(engine, n_tokens, rng)
            for name, size in ((f"calls of {EXACT_BATCH}", EXACT_BATCH), ("one call", n_tokens)):
                engine.seq_clear(0)
                began = time.perf_counter()
                for start in range(0, n_tokens, size):
                    engine.decode_sequence(prompt[start:start + size], 0, start, last_logits=start + size >= n_tokens)
                times[name].append((time.perf_counter() - began) * 1000)
    return {name: statistics.median(ms) for name, ms in times.items()}


def request_pairs(model_path: Path, db: Path, users: list[int], threads: int, progress=None) -> list[dict]:
    """Part 3: per user, the request with flash attention on and off (one process, order alternating)."""
    from genrec_edge.recommend import Recommender

    recs = {name: Recommender.open(model_path, db, threads=threads, beam=BEAM, prior="none", flash_attn=flash)
            for name, flash in ATTENTION.items()}
    try:
        for rec in recs.values():  # warm: first-call allocations out of the timed requests
            rec.recommend(users[0], k=K)
        rows = []
        for i, user in enumerate(users):
            row: dict = {"user": user}
            for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
                began = time.perf_counter()
                result = recs[name].recommend(user, k=K)
                row[name] = {"ms": (time.perf_counter() - began) * 1000, "prefill_ms": result.timings.prefill_ms,
                             "titles": [r.title for r in result.items], "scores": [r.score for r in result.items]}
            rows.append(row)
            if progress:
                progress()
        return rows
    finally:
        for rec in recs.values():
            rec.close()


def summarize(rows: list[dict]) -> dict:
    ratios = [r["off"]["ms"] / r["on"]["ms"] for r in rows]
    same = sum(r["on"]["titles"] == r["off"]["titles"] for r in rows)
    diffs = [max((abs(a - b) for a, b in zip(r["on"]["scores"], r["off"]["scores"], strict=True)), default=0.0)
             for r in rows if r["on"]["titles"] == r["off"]["titles"]]
    shared = [len(set(r["on"]["titles"]) & set(r["off"]["titles"])) / max(1, len(r["on"]["titles"])) for r in rows]
    return {
        "users": len(rows),
        "p50_on_ms": statistics.median(r["on"]["ms"] for r in rows),
        "p50_off_ms": statistics.median(r["off"]["ms"] for r in rows),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "faster_off": sum(x < 1 for x in ratios),
        "same_top": same,
        "max_score_diff_same_top": max(diffs) if diffs else None,
        "mean_overlap": statistics.fmean(shared),
    }


def render(data: dict, stem: Path) -> None:
    """``stem``.md and ``stem``.png from a saved run's dict."""
    meta, ctx, pre, summ = data["meta"], data["contexts"], data["prefill"], data["summary"]
    lines = [
        "# Attention's cost (`python -m bench.attention_cost`)", "",
        f"{meta['model']}, {meta['threads_desc']}, {meta['machine']}, llama-cpp-python {meta['llama_cpp']}, "
        f"{meta['date']}. Shared, noisy CPU: compare the ratios of one run.", "",
        f"## 1. A {CALL_TOKENS}-token call with logits after L cells of its own sequence (median of {meta['reps']})", "",
        "| L | flash attention on (ships) ms | off ms | off / on |", "|---:|---:|---:|---:|",
    ]
    for L in ctx["on"]:
        lines.append(f"| {L} | {ctx['on'][L]:.0f} | {ctx['off'][L]:.0f} | {ctx['off'][L] / ctx['on'][L]:.2f}× |")
    first, last = next(iter(ctx["on"])), list(ctx["on"])[-1]
    lines += ["", f"With flash attention the call grows {ctx['on'][last] / ctx['on'][first]:.2f}× from L={first} to "
              f"L={last}; without it {ctx['off'][last] / ctx['off'][first]:.2f}×.", "",
              f"## 2. A {meta['prompt_tokens']}-token prompt (median of {meta['reps']})", "",
              "| | ms |", "|---|---:|"]
    names = list(pre)
    lines += [f"| {n} | {pre[n]:.0f} |" for n in names]
    lines += ["", f"one call / {names[0]}: **{pre[names[1]] / pre[names[0]]:.2f}×** (one call uses the tiled kernel: "
              "scores then depend on what else the cache holds, docs/FINDINGS.md).", "",
              f"## 3. Whole requests, flash attention on vs off ({summ['users']} users, interleaved)", "",
              "| | on (ships) | off |", "|---|---:|---:|",
              f"| total ms p50 | {summ['p50_on_ms']:.0f} | {summ['p50_off_ms']:.0f} |", "",
              f"Paired off / on: median **{summ['ratio_median']:.2f}×** (range {summ['ratio_min']:.2f}–"
              f"{summ['ratio_max']:.2f}×; off faster for {summ['faster_off']}/{summ['users']} users).",
              f"Identical top-{K} titles: **{summ['same_top']}/{summ['users']}** users; mean top-{K} overlap "
              f"{summ['mean_overlap']:.2f}" + (f"; largest score difference where the titles agree "
                                               f"{summ['max_score_diff_same_top']:.2g}."
                                               if summ["max_score_diff_same_top"] is not None else "."), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [int(L) for L in ctx["on"]]
    for name, style in (("on", "o-"), ("off", "s--")):
        left.plot(xs, [ctx[name][str(L)] for L in xs], style, label=f"flash attention {name}")
    left.set_xlabel("cells already in the sequence (L)")
    left.set_ylabel(f"ms per {CALL_TOKENS}-token call")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    on = [r["on"]["ms"] for r in data["requests"]]
    off = [r["off"]["ms"] for r in data["requests"]]
    same = [r["on"]["titles"] == r["off"]["titles"] for r in data["requests"]]
    right.scatter([a for a, s in zip(on, same, strict=True) if s], [b for b, s in zip(off, same, strict=True) if s], label="same top-10")
    right.scatter([a for a, s in zip(on, same, strict=True) if not s], [b for b, s in zip(off, same, strict=True) if not s], marker="x",
                  color="tab:red", label="different top-10")
    top = max(on + off) * 1.05
    right.plot([0, top], [0, top], color="0.5", linewidth=0.8)
    right.set_xlim(0, top)
    right.set_ylim(0, top)
    right.set_xlabel("request ms, flash attention on (ships)")
    right.set_ylabel("request ms, off")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(f"attention's cost: {meta['model']}, {meta['threads']} threads, {meta['date']}")
    save_figure(fig, stem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="context lengths L of part 1")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.render:
        return render_saved(parser, args.render, render)
    try:
        contexts = sorted({int(x) for x in args.contexts.split(",") if x.strip()})
    except ValueError:
        parser.error(f"--contexts takes comma-separated whole numbers (got {args.contexts!r})")
    if args.users < 1 or args.reps < 1 or not contexts or contexts[0] < 0:
        parser.error("--users and --reps must be at least 1, --contexts non-negative")

    from tqdm.auto import tqdm

    from bench.runtime_bench import bench_users
    from genrec_edge import engine  # llama_cpp comes only through it: the shipped OpenMP settings
    from genrec_edge.models import default_model_path
    from genrec_edge.paths import default_db

    model_path = args.model or default_model_path()
    db = args.db or default_db()
    users = bench_users(db, args.users)
    print(f"1/3 context lengths {contexts}, 2/3 prefill, 3/3 {len(users)} users x 2 requests", flush=True)
    contexts_ms = context_costs(model_path, args.threads, args.reps, contexts)
    prefill_ms = prefill_costs(model_path, args.threads, args.reps)
    with tqdm(total=len(users), desc="3/3 requests on/off", unit="user") as bar:
        rows = request_pairs(model_path, db, users, args.threads, progress=lambda: bar.update(1))
    date = time.strftime("%Y-%m-%d %H:%M")
    data = {
        "meta": {"model": f"{model_path.name} ({model_path.parent.name})", "threads": args.threads,
                 "threads_desc": (f"up to {args.threads} threads, adaptive, spin {engine.OPENMP_SPIN}"
                                  if engine.ADAPT_THREADS else f"{args.threads} threads fixed, "
                                  f"spin {engine.OPENMP_SPIN or 0}"),
                 "machine": platform.machine(), "llama_cpp": engine.llama_cpp.__version__, "date": date,
                 "reps": args.reps, "prompt_tokens": PROMPT_TOKENS},
        "contexts": contexts_ms, "prefill": prefill_ms, "requests": rows, "summary": summarize(rows),
    }
    save_run(data, args.out, "attention-cost", render)
    return 0


if __name__ == "__main__":
    from bench.entry import run

    raise SystemExit(run(main))
