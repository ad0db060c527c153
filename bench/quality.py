"""The quality comparison of record: the fused default vs SASRec-CE vs the LLM alone vs popularity.

    .venv/bin/python -m bench.quality [--users all] [--split test] [--workers auto]

In one run, on the same users of the bundled ml-latest-small (the project's protocol, README):

1. SASRec-CE is trained here to early stopping (valid HR@10 every 2 epochs, patience 4, seed 0: the
   recipe of the shipped prior, ``genrec-edge prior build``);
2. ``genrec-edge evaluate``'s library scores the default model at Q8_0 with its shipped prior (the fused
   score, λ tuned on the validation split) and with ``prior="none"`` (the LLM alone), that SASRec, and
   popularity, with 95% bootstrap intervals, paired differences, and slices by the target's popularity
   and by history length;
3. writes ``bench/results/<date>-quality.{md,json,png}``: the tables, every user's target rank per
   recommender (so a reader can recompute any number), the ratios fused / SASRec with paired bootstrap
   intervals, and the provenance (model and prior hashes, λ, versions, CPU, commit).

Per-user results stream to a resumable log (``--log``): an interrupted run continues where it stopped.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch or llama.cpp (FINDINGS.md)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

GOAL = 1.2
SLICE_METRICS = ("HR@10", "NDCG@10")


def ratio_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) with a paired percentile bootstrap interval (users resampled together)."""
    from scipy.stats import bootstrap

    ratio = float(a.mean() / b.mean()) if b.mean() else float("nan")
    res = bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis=axis) / y.mean(axis=axis), paired=True,
                    vectorized=True, n_resamples=5000, method="percentile", random_state=seed)
    return ratio, float(res.confidence_interval.low), float(res.confidence_interval.high)


