"""Training run directories: the files ``train`` writes next to its result, read by ``merge`` and the default model.

A run directory is a peft adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``; for
full fine-tuning a whole HF model) plus::

    genrec_run.json    the resolved training config and its provenance (base model and its sha256, catalog
                       sha256, dataset, prompt template, package versions), the run's status, every
                       validation row and the best one
    README.md          a model card written from genrec_run.json (in place of peft's template of blanks)
    train_log.jsonl    one JSON row per validation
    checkpoint/        what ``--resume`` continues from (fp32 trainable weights, optimizer, scheduler, RNG)

This module reads and writes those files without importing the trainer, torch or transformers, so
``merge``, ``default_model`` and the runtime depend on it and not on ``genrec_edge.train``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from .errors import CorruptModelError, NotFoundError
from .jsonlog import read_json_object

RUN_CONFIG = "genrec_run.json"
MODEL_CARD = "README.md"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoint"
VERSIONED_PACKAGES = ("genrec-edge", "torch", "transformers", "peft", "accelerate", "tokenizers")


def read_run_config(run_dir: str | Path) -> dict:
    """``genrec_run.json`` of ``run_dir`` as a dict; NotFoundError if there is none, CorruptModelError if unreadable."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise NotFoundError(f"not a training run directory (no {RUN_CONFIG}): {run_dir}")
    return read_json_object(path, CorruptModelError, "training run config")


def write_run_config(run_dir: str | Path, run: dict) -> Path:
    """Write ``genrec_run.json`` atomically (temp file + rename): a reader never sees half a file."""
    return _write_atomically(Path(run_dir) / RUN_CONFIG, json.dumps(run, indent=2, ensure_ascii=False) + "\n")


def _write_atomically(path: Path, text: str) -> Path:
    """Write a temporary file, then rename it over ``path``: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def append_train_log(run_dir: str | Path, row: dict) -> None:
    with open(Path(run_dir) / TRAIN_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def model_card(run: dict, run_dir: Path) -> str:
    """The run directory's README.md: what this adapter is, how good it was on validation, how to reproduce it
    and how to serve it; every number comes from ``run`` (genrec_run.json)."""
    from .stats import SMALL_SAMPLE, SMALL_SAMPLE_NOTE

    c, best, base = run.get("config", {}), run.get("best"), run.get("base_model", {})
    kind = "full fine-tune" if c.get("full") else (
        f"LoRA adapter (r={c.get('lora_r')}, alpha {c.get('lora_alpha')}, dropout {c.get('lora_dropout')}, on "
        f"{', '.join(c.get('target_modules', []))})")
    template = run.get("prompt_template", {})
    lines = [
        f"# genrec-edge run `{run_dir.name}`",
        "",
        f"A {kind} of `{base.get('name')}` (sha256 {str(run.get('base_model_sha256'))[:12]}…), "
        f"{run.get('trainable_params', 0):,} trainable parameters, trained by `genrec-edge train` on the histories "
        f"of `{run.get('dataset')}` to generate the title of a user's next item. It ranks only that catalog "
        f"(sha256 {str(run.get('catalog_sha256'))[:12]}…): serving it with another database is refused.",
        "",
        f"- status: **{run.get('status')}**, {run.get('steps')} of {run.get('total_steps')} optimizer steps "
        f"(epochs planned: {c.get('epochs')}; {run.get('train_windows')} training windows from "
        f"{run.get('train_users')} users, loss {c.get('loss')}, lr {c.get('lr')})",
        f"- prompt ({template.get('name')}): \"{template.get('instruction')}\" then the last "
        f"{template.get('history_len')} titles, each ending in EOS",
    ]
    if best:
        users = best.get("users", run.get("valid_users"))
        lines.append(f"- best validation (step {best['step']}, {users} users, beam {c.get('beam')}): HR@10 "
                     f"{best['hr@10']:.4f}, NDCG@10 {best['ndcg@10']:.4f}; this directory holds that step's weights")
        if isinstance(users, int) and users < SMALL_SAMPLE:
            lines.append("- note: " + SMALL_SAMPLE_NOTE.format(users=users))
    elif run.get("status") == "done":
        lines.append("- no validation ran: this directory holds the final weights")
    else:
        lines.append(f"- no validation yet: no weights in this directory ({run.get('status')})")
    versions = ", ".join(f"{k} {v}" for k, v in run.get("versions", {}).items() if v)
    q = shlex.quote
    db = q(run["db"]) if run.get("db") else "DATABASE"
    merged, gguf = q(f"{run_dir}-merged"), f"{run_dir}-gguf"
    lines += [
        f"- versions: {versions}",
        "",
        "Reproduce (every option is in `genrec_run.json`):",
        "",
        "```bash",
        str(run.get("command_line")),
        "```",
        "",
        f"Serve it: merge into the base, convert, quantize, add the collaborative prior the default model fuses, "
        f"then `recommend` or `serve` with the database of `{run.get('dataset')}`:",
        "",
        "```bash",
        f"genrec-edge merge {q(str(run_dir))} --out {merged}",
        f"genrec-edge convert {merged} --out {q(gguf + '/model-F16.gguf')}",
        f"genrec-edge quantize {q(gguf + '/model-F16.gguf')} --levels Q8_0",
        f"genrec-edge prior build --kind sasrec --db {db} --out {q(gguf + '/')}",
        f"genrec-edge prior tune --model {q(gguf + '/model-Q8_0.gguf')} --db {db}",
        f"genrec-edge recommend --model {q(gguf + '/model-Q8_0.gguf')} --db {db} --user ID",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, run: dict) -> Path:
    return _write_atomically(Path(run_dir) / MODEL_CARD, model_card(run, Path(run_dir)))


def gguf_provenance(run: dict, adapter_config_sha256: str | None) -> dict:
    """The ``genrec.*`` keys the converter writes into a GGUF made from this run (``genrec_provenance.json``)."""
    return {
        "catalog_sha256": run["catalog_sha256"],
        "dataset": run.get("dataset"),
        "prompt_template": run["prompt_template"],
        "history_len": run["history_len"],
        "base_model": run["base_model"]["name"],
        "adapter_config_sha256": adapter_config_sha256,
    }


def package_versions() -> dict:
    """Python and the versions of the packages a run depends on (None where one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found
