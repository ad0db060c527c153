"""A training-recipe search within a time budget: trial configs one after another on one GPU.

A trial list is a JSON list of trials, or an object ``{"note": ..., "common": {...}, "trials": [...]}``
whose ``common`` keys every trial shares unless it sets them itself. A trial is ``name`` plus any
``genrec_edge.train.TrainConfig`` keys, and optionally ``share`` (its relative share of the time, default
1) and ``ship: false`` (a reference point, e.g. full fine-tuning, never chosen as ``best/``).

Time: trial i may use the budget left times its share over the shares of the trials not run yet, so a
trial that ends early leaves its time to the next. Within that limit the trainer fits its schedule (the
cosine decay ends inside the limit, the validation included) and stops, validated, if it still runs out.
Every trial is validated on the validation split (all users by default) by the trainer's batched trie
beam search, which ranks exactly as the runtime does.

After every trial: ``trials.csv``, ``trials.md``, ``trials.json`` (the rows, read by ``--resume``) and
``best/`` (the best shippable run by HR@10 then NDCG@10, without its checkpoint) are rewritten; with
``--export DIR`` the tables and best/'s result files are copied into DIR too, so a killed job still
returns what it finished. ``--resume`` keeps the finished trials of an earlier call and runs the rest.

The base is prepared once: a GGUF base (the default SmolLM2-135M Q4_1) is dequantized a single time into
``<out>/base-hf`` so every trial loads plain safetensors in about a second.

Examples::

    python -m bench.train_trials --db ~/.local/share/genrec-edge/default.db --trials bench/gpu_trials.json \\
        --out /root/trials --export "$OUT" --budget-s 500
    python -m bench.train_trials --rehearse --trials bench/gpu_trials.json --out /tmp/rehearsal --budget-s 60
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRIALS = REPO / "bench" / "gpu_trials.json"
TRIAL_KEYS = ("name", "share", "ship")  # the runner's own keys; every other key is a TrainConfig option
COLUMNS = [
    "trial", "status", "valid_hr@10", "valid_ndcg@10", "best_step", "steps", "epochs_done", "tokens_per_s",
    "valid_s", "limit_s", "seconds", "loss", "epochs", "lr", "full", "lora_r", "lora_alpha", "target_modules",
    "history_len", "batch_size", "ship", "run_dir",
]  # fmt: skip
SHOWN = [
    "trial", "status", "valid_hr@10", "valid_ndcg@10", "best_step", "steps", "epochs_done", "tokens_per_s",
    "valid_s", "limit_s", "seconds",
]  # fmt: skip
FINISHED = ("ok", "stopped (budget)")
MIN_TRIAL_S = 20.0  # do not start a trial whose share is smaller than this
VALID_S_GUESS = (
    30.0  # seconds per validation until one is measured (610 users took 36 s on an H100 in 2026-11)
)
EXPORTED = ("adapter_model.safetensors", "adapter_config.json", "genrec_run.json", "train_log.jsonl")
MAX_RETURNED_BYTES = 16 * 2**20  # the device tool returns files of at most 16 MiB


# ------------------------------------------------------------------------------------------ inputs
def load_trials(path: Path) -> list[dict]:
    """The trials of ``path`` with ``common`` merged in; SystemExit with one line if the file is malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read the trial list {path}: {exc}") from None
    common: dict = {}
    if isinstance(data, dict):
        unknown = set(data) - {"note", "common", "trials"}
        if unknown:
            raise SystemExit(f"error: {path}: unknown top-level keys {sorted(unknown)}")
        common, data = data.get("common", {}), data.get("trials")
    if not isinstance(data, list) or not all(isinstance(t, dict) and t.get("name") for t in data):
        raise SystemExit(f"error: {path} must hold a JSON list of objects, each with a 'name'")
    if len({t["name"] for t in data}) != len(data):
        raise SystemExit(f"error: trial names in {path} must be unique")
    return [{**common, **trial} for trial in data]


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
    from genrec_edge import models_hf, runs

    spec = models_hf.resolve_base(base)
    if not spec.is_gguf or not (run_dir / runs.RUN_CONFIG).is_file():
        return
    run = runs.read_run_config(run_dir)
    run["trained_on"] = run["base_model"]
    run["base_model"] = spec.to_dict()
    run["base_model_sha256"] = models_hf.base_sha256(spec)
    run["config"]["base"] = base
    runs.write_run_config(run_dir, run)


