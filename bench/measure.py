"""One quantization level (or the transformers peer) measured in its own process, so peak RSS is its own.

``python -m bench.measure --mode llama --model M.gguf --db D.db --examples EX.json --out OUT.json`` does,
in this order, on one model:

1. **llama-bench's tests on the low-level API**: load (``llama_model_load_from_file``, timed), a warm-up,
   then ``reps`` × pp<N> (one batch of N seeded random tokens into an empty KV cache, tokens/s =
   N / time) and ``reps`` × tg<M> (M single-token decodes from an empty cache, tokens/s = M / time);
2. **recommend**: ``Recommender.open`` (timed) and, per example, ``recommend(history=..., k)`` - the
   public API, so the latency is what a caller sees (``Timings.total_ms``) - keeping the ranked titles;
3. **the first constrained step's distribution** per example: the log-softmax of the logits after the
   prompt, at the trie root's children (first title tokens), with the mask of those still leading to an
   unseen title. The parent turns two levels' rows into a KL divergence.

``--mode hf`` runs the peer instead: transformers' beam search with ``prefix_allowed_tokens_fn`` over
the same catalog trie (same prompt ids, same seen-title mask, summed log-probs: ``length_penalty=0``)
on the model dequantized from the same GGUF.

Progress goes to stdout as ``@@bench {json}`` lines (the parent draws the bars); the result is
``--out`` (JSON) plus ``<out>.npz`` (first-step rows). Peak RSS (VmHWM) is read last.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before llama_cpp: OpenMP spin-wait (FINDINGS.md)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

EVENT_PREFIX = "@@bench "


def emit(**event) -> None:
    print(EVENT_PREFIX + json.dumps(event), flush=True)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB: Linux's VmHWM, else ru_maxrss.

    Not ru_maxrss on Linux: exec keeps the parent's high-water mark in it (``signal->maxrss``), so a
    child started by a parent that once held 500 MB reports >= 500 MB whatever it uses itself.
    VmHWM belongs to the address space exec created.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def mean_sd(values: list[float]) -> dict:
    return {
        "values": values,
        "mean": statistics.fmean(values) if values else float("nan"),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


# ------------------------------------------------------------------------------------------ llama-bench
def llama_bench(model_path: Path, threads: int, n_prompt: int, n_gen: int, reps: int, seed: int) -> dict:
    """pp<n_prompt> / tg<n_gen> tokens/s in llama-bench's convention, plus the model load time."""
    import numpy as np

    from genrec_edge.engine import (
        Engine,
        llama_cpp,  # through engine.py: its OpenMP settings precede the load
    )

    started = time.perf_counter()
    model = Engine.load_model(model_path)
    load_ms = (time.perf_counter() - started) * 1000
    engine = Engine.open(model_path, n_ctx=n_prompt + n_gen, n_seq_max=1, threads=threads, model=model)
    try:
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, engine.n_vocab, size=n_prompt).tolist()
        gen = rng.integers(0, engine.n_vocab, size=n_gen).tolist()

        def run_pp(tokens) -> float:
            engine.seq_clear(-1)
            t0 = time.perf_counter()
            engine.decode_sequence(tokens, 0, 0)
            llama_cpp.llama_synchronize(engine.ctx)
            return time.perf_counter() - t0

        def run_tg(tokens) -> float:
            engine.seq_clear(-1)
            t0 = time.perf_counter()
            for pos, token in enumerate(tokens):
                engine.decode([token], [pos], [0], [True])
            llama_cpp.llama_synchronize(engine.ctx)
            return time.perf_counter() - t0

        # Warm-up, as llama-bench does: page the weights in, let the thread pool start.
        run_pp(prompt[: min(64, n_prompt)])
        run_tg(gen[: min(8, n_gen)])
        pp, tg = [], []
        for rep in range(reps):
            emit(event="phase", name=f"pp{n_prompt} {rep + 1}/{reps}")
            pp.append(n_prompt / run_pp(prompt))
        for rep in range(reps):
            emit(event="phase", name=f"tg{n_gen} {rep + 1}/{reps}")
            tg.append(n_gen / run_tg(gen))
    finally:
        engine.close()
    return {"load_ms": load_ms, "pp": {"n": n_prompt, **mean_sd(pp)}, "tg": {"n": n_gen, **mean_sd(tg)}}


