"""Does the llama.cpp build change recommendation quality? One evaluation under several venvs, paired by user.

    python -m bench.build_quality --python native=.venv/bin/python --python amx=/tmp/ci/.venv/bin/python \\
        --split valid --users all --workers 2

Why: builds for other instruction sets (AVX2, AVX-512, AMX) sum in other orders, and this model turns the
rounding into score moves of up to ~0.5 nats and other top-10 orders (docs/FINDINGS.md). Every exactness claim
holds within one build; across builds the question is whether quality moves. Each ``--python NAME=PATH``
runs ``genrec-edge evaluate`` in that interpreter on the same users (its own log under ``--logs``: a run cut
short resumes), the first is the reference. Reported: HR@10, NDCG@10 and MRR@10 with 95% bootstrap intervals,
each build minus the reference paired on the same users, how many top-10 lists are identical, their mean
overlap, and the users whose hit changed.

Output: ``bench/results/build-quality-<date>.{md,json,png}``; ``--render RUN.json`` redraws a saved run.
The other venv needs its own llama-cpp-python wheel and a genrec-edge install (``bench/cpu_builds.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.saved_run import render_saved, run_meta, save_figure, save_run

METRICS = ("HR@10", "NDCG@10", "MRR")
BUILD_INFO = ("import json, sys, llama_cpp; from pathlib import Path; m = Path(sys.prefix) / 'llama-cpp-build.json'; "
              "r = json.loads(m.read_text()) if m.exists() else {}; print(json.dumps({'key': r.get('key'), "
              "'amx': r.get('amx'), 'cpu': r.get('cpu'), 'system_info': llama_cpp.llama_print_system_info()"
              ".decode().strip()}))")


def evaluate(python: str, log: Path, args) -> tuple[dict, dict]:
    """(this build's identity, its per-user results in the report's user order) from ``evaluate`` in ``python``."""
    try:
        info = subprocess.run([python, "-c", BUILD_INFO], capture_output=True, text=True, cwd=log.parent)
    except OSError as exc:
        raise SystemExit(f"error: cannot run {python}: {exc.strerror or exc}") from None
    if info.returncode != 0:
        raise SystemExit(f"error: {python} cannot load llama_cpp: {(info.stderr.strip().splitlines() or ['?'])[-1]}")
    command = [python, "-m", "genrec_edge", "evaluate", "--model", str(args.model or "default"), "--split",
               args.split, "--users", args.users, "--seed", str(args.seed), "--workers", str(args.workers),
               "--out", str(log), "--json"] + (["--db", str(args.db)] if args.db else [])
    # Run from the logs folder, not a checkout: each venv imports the genrec-edge installed in it.
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=log.parent)  # progress: stderr, live
    if proc.returncode != 0:
        raise SystemExit(f"error: evaluate under {python} exited {proc.returncode}")
    report = json.loads(proc.stdout)
    (name, run), = report["recommenders"].items()
    from genrec_edge.evalruns import ResultLog

    logged = ResultLog(log).read()[run["key"]]
    results = [logged[user].to_dict() for user in report["users"]]
    return ({**json.loads(info.stdout), "run": name, "run_key": run["key"], "seconds": report["seconds"],
             "reused": run["resumed"]}, results)


def summarize(results: dict[str, list[dict]]) -> dict:
    """Intervals per build, each build minus the first paired by user, and how far their top-10 lists agree."""
    import numpy as np

    from genrec_edge.metrics import overlap_at_k, per_user_metrics
    from genrec_edge.stats import compare, to_jsonable

    names = list(results)
    users = [r["user"] for r in results[names[0]]]
    for name in names[1:]:
        if [r["user"] for r in results[name]] != users:
            raise SystemExit(f"error: {name} was evaluated on other users than {names[0]}")
    per_user = {name: per_user_metrics([r["rank"] for r in results[name]], METRICS) for name in names}
    summary = to_jsonable(compare(per_user))
    ref = results[names[0]]
    agreement = {}
    for name in names[1:]:
        pairs = list(zip(ref, results[name], strict=True))
        agreement[name] = {
            "identical_top10": sum(a["top"][:10] == b["top"][:10] for a, b in pairs),
            "mean_overlap_at_10": float(np.mean([overlap_at_k(a["top"], b["top"], 10) for a, b in pairs])),
            "hit_gained": sum(b["rank"] is not None and a["rank"] is None for a, b in pairs),
            "hit_lost": sum(a["rank"] is not None and b["rank"] is None for a, b in pairs),
        }
    return {"users": len(users), "recommenders": summary["recommenders"], "agreement": agreement,
            "differences": [d for d in summary["differences"] if d["a"] == names[0]]}


def render(data: dict, stem: Path) -> None:
    meta, s = data["meta"], data["summary"]
    names = list(meta["builds"])
    ref = names[0]

    def cell(e, signed=False):
        sign = "+" if signed else ""
        return f"{e['mean']:{sign}.3f} [{e['low']:{sign}.3f}, {e['high']:{sign}.3f}]"

    lines = [
        "# Recommendation quality by llama.cpp build (`python -m bench.build_quality`)", "",
        f"{meta['model']}, `evaluate --split {meta['split']} --users {meta['users']} --seed {meta['seed']}`, "
        f"{s['users']} users, the model's own prior; {meta['machine']} with {meta['cpus']} CPUs, {meta['date']}. "
        "Mean [95% bootstrap interval]; differences are paired on the same users (* = the interval excludes 0).", "",
        "| build | HR@10 | NDCG@10 | MRR@10 |", "|---|---:|---:|---:|",
    ]
    for name in names:
        m = s["recommenders"][name]
        lines.append(f"| {name} | " + " | ".join(cell(m[x]) for x in METRICS) + " |")
    for d in s["differences"]:
        m = d["metrics"]
        marks = ["*" if m[x]["low"] > 0 or m[x]["high"] < 0 else "" for x in METRICS]
        lines.append(f"| {d['b']} − {ref} (paired) | " +
                     " | ".join(f"{-m[x]['mean']:+.3f} [{-m[x]['high']:+.3f}, {-m[x]['low']:+.3f}]{k}"
                                for x, k in zip(METRICS, marks, strict=True)) + " |")
    lines += ["", "| build against " + ref + " | identical top-10 lists | mean top-10 overlap | hits gained | hits lost |",
              "|---|---:|---:|---:|---:|"]
    for name, a in s["agreement"].items():
        lines.append(f"| {name} | {a['identical_top10']}/{s['users']} | {a['mean_overlap_at_10']:.3f} | "
                     f"{a['hit_gained']} | {a['hit_lost']} |")
    lines += ["", "Builds (`llama-cpp-build.json` key, AMX, and what llama.cpp reports as compiled in):", ""]
    for name, b in meta["builds"].items():
        reused = f", {b['reused']} users' results reused from its log" if b.get("reused") else ""
        lines.append(f"- **{name}** (`{b['python']}`): key {b['key']}, amx {b['amx']}, evaluate took "
                     f"{b['seconds']:.0f} s{reused}; `{b['system_info']}`")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        m = s["recommenders"][name]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(METRICS))]
        means = [m[x]["mean"] for x in METRICS]
        err = [[m[x]["mean"] - m[x]["low"] for x in METRICS], [m[x]["high"] - m[x]["mean"] for x in METRICS]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(METRICS)), ["HR@10", "NDCG@10", "MRR@10"])
    ax.set_ylabel(f"mean over {s['users']} users (95% interval)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(f"quality by llama.cpp build, {meta['split']} split: {meta['date']}", fontsize=10)
    save_figure(fig, stem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", default=[], help="NAME=PATH of a venv's python; the first "
                        "is the reference (repeat, at least two)")
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the default model, Q8_0)")
    parser.add_argument("--db", type=Path, default=None, help="default: the database `genrec-edge init` builds")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    parser.add_argument("--users", default="all", help="N (a seeded sample) or all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--logs", type=Path, default=Path("build-quality-logs"),
                        help="folder of each build's per-user log (resumed by a rerun)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--render", type=Path, help="redraw the table and plot of a saved run (its .json)")
    args = parser.parse_args(argv)
    if args.render:
        return render_saved(parser, args.render, render)
    builds = {}
    for item in args.python:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or not name.replace("-", "").replace("_", "").isalnum():
            parser.error(f"--python: give NAME=PATH (NAME: letters, digits, - and _), not {item!r}")
        if name in builds:
            parser.error(f"--python: {name} given twice")
        # Absolute but not resolved: a venv's python is a symlink out of the venv. A bare name is found on PATH.
        builds[name] = os.path.abspath(path) if os.sep in path else path
    if len(builds) < 2:
        parser.error("--python: give at least two builds to compare")
    if args.workers < 1:
        parser.error("--workers: 1 or more")
    for name in ("model", "db", "logs"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    args.logs.mkdir(parents=True, exist_ok=True)
    identities, results = {}, {}
    for name, python in builds.items():
        print(f"build {name}: {python}", file=sys.stderr, flush=True)
        log = args.logs / f"{name}-{args.split}-{args.users}-s{args.seed}.jsonl"
        identity, results[name] = evaluate(python, log, args)
        identities[name] = {"python": python, **identity}
    from genrec_edge.models import default_model_path

    model = args.model or default_model_path(progress=False)  # built by the first evaluate already
    data = {
        "meta": run_meta(Path(model), split=args.split, users=args.users, seed=args.seed, builds=identities),
        "results": results, "summary": summarize(results),
    }
    save_run(data, args.out, "build-quality", render)
    return 0


if __name__ == "__main__":
    from bench.entry import run

    raise SystemExit(run(main))