def make_rehearsal_inputs(work: Path) -> tuple[Path, str]:
    """The tests' tiny database and a tiny random LLaMA converted to GGUF, for a CPU rehearsal of the job.

    The base is a .gguf file, as on the GPU, so the rehearsal also dequantizes it (``prepare_base``) and
    records it as the run's base (``record_original_base``).
    """
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import EMPTY_USER, write_tiny_movielens
    from tinymodel import DEFAULT_TITLES, tiny_gguf

    from genrec_edge.history import HistoryDB
    from genrec_edge.ingest import ingest

    work.mkdir(parents=True, exist_ok=True)
    db = work / "tiny.db"
    if not db.exists():
        ingest(db, "movielens-csv", write_tiny_movielens(work / "tiny-ml"), progress=False)
        with HistoryDB.open(db) as history:
            history.add_user(EMPTY_USER)
    gguf = work / "base" / "model-F32.gguf"
    if not gguf.exists():
        tiny_gguf(work / "base", corpus=DEFAULT_TITLES)
    return db, str(gguf)


# ------------------------------------------------------------------------------------------ output
def write_tables(rows: list[dict], out: Path, header: dict) -> None:
    """Rewrite trials.csv, trials.md and trials.json from all rows so far (atomic renames)."""
    tmp = out / "trials.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: row.get(k, "") for k in COLUMNS} for row in rows)
    tmp.replace(out / "trials.csv")
    lines = [
        "# Training trials",
        "",
        *(f"- {k}: {v}" for k, v in header.items()),
        "",
        "| " + " | ".join(SHOWN) + " |",
        "|" + "---|" * len(SHOWN),
    ]
    lines += ["| " + " | ".join(_fmt(k, row.get(k, "")) for k in SHOWN) + " |" for row in rows]
    tmp = out / "trials.md.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out / "trials.md")
    tmp = out / "trials.json.tmp"
    tmp.write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "trials.json")


def _fmt(column: str, value) -> str:
    if isinstance(value, float):
        if column.startswith("valid_") and "@" in column:
            return f"{value:.4f}"
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return str(value).replace("|", "/")


def export(out: Path, dest: Path) -> list[Path]:
    """Copy the tables and best/'s result files into ``dest`` (what a GPU job returns); the paths written."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("trials.md", "trials.csv"):
        if (out / name).is_file():
            shutil.copy2(out / name, dest / name)
            written.append(dest / name)
    if (out / "best").is_dir():
        (dest / "best").mkdir(exist_ok=True)
        for name in EXPORTED:
            source = out / "best" / name
            if source.is_file() and source.stat().st_size <= MAX_RETURNED_BYTES:
                shutil.copy2(source, dest / "best" / name)
                written.append(dest / "best" / name)
    return written


def check_export(dest: Path, max_adapter_mb: float = 10.0) -> dict:
    """Refuse an export the next step cannot use; returns the best run's summary. SystemExit with one line."""
    problems = [f"missing {name}" for name in ("trials.md", "trials.csv") if not (dest / name).is_file()]
    best = dest / "best"
    problems += [f"missing best/{name}" for name in EXPORTED if not (best / name).is_file()]
    if problems:
        raise SystemExit(f"error: the export in {dest} is incomplete: {', '.join(problems)}")
    from safetensors import safe_open

    with safe_open(best / "adapter_model.safetensors", framework="pt") as fh:
        dtypes = {str(fh.get_slice(name).get_dtype()) for name in fh.keys()}
    size_mb = (best / "adapter_model.safetensors").stat().st_size / 1e6
    run = json.loads((best / "genrec_run.json").read_text(encoding="utf-8"))
    if dtypes != {"BF16"} or size_mb > max_adapter_mb or run["config"].get("full"):
        raise SystemExit(
            f"error: best/ must be a bf16 LoRA adapter <= {max_adapter_mb} MB: {dtypes}, {size_mb:.1f} MB"
        )
    return {"trial": run["command_line"], "hr@10": run["best"]["hr@10"], "adapter_mb": round(size_mb, 2)}


