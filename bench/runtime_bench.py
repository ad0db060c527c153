"""Runtime benchmark: catalog-constrained top-k on llama.cpp vs its own raw cost vs transformers.

    .venv/bin/python -m bench.runtime_bench [--users 20] [--hf-users 5] [--threads 2] [--out bench/results]

On the SmolLM2-135M base GGUF and the bundled ml-latest-small catalog, top-10, fixed users (seed 0):

(a) ``Recommender.recommend(user=u, k=10)``: the public API, database reads included;
(b) raw llama.cpp on the same engine: the same history tokens prefilled after the cached prefix, then the
    same number of decode steps with the same number of sequences per step as (a) used, greedy tokens,
    no trie, no log-softmax - the floor (a) can approach;
(c) transformers ``generate(num_beams=W, prefix_allowed_tokens_fn=<the same trie and seen mask>,
    length_penalty=0)`` on the same model dequantized from the same GGUF, same prompt ids, same CPU.

Then catalog-size scaling on synthetic catalogs (1.7k, 9.7k, 62k titles from ml-latest-small's words):
tokenize + trie build time, cache load time, and per-step cost of the search on the real model, split into
time inside llama.cpp and the search's own (Python/numpy) time.

The CPU is shared and noisy: (a) and (b) run interleaved per user and the table reports per-user ratios
(median and min-max), which are steadier than absolute times.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before llama_cpp (FINDINGS.md)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from rich.progress import Progress  # noqa: E402

K = 10
SCALING_SIZES = (1_700, 9_700, 62_000)


def median_spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def median_ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


# ------------------------------------------------------------------------------------------ (b) raw
def raw_llama(rec, history_titles: list[str], batch_sizes: list[int]) -> float:
    """Prefill + the same decode steps/batch sizes as a search, unconstrained. Returns ms."""
    import llama_cpp

    from genrec_edge.prompts import build_prompt_ids

    engine = rec.engine
    with rec.lock:
        prompt = build_prompt_ids(engine.tokenize, engine.eos_id, history_titles, rec.template)
        started = time.perf_counter()
        for seq in range(1, engine.n_seq_max):
            engine.seq_clear(seq)
        engine.seq_copy(0, rec.prompt_seq, -1, -1)
        engine.decode_sequence(prompt[len(rec.prefix) :], rec.prompt_seq, len(rec.prefix))
        row = engine.logits(-1)
        live = 0
        tokens: list[int] = []
        for step, width in enumerate(batch_sizes):
            for seq in range(live + 1, width + 1):  # more sequences this step: fork them
                engine.seq_copy(rec.prompt_seq if step == 0 else 1, seq, -1, -1)
            for seq in range(width + 1, live + 1):  # fewer: drop the extra ones
                engine.seq_clear(seq)
            if step == 0:
                tokens = [int(np.argmax(row))] * width
            tokens = (tokens * width)[:width]
            engine.decode(tokens, [len(prompt) + step] * width, list(range(1, width + 1)), [True] * width)
            tokens = [int(np.argmax(engine.logits(i))) for i in range(width)]
            live = width
        elapsed = (time.perf_counter() - started) * 1000
        llama_cpp.llama_memory_seq_rm(engine.memory, -1, len(rec.prefix), -1)  # keep only the prefix
    return elapsed


# ------------------------------------------------------------------------------------------ (c) transformers
def load_hf(model_path: Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    model.eval()
    return model


def hf_beam_search(model, rec, history_titles, seen_titles, beam: int) -> tuple[float, list[str]]:
    import torch

    from genrec_edge.prompts import build_prompt_ids

    trie = rec.trie
    engine = rec.engine
    prompt = build_prompt_ids(engine.tokenize, engine.eos_id, history_titles, rec.template)
    seen = [rec.title_index[t] for t in seen_titles if t in rec.title_index]
    unseen = trie.unseen_counts(seen)
    eos = engine.eos_id
    n_prompt = len(prompt)

    def allowed(batch_id, input_ids):
        node = trie.walk(input_ids[n_prompt:].tolist())
        if node < 0 or trie.leaf_title[node] >= 0:
            return [eos]  # finished (padding after EOS)
        tokens, nodes = trie.children(node)
        keep = unseen[nodes] > 0
        return tokens[keep].tolist() or [eos]

    input_ids = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=beam,
            num_return_sequences=K,
            max_new_tokens=trie.max_depth,
            prefix_allowed_tokens_fn=allowed,
            length_penalty=0.0,
            do_sample=False,
            early_stopping=True,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    elapsed = (time.perf_counter() - started) * 1000
    titles = []
    for row in out.tolist():
        node = trie.walk(row[n_prompt:][: row[n_prompt:].index(eos) + 1] if eos in row[n_prompt:] else [])
        titles.append(trie.titles[trie.leaf_title[node]] if node >= 0 and trie.leaf_title[node] >= 0 else "?")
    return elapsed, titles


# ------------------------------------------------------------------------------------------ scaling
def synthetic_titles(base_titles: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` distinct title-like strings: 1-4 words from real titles + a year."""
    rng = random.Random(seed)
    words = sorted({w for t in base_titles for w in t.rsplit(" (", 1)[0].split() if w.isprintable()})
    out: set[str] = set()
    while len(out) < n:
        name = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        out.add(f"{name} ({rng.randint(1900, 2024)})")
    return sorted(out)