def per_user_ranks(log: Path, keys: dict[str, str]) -> dict[str, dict[int, int | None]]:
    """Every user's target rank per run name, read back from the evaluation log."""
    by_key = {key: name for name, key in keys.items()}
    out: dict[str, dict[int, int | None]] = {name: {} for name in keys}
    with open(log, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            name = by_key.get(record.get("run"))
            if name is not None and "user" in record:
                out[name][int(record["user"])] = record.get("rank")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, default=None, help="default: the database `genrec-edge init` builds")
    parser.add_argument("--split", default="test")
    parser.add_argument("--users", default="all", help="N (seeded sample) or all")
    parser.add_argument("--batch", type=int, default=1, help="LLM requests per search (same results)")
    parser.add_argument("--workers", default="auto", help="LLM search processes: N or auto (one single-thread "
                        "process per core; evaluate's default)")
    parser.add_argument("--threads", type=int, default=None, help="threads per search process (default: as "
                        "--workers auto chooses) and for training SASRec (default: 2, the shipped prior's recipe)")
    parser.add_argument("--sasrec", type=Path, default=None, help="a SASRec saved by `baseline sasrec --save` "
                        "instead of training one here")
    parser.add_argument("--log", type=Path, default=None, help="per-user results log (resumable)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    from genrec_edge.errors import GenrecError

    try:
        return run(args)
    except GenrecError as exc:  # one line and our exit code, as the CLI and bench.run do
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    from genrec_edge.commands import parse_users
    from genrec_edge.errors import UsageError

    # Every argument is checked before SASRec trains for minutes.
    if args.split not in ("test", "valid"):
        raise UsageError(f"--split is test or valid (got {args.split!r})")
    users = parse_users(args.users)
    for name in ("batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    from genrec_edge.pool import parse_workers

    args.workers = parse_workers(args.workers)
    if args.sasrec is not None and not (args.sasrec / "config.json").is_file():
        raise UsageError(f"--sasrec {args.sasrec}: not a SASRec saved by `genrec-edge baseline sasrec --save`")

    from genrec_edge.baselines import train_sasrec
    from genrec_edge.evalruns import RecommenderSpec, evaluate_recommenders
    from genrec_edge.hashing import sha256_file
    from genrec_edge.history import HistoryDB
    from genrec_edge.metrics import REPORTED, per_user_metrics
    from genrec_edge.models import default_model_path
    from genrec_edge.paths import default_db
    from genrec_edge.stats import format_estimate

    started = time.perf_counter()
    db_path = args.db or default_db()
    model = default_model_path()
    workdir = Path(tempfile.mkdtemp(prefix="genrec-quality-"))
    sasrec_dir = args.sasrec
    train_report = None
    with HistoryDB.open(db_path, readonly=True) as db:
        dataset = db.dataset()
        dataset_name = dataset.name if dataset else db_path.name
        if sasrec_dir is None:
            sequences, catalog = list(db.sequences()), db.catalog()
    if sasrec_dir is None:
        print("training SASRec-CE to early stopping ...", file=sys.stderr, flush=True)
        sasrec = train_sasrec(sequences, catalog, eval_every=2, patience=4, seed=0, threads=args.threads or 2)
        sasrec_dir = sasrec.save(workdir / "sasrec")
        train_report = sasrec.report.__dict__ if sasrec.report else None
    log = args.log or workdir / "results.jsonl"
    specs = [RecommenderSpec("llm", None, None), RecommenderSpec("llm", None, "none"),
             RecommenderSpec("sasrec", sasrec_dir), RecommenderSpec("pop")]
    evaluation = evaluate_recommenders(specs, db=db_path, split=args.split, users=users, out=log,
                                       by=("popularity", "history"), threads=args.threads, batch=args.batch,
                                       workers=args.workers)
    names = list(evaluation.runs)
    fused, plain, sas, pop = names
    ranks = per_user_ranks(log, {n: r["key"] for n, r in evaluation.runs.items()})
    order = list(evaluation.users)
    cutoff = 10
    per_user = {n: per_user_metrics([ranks[n].get(u) if ranks[n].get(u) is None or ranks[n][u] <= cutoff else None
                                     for u in order], ("HR@10", "NDCG@10")) for n in names}
    ratios = {m: ratio_interval(np.asarray(per_user[fused][m]), np.asarray(per_user[sas][m])) for m in SLICE_METRICS}

    summary = evaluation.summary
    prior_json = json.loads((model.parent / "cf-prior.json").read_text(encoding="utf-8"))
    prior_json.get("trained_on", {}).pop("title_counts", None)
    from bench.run import cpu_model, git_commit

    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "commit": git_commit(),
            "model": str(model.name), "model_sha256": sha256_file(model), "prior": prior_json,
            "sasrec_dir": str(sasrec_dir), "sasrec_training": train_report, "db": str(db_path),
            "seconds": round(time.perf_counter() - started, 1), "threads": args.threads, "batch": args.batch,
            "workers": args.workers}

    lines = [f"# Quality: fused default vs SASRec-CE vs the LLM alone vs popularity ({evaluation.split} split)", "",
             f"`python -m bench.quality` — {len(order)} users of {dataset_name}, {meta['date']}, {meta['cpu']}, commit "
             f"{meta['commit']}, {meta['seconds'] / 60:.0f} min. Mean [95% bootstrap interval]; "
             "differences are paired (the same users resampled together); * = the interval excludes 0.", "",
             f"- **{fused}**: the default model ({model.name}) with its shipped prior: "
             f"{prior_json['kind']}, λ = {prior_json['weight']:g} (tuned on the validation split), variant "
             f"{prior_json['variant']}.",
             f"- **{plain}**: the same model, no prior.",
             (f"- **{sas}**: SASRec-CE trained in this run to early stopping (best epoch "
              f"{train_report['best_epoch']}, valid HR@10 {train_report['best_valid_hr10']:.4f})."
              if train_report else f"- **{sas}**: SASRec-CE loaded from `{sasrec_dir}` (`--sasrec`), not trained "
              "in this run."),
             f"- **{pop}**: popularity on the training part.", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in evaluation.metrics:
        lines.append(f"| {metric} | " + " | ".join(format_estimate(summary["recommenders"][n][metric]) for n in names)
                     + " |")
    lines += ["", "## Paired differences", "", "| pair | " + " | ".join(evaluation.metrics) + " |",
              "|---|" + "---:|" * len(evaluation.metrics)]
    for pair in summary["differences"]:
        cells = [format_estimate(pair["metrics"][m], signed=True) + (" *" if pair["metrics"][m].excludes_zero else "")
                 for m in evaluation.metrics]
        lines.append(f"| {pair['a']} − {pair['b']} | " + " | ".join(cells) + " |")
    lines += ["", f"## The goal: fused ≥ {GOAL}× SASRec on HR@10 and NDCG@10, paired difference above 0", ""]
    diff = next(p for p in summary["differences"] if {p["a"], p["b"]} == {fused, sas})
    for metric in SLICE_METRICS:
        r, lo, hi = ratios[metric]
        est = diff["metrics"][metric]
        sign = 1 if diff["a"] == fused else -1
        low, high = sorted((sign * est.low, sign * est.high))
        met = r >= GOAL and low > 0
        shown = f"**{r:.2f}×** [{lo:.2f}, {hi:.2f}]" if np.isfinite(r) else f"undefined ({sas} scored 0)"
        lines.append(f"- {metric}: ratio {shown}, difference {sign * est.mean:+.4f} "
                     f"[{low:+.4f}, {high:+.4f}]: {'met' if met else 'not met'}.")
    for slicing, groups in summary["slices"].items():
        title = {"popularity": "By the target's popularity in training (head: titles holding the first 50% of "
                               "interactions; torso: to 80%; tail: the rest)",
                 "history": "By history length (items before the target)"}[slicing]
        lines += ["", f"## {title}", "", "| slice (users) | " + " | ".join(f"{n} {m}" for m in SLICE_METRICS for n in
                                                                          (fused, sas, plain)) + " |",
                  "|---|" + "---:|" * (3 * len(SLICE_METRICS))]
        for label, group in groups.items():
            cells = [format_estimate(group["recommenders"][n][m], 3) for m in SLICE_METRICS for n in (fused, sas, plain)]
            lines.append(f"| {label} ({group['users']}) | " + " | ".join(cells) + " |")
    from genrec_edge.stats import SMALL_SAMPLE, SMALL_SAMPLE_NOTE

    if len(order) < SMALL_SAMPLE:
        lines[2:2] = ["**Note: " + SMALL_SAMPLE_NOTE.format(users=len(order)) + ".**", ""]
    text = "\n".join(lines) + "\n"
    print(text)

    from bench.saved_run import fresh_stem

    args.out.mkdir(parents=True, exist_ok=True)
    stem = fresh_stem(args.out, f"{time.strftime('%Y-%m-%d')}-quality-{evaluation.split}").name  # keeps earlier runs
    (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
    finite = lambda x: x if np.isfinite(x) else None  # noqa: E731 - JSON has no NaN
    report = {"meta": meta, "evaluation": evaluation.to_dict(),
              "ratios": {m: {"ratio": finite(r), "low": finite(lo), "high": finite(hi)}
                         for m, (r, lo, hi) in ratios.items()},
              "per_user_rank": {n: {str(u): ranks[n].get(u) for u in order} for n in names},
              "metrics_reported": list(REPORTED)}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    plot(summary, names, args.out / f"{stem}.png", f"{evaluation.split} split, {len(order)} users")
    print(f"wrote {args.out / stem}.md/.json/.png", file=sys.stderr)
    return 0


def plot(summary: dict, names: list[str], path: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(names, ["tab:purple", "tab:blue", "tab:orange", "tab:gray", "tab:green"], strict=False))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, metric in zip(axes[:2], SLICE_METRICS, strict=True):
        est = [summary["recommenders"][n][metric] for n in names]
        ax.bar(range(len(names)), [e.mean for e in est],
               yerr=[[e.mean - e.low for e in est], [e.high - e.mean for e in est]], capsize=5,
               color=[colors.get(n) for n in names])
        ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
        ax.set_title(f"{metric} (95% interval)")
    ax = axes[2]
    groups = summary["slices"].get("popularity", {})
    labels = list(groups)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        est = [groups[g]["recommenders"][name]["HR@10"] for g in labels]
        ax.bar(np.arange(len(labels)) + i * width, [e.mean for e in est], width,
               yerr=[[e.mean - e.low for e in est], [e.high - e.mean for e in est]], capsize=3, label=name,
               color=colors.get(name))
    ax.set_xticks(np.arange(len(labels)) + width * (len(names) - 1) / 2,
                  [f"{g} ({groups[g]['users']})" for g in labels])
    ax.set_title("HR@10 by the target's popularity")
    ax.legend(fontsize=7)
    fig.suptitle(subtitle)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
