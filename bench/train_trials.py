"""A training-recipe search within a time budget: run trial configs one after another on one GPU.

Each trial is a ``genrec_edge.train.TrainConfig`` (a JSON object: ``name`` plus any config keys),
trained with the real trainer and validated on the validation split (HR@10 / NDCG@10; all users by
default) by its batched trie beam search. After every trial the results table is rewritten
(``trials.md`` + ``trials.csv``) and, if the trial is the best so far by HR@10 (then NDCG@10), its
adapter is copied to ``best/`` - so a run killed at any point leaves everything finished so far. A
failing trial is recorded with its error and the search goes on.

The base is prepared once: a GGUF base (the default SmolLM2-135M Q4_1) is dequantized a single time
into ``<out>/base-hf`` so every trial loads plain safetensors in about a second.

Example::

    python -m bench.train_trials --db ~/.local/share/genrec-edge/default.db --out bench/results/trials \\
        --budget-s 480
    python -m bench.train_trials --db tiny.db --base tests/tiny --trials my_trials.json --budget-s 120
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

# Run on a rented H100 (<= 8 min): ~1 M training tokens per epoch on ml-latest-small, so an epoch of
# the 135M model takes seconds there; the list goes from cheap to expensive so a tight budget still
# compares LoRA against full fine-tuning.
DEFAULT_TRIALS: list[dict] = [
    {"name": "lora16-all-lr1e-3-e1", "lora_r": 16, "lora_alpha": 32, "lr": 1e-3, "epochs": 1},
    {"name": "lora16-all-lr1e-3-e3", "lora_r": 16, "lora_alpha": 32, "lr": 1e-3, "epochs": 3},
    {"name": "full-lr1e-4-e2", "full": True, "lr": 1e-4, "epochs": 2},
    {"name": "lora64-all-lr5e-4-e3", "lora_r": 64, "lora_alpha": 64, "lr": 5e-4, "epochs": 3},
    {
        "name": "lora16-qv-lr2e-3-e3",
        "lora_r": 16,
        "lora_alpha": 32,
        "lr": 2e-3,
        "epochs": 3,
        "target_modules": ["q_proj", "v_proj"],
    },
    {
        "name": "lora16-all-lr1e-3-e3-h10",
        "lora_r": 16,
        "lora_alpha": 32,
        "lr": 1e-3,
        "epochs": 3,
        "history_len": 10,
    },
    {"name": "full-lr5e-5-e4", "full": True, "lr": 5e-5, "epochs": 4},
    {"name": "lora32-all-lr2e-3-e5", "lora_r": 32, "lora_alpha": 64, "lr": 2e-3, "epochs": 5},
]
# What every trial shares unless it says otherwise: GPU-sized batches, all validation users.
COMMON = {"batch_size": 64, "valid_users": 0, "eval_batch_users": 128, "warmup": 20}
COLUMNS = [
    "trial", "status", "valid_hr@10", "valid_ndcg@10", "best_step", "steps", "tokens_per_s", "seconds",
    "epochs", "lr", "full", "lora_r", "lora_alpha", "target_modules", "history_len", "batch_size", "run_dir",
]  # fmt: skip
MIN_TRIAL_S = 20.0  # do not start a trial with less time left than this


def prepare_base(base: str, work: Path) -> str:
    """A GGUF base becomes a plain HF directory once (dequantizing takes ~40 s on a CPU); others pass through."""
    from genrec_edge import models_hf

    spec = models_hf.resolve_base(base)
    if not spec.is_gguf:
        return str(spec.directory)
    target = work / "base-hf"
    if not (target / "config.json").is_file():
        tmp = work / "base-hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        models_hf.load_model(spec).save_pretrained(tmp, safe_serialization=True)
        models_hf.load_tokenizer(spec).save_pretrained(tmp)
        tmp.rename(target)
    return str(target)


def record_original_base(run_dir: Path, base: str) -> None:
    """Name the base a user has in the run config, not the dequantized copy the trial trained on.

    ``prepare_base`` turns a GGUF base into a HF directory once, for speed; the weights are the same, but
    ``merge`` (and the shipped default adapter) must find the base on another machine, by the name and
    sha256 of the GGUF it came from.
    """
    from genrec_edge import models_hf
    from genrec_edge.runs import RUN_CONFIG

    spec = models_hf.resolve_base(base)
    path = run_dir / RUN_CONFIG
    if not spec.is_gguf or not path.is_file():
        return
    run = json.loads(path.read_text(encoding="utf-8"))
    run["trained_on"] = run["base_model"]
    run["base_model"] = spec.to_dict()
    run["base_model_sha256"] = models_hf.base_sha256(spec)
    run["config"]["base"] = base
    path.write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_trials(path: Path | None) -> list[dict]:
    if path is None:
        return [dict(t) for t in DEFAULT_TRIALS]
    trials = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(trials, list) or not all(isinstance(t, dict) and t.get("name") for t in trials):
        raise SystemExit(f"error: {path} must hold a JSON list of objects, each with a 'name'")
    if len({t["name"] for t in trials}) != len(trials):
        raise SystemExit(f"error: trial names in {path} must be unique")
    return trials


def write_tables(rows: list[dict], out: Path, header: dict) -> None:
    """Rewrite trials.csv and trials.md from all rows so far (atomic renames: a kill leaves whole files)."""
    tmp = out / "trials.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
    tmp.replace(out / "trials.csv")
    shown = [
        "trial",
        "status",
        "valid_hr@10",
        "valid_ndcg@10",
        "best_step",
        "steps",
        "tokens_per_s",
        "seconds",
    ]
    lines = [
        "# Training trials",
        "",
        *(f"- {k}: {v}" for k, v in header.items()),
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k, "")) for k in shown) + " |")
    tmp = out / "trials.md.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out / "trials.md")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:,.0f}"
    return str(value).replace("|", "/")


def run_trials(
    db: Path,
    out: Path,
    trials: list[dict],
    budget_s: float,
    base: str,
    valid_users: int | None = None,
    quiet: bool = False,
) -> list[dict]:
    from genrec_edge.history import HistoryDB
    from genrec_edge.train import resolve_config, train_on_sequences

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with HistoryDB.open(db, readonly=True) as history:
        catalog, dataset = history.catalog(), history.dataset()
        sequences = list(history.sequences())
    base_dir = prepare_base(base, out)
    header = {
        "database": f"{db} ({dataset.name if dataset else 'unnamed'}, {len(catalog)} items, {len(sequences)} users)",
        "base": base,
        "budget_s": budget_s,
        "machine": _machine(),
    }
    rows: list[dict] = []
    best: dict | None = None
    for trial in trials:
        name = trial["name"]
        remaining = budget_s - (time.monotonic() - started)
        row = {"trial": name, "run_dir": str(out / "trials" / name)}
        if remaining < MIN_TRIAL_S:
            rows.append({**row, "status": "skipped (budget)"})
            write_tables(rows, out, header)
            continue
        options = {**COMMON, **{k: v for k, v in trial.items() if k != "name"}, "base": base_dir}
        if valid_users is not None:
            options["valid_users"] = valid_users
        trial_started = time.monotonic()
        try:
            config = resolve_config(None, **options)
            run_dir = out / "trials" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            # leave room for the final validation inside the budget
            result = train_on_sequences(
                sequences, catalog, run_dir, config, dataset=dataset.name if dataset else None,
                time_limit_s=max(1.0, remaining - 0.15 * remaining), quiet=quiet,
                command_line=f"bench.train_trials {name}",
            )  # fmt: skip
            record_original_base(run_dir, base)
            metrics = result.best or {}
            row.update(
                status="stopped (budget)" if result.stopped_early else "ok",
                **{"valid_hr@10": metrics.get("hr@10", ""), "valid_ndcg@10": metrics.get("ndcg@10", "")},
                best_step=metrics.get("step", ""),
                steps=result.steps,
                tokens_per_s=round(result.tokens_per_s, 1),
            )
            row.update(_config_columns(config))
            if metrics and (
                best is None
                or (metrics["hr@10"], metrics["ndcg@10"]) > (best["valid_hr@10"], best["valid_ndcg@10"])
            ):
                best = row
                _copy_best(run_dir, out / "best")
        except Exception as exc:  # one bad trial (OOM, bad option) must not end the search
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[
                :200
            ]
            if not quiet:
                traceback.print_exc()
            _free_gpu_memory()
        row["seconds"] = round(time.monotonic() - trial_started, 1)
        rows.append(row)
        write_tables(rows, out, {**header, "best": best["trial"] if best else "-"})
        print(
            f"{name}: {row['status']} HR@10={row.get('valid_hr@10', '')} ({row['seconds']} s)",
            file=sys.stderr,
        )
    return rows


def _config_columns(config) -> dict:
    return {
        "epochs": config.epochs,
        "lr": config.lr,
        "full": config.full,
        "lora_r": "" if config.full else config.lora_r,
        "lora_alpha": "" if config.full else config.lora_alpha,
        "target_modules": "" if config.full else ",".join(config.target_modules),
        "history_len": config.history_len,
        "batch_size": config.batch_size,
    }


def _copy_best(run_dir: Path, best_dir: Path) -> None:
    tmp = best_dir.with_name(best_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns("checkpoint", "checkpoint.*"))
    shutil.rmtree(best_dir, ignore_errors=True)
    tmp.rename(best_dir)


def _free_gpu_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _machine() -> str:
    import platform

    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
        return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads, torch {torch.__version__}"
    except ImportError:
        return platform.platform()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_trials", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--db", type=Path, required=True, help="history database")
    parser.add_argument("--out", type=Path, default=Path("bench/results/trials"), help="results directory")
    parser.add_argument("--trials", type=Path, default=None, help="JSON list of {name, ...TrainConfig keys}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all trials")
    parser.add_argument("--base", default="smollm2-135m", help="base model (smollm2-135m, HF dir, .gguf)")
    parser.add_argument(
        "--valid-users", type=int, default=None, help="override every trial's valid_users (0 = all)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from genrec_edge.errors import GenrecError

    args = parse_args(argv)
    try:
        rows = run_trials(
            args.db,
            args.out,
            load_trials(args.trials),
            args.budget_s,
            args.base,
            args.valid_users,
            args.quiet,
        )
    except GenrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print((args.out / "trials.md").read_text(encoding="utf-8"))
    return 0 if any(r.get("status") in ("ok", "stopped (budget)") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