def scaling(rec, base_titles, histories, progress) -> list[dict]:
    from genrec_edge.engine import SearchStats, constrained_beam_search, log_softmax
    from genrec_edge.prompts import build_prompt_ids
    from genrec_edge.trie import CatalogTrie

    engine = rec.engine
    rows = []
    task = progress.add_task("catalog scaling", total=len(SCALING_SIZES))
    for n in SCALING_SIZES:
        titles = synthetic_titles(base_titles, n)
        t0 = time.perf_counter()
        sequences = [(tuple(engine.tokenize(t)) + (engine.eos_id,), i) for i, t in enumerate(titles)]
        t1 = time.perf_counter()
        trie = CatalogTrie.from_sequences(titles, sequences, engine.eos_id)
        t2 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            trie.save(Path(tmp) / "t.npz")
            t3 = time.perf_counter()
            CatalogTrie.load(Path(tmp) / "t.npz")
            t4 = time.perf_counter()
        beam = min(2 * K, rec.capacity)
        per_step, own_per_step, steps_total = [], [], 0
        with rec.lock:
            for history in histories:
                stats = SearchStats()
                prompt = build_prompt_ids(engine.tokenize, engine.eos_id, history, rec.template)
                for seq in range(1, engine.n_seq_max):
                    engine.seq_clear(seq)
                engine.seq_copy(0, rec.prompt_seq, -1, -1)
                engine.decode_sequence(prompt[len(rec.prefix) :], rec.prompt_seq, len(rec.prefix))
                log_probs = log_softmax(engine.logits(-1))
                constrained_beam_search(
                    engine, trie, trie.title_count, len(prompt), log_probs, K, beam, stats,
                    prompt_seq=rec.prompt_seq, graveyard_seq=rec.graveyard_seq,
                )
                steps = max(stats.decode_steps, 1)
                steps_total += stats.decode_steps
                per_step.append(stats.search_ms / steps)
                own_per_step.append((stats.search_ms - stats.decode_ms) / steps)
        rows.append(
            {
                "titles": n,
                "nodes": trie.n_nodes,
                "tokenize_s": t1 - t0,
                "build_s": t2 - t1,
                "cache_load_s": t4 - t3,
                "step_ms": statistics.median(per_step),
                "step_own_ms": statistics.median(own_per_step),
                "steps": steps_total,
            }
        )
        progress.advance(task)
    return rows


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--hf-users", type=int, default=3, help="users for transformers (slow); 0 skips it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--db", type=Path, default=None, help="default: ml-latest-small ingested into a temp dir")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-scaling", action="store_true")
    args = parser.parse_args(argv)

    import llama_cpp

    from genrec_edge.history import HistoryDB
    from genrec_edge.ingest import ingest
    from genrec_edge.models import base_gguf_path
    from genrec_edge.paths import BUNDLED_DATASET
    from genrec_edge.recommend import Recommender

    workdir = Path(tempfile.mkdtemp(prefix="genrec-bench-"))
    db_path = args.db
    if db_path is None:
        db_path = workdir / "ml.db"
        ingest(db_path, "movielens-csv", BUNDLED_DATASET)
    model_path = base_gguf_path()
    with HistoryDB.open(db_path, readonly=True) as db:
        users = [u for u in db.users() if len(db.history(u, limit=5)) >= 5]
        users = random.Random(0).sample(users, min(args.users, len(users)))
        histories = {u: [h.title for h in db.history(u, limit=20)] for u in users}
        seen = {u: {db.item(i).title for i in db.seen_items(u)} for u in users}
        base_titles = db.catalog().unique_titles

    results: dict = {"a_ms": [], "b_ms": [], "ratio_ab": [], "c_ms": [], "ratio_ca": [], "overlap_ac": []}
    rec = Recommender.open(model_path, db_path, threads=args.threads, cache_dir=workdir / "cache", warn=lambda m: None)
    with Progress() as progress:
        rec.recommend(user=users[0], k=K)  # warm-up: page in the weights
        raw_llama(rec, histories[users[0]], [20] * 3)
        task = progress.add_task("(a) recommend vs (b) raw llama.cpp", total=len(users))
        per_user_a = {}
        for n, u in enumerate(users):
            if n % 2:  # alternate which runs first, so drift in the machine's load does not favour one
                r = rec.recommend(user=u, k=K)
                stats = rec.last_search_stats
                b = raw_llama(rec, histories[u], stats.batch_sizes)
            else:
                r_first = rec.recommend(user=u, k=K)  # the step/batch plan (a deterministic search)
                b = raw_llama(rec, histories[u], rec.last_search_stats.batch_sizes)
                r = rec.recommend(user=u, k=K)
                stats = rec.last_search_stats
                assert [x.title for x in r.items] == [x.title for x in r_first.items]
            results["a_ms"].append(r.timings.total_ms)
            results["b_ms"].append(b)
            results["ratio_ab"].append(r.timings.total_ms / b)
            results.setdefault("steps", []).append(r.timings.decode_steps)
            results.setdefault("prefill_ms", []).append(r.timings.prefill_ms)
            results.setdefault("search_ms", []).append(r.timings.search_ms)
            results.setdefault("own_ms", []).append(r.timings.search_ms - stats.decode_ms)
            per_user_a[u] = (r.timings.total_ms, [x.title for x in r.items])
            progress.advance(task)
        if args.hf_users:
            task = progress.add_task("(c) transformers beam search (loading the model)", total=args.hf_users)
            t0 = time.perf_counter()
            model = load_hf(model_path, args.threads)
            results["hf_load_s"] = time.perf_counter() - t0
            for u in users[: args.hf_users]:
                ms, titles = hf_beam_search(model, rec, histories[u], seen[u], beam=2 * K)
                a_ms, a_titles = per_user_a[u]
                results["c_ms"].append(ms)
                results["ratio_ca"].append(ms / a_ms)
                results["overlap_ac"].append(len(set(titles) & set(a_titles)) / K)
                progress.advance(task)
            del model
        scale_rows = [] if args.no_scaling else scaling(rec, base_titles, [histories[u] for u in users[:6]], progress)
    rec.close()

    lines = [
        "# Runtime benchmark (`python -m bench.runtime_bench`)",
        "",
        f"SmolLM2-135M-Instruct Q4_1 base GGUF, ml-latest-small catalog ({len(base_titles)} titles), top-{K}, "
        f"beam {2 * K}, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"llama.cpp {llama_cpp.__version__}, {time.strftime('%Y-%m-%d %H:%M')}. Shared, noisy CPU: compare ratios.",
        "",
        "| measure | users | median (min-max) |",
        "|---|---|---|",
        f"| (a) recommend total ms | {len(users)} | {median_ms(results['a_ms'])} |",
        f"| (a) prefill ms (history part) | {len(users)} | {median_ms(results['prefill_ms'])} |",
        f"| (a) search ms | {len(users)} | {median_ms(results['search_ms'])} |",
        f"| (a) search's own time ms (outside llama.cpp) | {len(users)} | {median_ms(results['own_ms'])} |",
        f"| (a) decode steps | {len(users)} | {median_ms(results['steps'])} |",
        f"| (b) raw llama.cpp, same prefill + steps + batch, ms | {len(users)} | {median_ms(results['b_ms'])} |",
        f"| **(a) / (b)** (goal <= 1.2) | {len(users)} | **{median_spread(results['ratio_ab'])}** |",
    ]
    if results["c_ms"]:
        lines += [
            f"| (c) transformers beam search ms | {len(results['c_ms'])} | {median_ms(results['c_ms'])} |",
            f"| **(c) / (a)** (goal >= 5) | {len(results['c_ms'])} | **{median_spread(results['ratio_ca'])}** |",
            f"| top-10 overlap (a) vs (c) | {len(results['c_ms'])} | {median_spread(results['overlap_ac'])} |",
            "",
            f"(c) ran on the first {len(results['c_ms'])} users only (model load {results['hf_load_s']:.0f} s, "
            "then several seconds per user); its model is the GGUF dequantized to fp32 by transformers.",
        ]
    if scale_rows:
        base = scale_rows[0]
        lines += [
            "",
            f"## Catalog-size scaling (synthetic titles, {len(users[:6])} users, beam 20, medians)",
            "",
            "| titles | trie nodes | tokenize s | trie build s | cache load s | ms/step | own ms/step | own ms/step vs 1.7k |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in scale_rows:
            lines.append(
                f"| {row['titles']:,} | {row['nodes']:,} | {row['tokenize_s']:.2f} | {row['build_s']:.2f} | "
                f"{row['cache_load_s']:.3f} | {row['step_ms']:.0f} | {row['step_own_ms']:.1f} | "
                f"{row['step_own_ms'] / base['step_own_ms']:.2f}x |"
            )
        lines += [
            "",
            "ms/step includes llama_decode of the beams (independent of the catalog); own ms/step is the "
            "search's Python/numpy work per step (trie expansion, top-k, sequence bookkeeping, normaliser). "
            "Tokenizing is paid once per (model, catalog): the trie is cached on disk.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime.md").write_text(text, encoding="utf-8")
    (args.out / "runtime.json").write_text(
        json.dumps({"results": results, "scaling": scale_rows}, indent=1), encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