# ------------------------------------------------------------------------------------------ search
def run_trials(
    db: Path,
    out: Path,
    trials: list[dict],
    budget_s: float,
    base: str,
    valid_users: int | None = None,
    quiet: bool = False,
    resume: bool = False,
    export_dir: Path | None = None,
) -> list[dict]:
    from genrec_edge.history import HistoryDB
    from genrec_edge.runs import read_run_config
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
    done = _finished_rows(out) if resume else {}
    rows: list[dict] = []
    best = max(
        (r for r in done.values() if r.get("ship", True) and r.get("valid_hr@10") not in ("", None)),
        key=lambda r: (r["valid_hr@10"], r["valid_ndcg@10"]),
        default=None,
    )
    last_valid_s = 0.0
    for position, trial in enumerate(trials):
        name = trial["name"]
        if name in done:
            rows.append(done[name])
            continue
        shares_left = sum(float(t.get("share", 1.0)) for t in trials[position:] if t["name"] not in done)
        remaining = budget_s - (time.monotonic() - started)
        limit = remaining * float(trial.get("share", 1.0)) / shares_left
        ship = bool(trial.get("ship", True))
        row = {"trial": name, "run_dir": str(out / "trials" / name), "ship": ship, "limit_s": round(limit, 1)}
        if limit < MIN_TRIAL_S:
            rows.append({**row, "status": "skipped (budget)"})
            _publish(rows, out, header, best, export_dir)
            continue
        options = {k: v for k, v in trial.items() if k not in TRIAL_KEYS}
        options["base"] = base_dir
        if valid_users is not None:
            options["valid_users"] = valid_users
        trial_started = time.monotonic()
        try:
            config = resolve_config(None, **options)
            run_dir = out / "trials" / name
            shutil.rmtree(run_dir, ignore_errors=True)
            result = train_on_sequences(
                sequences, catalog, run_dir, config, dataset=dataset.name if dataset else None,
                time_limit_s=limit, valid_seconds_hint=last_valid_s or min(VALID_S_GUESS, 0.25 * limit), quiet=quiet,
                command_line=f"bench.train_trials {name}",
            )  # fmt: skip
            record_original_base(run_dir, base)
            run = read_run_config(run_dir)
            metrics = result.best or {}
            last_valid_s = result.history[-1]["seconds"] if result.history else last_valid_s
            row.update(
                status="stopped (budget)" if result.stopped_early else "ok",
                **{"valid_hr@10": metrics.get("hr@10", ""), "valid_ndcg@10": metrics.get("ndcg@10", "")},
                best_step=metrics.get("step", ""),
                steps=result.steps,
                epochs_done=round(config.epochs * result.steps / max(run["planned_steps"], 1), 2),
                tokens_per_s=round(result.tokens_per_s, 1),
                valid_s=round(last_valid_s, 1) if result.history else "",
            )
            row.update(_config_columns(config))
            if (
                ship
                and metrics
                and (
                    best is None
                    or (metrics["hr@10"], metrics["ndcg@10"]) > (best["valid_hr@10"], best["valid_ndcg@10"])
                )
            ):
                best = row
                _copy_best(run_dir, out / "best")
        except Exception as exc:  # one bad trial (OOM, bad option) must not end the search
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            row["status"] = f"failed: {type(exc).__name__}: {first_line}"[:200]
            if not quiet:
                traceback.print_exc()
            _free_gpu_memory()
        row["seconds"] = round(time.monotonic() - trial_started, 1)
        rows.append(row)
        _publish(rows, out, header, best, export_dir)
        print(
            f"{name}: {row['status']} HR@10={row.get('valid_hr@10', '')} ({row['seconds']} s)",
            file=sys.stderr,
        )
    _publish(rows, out, header, best, export_dir)  # trials kept by --resume after the last one run
    return rows


def _finished_rows(out: Path) -> dict[str, dict]:
    path = out / "trials.json"
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    return {r["trial"]: r for r in rows if r.get("status") in FINISHED}


def _publish(rows: list[dict], out: Path, header: dict, best: dict | None, export_dir: Path | None) -> None:
    write_tables(rows, out, {**header, "best": best["trial"] if best else "-"})
    if export_dir is not None:
        export(out, export_dir)


def _config_columns(config) -> dict:
    return {
        "loss": config.loss,
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


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_trials", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--db", type=Path, default=None, help="history database (required unless --rehearse)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/trials"), help="work and results directory"
    )
    parser.add_argument(
        "--trials", type=Path, default=DEFAULT_TRIALS, help="trial list (JSON; see the docstring)"
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all trials")
    parser.add_argument("--base", default=None, help="base model (smollm2-135m [default], HF dir, .gguf)")
    parser.add_argument(
        "--valid-users", type=int, default=None, help="override every trial's valid_users (0 = all)"
    )
    parser.add_argument(
        "--export", type=Path, default=None, help="copy tables + best/ here after every trial"
    )
    parser.add_argument("--resume", action="store_true", help="keep the finished trials of an earlier call")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="CPU rehearsal: the tests' tiny database and a tiny random LLaMA (GGUF) instead of --db/--base",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.rehearse == (args.db is not None):
        parser.error("give --db, or --rehearse (which makes its own tiny database)")
    return args


def main(argv=None) -> int:
    from genrec_edge.errors import GenrecError

    args = parse_args(argv)
    trials = load_trials(args.trials)
    try:
        db, base = args.db, args.base or "smollm2-135m"
        if args.rehearse:
            db, base = make_rehearsal_inputs(args.out / "rehearsal-inputs")
        rows = run_trials(
            db, args.out, trials, args.budget_s, base, args.valid_users, args.quiet, args.resume, args.export
        )
    except GenrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print((args.out / "trials.md").read_text(encoding="utf-8"))
    if args.export is not None and any(r.get("ship", True) and r.get("status") in FINISHED for r in rows):
        print(f"export {args.export}: {check_export(args.export)}")
    if args.rehearse:  # a rehearsal passes only if every trial of the list ran
        unfinished = [f"{r['trial']}: {r['status']}" for r in rows if r.get("status") not in FINISHED]
        if unfinished:
            print(f"error: rehearsal failed: {'; '.join(unfinished)}", file=sys.stderr)
            return 1
    return 0 if any(r.get("status") in FINISHED for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