# ------------------------------------------------------------------------------------------ first step
# ------------------------------------------------------------------------------------------ modes
def measure_llama(args, examples: list[dict]) -> dict:
    import numpy as np

    from genrec_edge.recommend import Recommender, default_beam

    rss_start = peak_rss_mb()
    bench = llama_bench(args.model, args.threads, args.pp, args.tg, args.reps, args.seed)
    rss_bench = peak_rss_mb()  # model + a one-sequence context: the llama-bench footprint
    emit(event="phase", name="recommend")
    warnings: list[str] = []
    started = time.perf_counter()
    # prior="none": the language model alone at every level. A cf-prior.json beside the F16 (the default
    # model's folder) would otherwise fuse into F16's ranking only - the quantized files in the work dir have
    # no sidecar - so the agreement columns and paired differences would compare the prior, not the level.
    rec = Recommender.open(args.model, args.db, threads=args.threads, beam=args.beam, warn=warnings.append,
                           prior="none")
    open_ms = (time.perf_counter() - started) * 1000
    tokens, _ = rec.trie.children(0)
    latency, prefill, search, prompt_tokens, rankings = [], [], [], [], []
    first_rows = np.zeros((len(examples), len(tokens)), dtype=np.float32)
    first_mask = np.zeros((len(examples), len(tokens)), dtype=bool)
    try:
        emit(event="users", done=0, total=len(examples))
        for i, example in enumerate(examples):
            history = example["history"]
            out = rec.recommend(history=history, k=args.k, first_step=True)
            latency.append(out.timings.total_ms)
            prefill.append(out.timings.prefill_ms)
            search.append(out.timings.search_ms)
            prompt_tokens.append(out.timings.prompt_tokens)
            rankings.append([r.title for r in out.items])
            first_rows[i] = out.first_step.log_probs
            first_mask[i] = out.first_step.allowed
            emit(event="users", done=i + 1, total=len(examples))
        beam = rec.beam if rec.beam is not None else min(default_beam(args.k), rec.capacity)
    finally:
        rec.close()
    np.savez_compressed(args.out.with_suffix(".npz"), tokens=tokens, logp=first_rows, mask=first_mask)
    return {
        "mode": "llama",
        **bench,
        "open_ms": open_ms,
        "beam": beam,
        "warnings": warnings,
        "users": [e["user"] for e in examples],
        "latency_ms": latency,
        "prefill_ms": prefill,
        "search_ms": search,
        "prompt_tokens": prompt_tokens,
        "rankings": rankings,
        "rss_start_mb": rss_start,
        "peak_rss_bench_mb": rss_bench,
        "peak_rss_mb": peak_rss_mb(),
    }


def measure_hf(args, examples: list[dict]) -> dict:
    """transformers' constrained beam search on the model dequantized from the same GGUF (bench.hf_peer)."""
    from bench.hf_peer import constrained_beam, load_hf
    from genrec_edge.recommend import Recommender, default_beam

    rss_start = peak_rss_mb()
    # The trie, prompt ids and seen-title masks come from the recommender itself: the peer sees the same tokens.
    with Recommender.open(args.model, args.db, threads=args.threads, beam=args.beam, warn=lambda m: None,
                          prior="none") as rec:
        trie, eos = rec.trie, rec.engine.eos_id
        prompts = [rec.prompt_ids(e["history"]) for e in examples]
        unseen = [rec.unseen_counts(set(e["history"])) for e in examples]
        beam = rec.beam if rec.beam is not None else min(default_beam(args.k), rec.capacity)
    emit(event="phase", name="load transformers")
    started = time.perf_counter()
    model = load_hf(args.model, args.threads)
    load_ms = (time.perf_counter() - started) * 1000

    latency, rankings = [], []
    emit(event="users", done=0, total=len(examples))
    for i, (prompt, counts) in enumerate(zip(prompts, unseen, strict=True)):
        ms, titles = constrained_beam(model, trie, prompt, counts, eos, beam, args.k)
        latency.append(ms)
        rankings.append(titles)
        emit(event="users", done=i + 1, total=len(examples))
    import torch
    import transformers

    return {
        "mode": "hf",
        "load_ms": load_ms,
        "beam": beam,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "users": [e["user"] for e in examples],
        "latency_ms": latency,
        "rankings": rankings,
        "rss_start_mb": rss_start,
        "peak_rss_mb": peak_rss_mb(),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.measure", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("llama", "hf"), default="llama")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--examples", type=Path, required=True, help='JSON: [{"user": u, "history": [titles]}]')
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--beam", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from genrec_edge.errors import GenrecError

    args = parse_args(argv)
    try:
        examples = json.loads(args.examples.read_text(encoding="utf-8"))
        result = measure_llama(args, examples) if args.mode == "llama" else measure_hf(args, examples)
    except GenrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    tmp = args.out.with_suffix(".partial")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
