"""``genrec-edge evaluate``: score the LLM, SASRec and popularity on the same users, with 95% intervals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from ..recommend import DEFAULT_K, MAX_K, MAX_PRIOR_WEIGHT
from . import DB_HELP, parse_users, table_console

SLICE_METRICS = ("HR@10", "NDCG@10")
DEFAULT_BATCH = 4
MIN_EVAL_K = 10  # the table reports HR@10 and NDCG@10: a shorter list would report HR@1 under their names


def _specs(models: list[Path], priors: list[str], sasrec: list[Path], pop: bool, prior_weight: float | None = None):
    from ..errors import UsageError
    from ..evalruns import PRIORS, RecommenderSpec

    for prior in priors:
        if prior not in PRIORS:
            raise UsageError(f"--prior is one of {', '.join(PRIORS)} (got {prior!r})")
    if (priors or prior_weight is not None) and not models:
        raise UsageError("--prior and --prior-weight apply to --model (the LLM); give a --model")
    specs = [RecommenderSpec("llm", None if str(m) == "default" else Path(m), prior, prior_weight)
             for m in models for prior in (priors or [None])]
    specs += [RecommenderSpec("sasrec", Path(d)) for d in sasrec]
    if pop:
        specs.append(RecommenderSpec("pop"))
    return specs


def _render(evaluation) -> None:
    from rich import box
    from rich.table import Table

    from ..stats import SMALL_SAMPLE, SMALL_SAMPLE_NOTE, format_estimate

    summary, names = evaluation.summary, list(evaluation.runs)
    console = table_console()
    table = Table(box=box.SIMPLE_HEAD, title=f"{evaluation.split} split, {len(evaluation.users)} users (seed {evaluation.seed}): "
                        "mean [95% bootstrap interval]")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for metric in evaluation.metrics:
        table.add_row(metric, *(format_estimate(summary["recommenders"][n][metric]) for n in names))
    console.print(table)
    if len(evaluation.users) < SMALL_SAMPLE:
        console.print("note: " + SMALL_SAMPLE_NOTE.format(users=len(evaluation.users)) + " (--users all).",
                      highlight=False)

    if summary["differences"]:
        diff = Table(box=box.SIMPLE_HEAD, title="paired differences on the same users (* : the interval excludes 0)")
        diff.add_column("metric")
        for pair in summary["differences"]:
            diff.add_column(f"{pair['a']} − {pair['b']}", justify="right", no_wrap=True)
        for metric in evaluation.metrics:
            cells = []
            for pair in summary["differences"]:
                est = pair["metrics"][metric]
                cells.append(format_estimate(est, signed=True) + (" *" if est.excludes_zero else ""))
            diff.add_row(metric, *cells)
        console.print(diff)

    for slicing, groups in summary["slices"].items():
        title = {"popularity": "by the target's popularity in training (head: the titles holding the first 50% "
                               "of interactions, torso: up to 80%, tail: the rest)",
                 "history": "by history length (items before the target)"}[slicing]
        sliced = Table(box=box.SIMPLE_HEAD, title=title, pad_edge=False)
        sliced.add_column("slice (users)")
        sliced.add_column("recommender", min_width=12)
        for metric in SLICE_METRICS:
            sliced.add_column(metric, justify="right", no_wrap=True)
        for label, group in groups.items():
            rows = [(n, [format_estimate(group["recommenders"][n][m], 3) for m in SLICE_METRICS]) for n in names]
            for pair in group["differences"]:
                cells = []
                for metric in SLICE_METRICS:
                    est = pair["metrics"][metric]
                    cells.append(format_estimate(est, 3, signed=True) + (" *" if est.excludes_zero else ""))
                rows.append((f"{pair['a']} − {pair['b']}", cells))
            for i, (who, cells) in enumerate(rows):
                sliced.add_row(f"{label} ({group['users']})" if i == 0 else "", who, *cells,
                               end_section=i == len(rows) - 1)
        console.print(sliced)


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate(
        model: list[Path] = typer.Option(
            None, "--model", help="GGUF model (the LLM) to evaluate; repeatable; 'default' for the default model."
        ),
        prior: list[str] = typer.Option(
            None, "--prior",
            help="The LLM's collaborative prior: sasrec, pop or none (default: the model's own); repeatable: "
            "each --model is evaluated with each.",
        ),
        prior_weight: float | None = typer.Option(
            None, "--prior-weight", min=0.0, max=MAX_PRIOR_WEIGHT, help="λ of the prior (default: the one tuned for the model)."
        ),
        batch: int | None = typer.Option(
            None, "--batch", min=1, help="LLM requests searched together (same results, fewer llama_decode calls) "
            f"\\[default: {DEFAULT_BATCH}]."
        ),
        ray: str | None = typer.Option(
            None, "--ray",
            help="Run the LLM's searches on a Ray cluster: its address (auto, ray://host:10001) or local "
            "(needs the \\[cluster] extra; docs/CLUSTER.md).",
        ),
        workers: str | None = typer.Option(
            None, "--workers", metavar="N|auto", help="Processes running the LLM's searches here, each with its own "
            "model (~410 MB resident at Q8_0); the same results and log. auto: one single-thread process per core (per "
            "--threads cores if given), within half the free memory; 2 on 2 cores: 1.06-1.30x faster than 1 "
            "(docs/CLUSTER.md) \\[default: auto].",
        ),
        sasrec: list[Path] = typer.Option(
            None, "--sasrec", help="A SASRec directory saved by `baseline sasrec --save`; repeatable."
        ),
        pop: bool = typer.Option(False, "--pop", help="Popularity, counted on the split's training part."),
        db: Path | None = typer.Option(None, "--db", help=DB_HELP),
        split: str = typer.Option("test", "--split", help="test (each user's last item) or valid (second-to-last)."),
        users: str = typer.Option("all", "--users", help="How many users: N (a seeded sample) or all."),
        seed: int = typer.Option(0, "--seed", help="Seed of the user sample and of the bootstrap."),
        k: int | None = typer.Option(None, "--k", min=MIN_EVAL_K, max=MAX_K, help="Titles the LLM returns per user, "
                                     f"{MIN_EVAL_K} or more for HR@10 (its MRR becomes MRR@k) \\[default: {DEFAULT_K}]."),
        by: list[str] = typer.Option(
            None, "--by", help="Also slice by: popularity (of the target), history (length); repeatable."
        ),
        out: Path | None = typer.Option(
            None, "--out",
            help="Per-user results (JSONL), written as they come and resumed from "
            "(default: evaluate/results.jsonl under GENREC_EDGE_HOME's cache).",
        ),
        threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads (llama.cpp, torch)."),
        beam: int | None = typer.Option(None, "--beam", min=1, help="LLM beam width (default: max(10, 2k))."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout (progress on stderr)."),
    ) -> None:
        """Score recommenders on the same users: HR@1/5/10, NDCG@5/10, MRR with 95% bootstrap intervals.

        Given two or more, also the paired interval of each difference (the same users, resampled together).
        Protocol (README): chronological leave-one-out, full-catalog ranking, seen titles excluded.
        Each user's result is appended to --out when computed: the same command resumes after a crash.
        Logged results are reused only for the same recommender, split, data and settings.

        Example: genrec-edge evaluate --model model-Q8_0.gguf --sasrec sasrec-ml --pop --users 200 --by popularity
        """
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch or llama.cpp loads (FINDINGS.md)
        from .. import paths
        from ..evalruns import evaluate_recommenders

        if not model:
            from ..errors import refuse_options

            refuse_options((name for name, value in (("--k", k), ("--beam", beam), ("--batch", batch),
                                                      ("--workers", workers), ("--ray", ray)) if value is not None),
                           "--model (the LLM); give a --model")
        specs = _specs(list(model or []), list(prior or []), list(sasrec or []), pop, prior_weight)
        slicings = [part.strip() for item in (by or []) for part in item.split(",") if part.strip()]
        log_path = out if out is not None else paths.cache_dir() / "evaluate" / "results.jsonl"
        evaluation = evaluate_recommenders(
            specs, db=db, split=split, users=parse_users(users), seed=seed, k=k or DEFAULT_K, out=log_path,
            by=slicings, threads=threads, beam=beam, batch=batch or DEFAULT_BATCH, ray=ray,
            workers=workers if workers is not None else "auto",
        )
        resumed = {n: r["resumed"] for n, r in evaluation.runs.items() if r["resumed"]}
        note = f" (reused: {', '.join(f'{n} {c}' for n, c in resumed.items())})" if resumed else ""
        typer.echo(f"per-user results: {evaluation.results_file}{note}", err=True)
        if as_json:
            typer.echo(json.dumps(evaluation.to_dict(), indent=1, ensure_ascii=False))
            return
        _render(evaluation)
