"""Training run directories: the files ``train`` writes next to its result, read by ``merge`` and the default model.

A run directory is a peft adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``; for
full fine-tuning a whole HF model) plus::

    genrec_run.json    the resolved training config and its provenance (base model and its sha256, catalog
                       sha256, dataset, prompt template, package versions), the run's status, every
                       validation row and the best one
    train_log.jsonl    one JSON row per validation
    checkpoint/        what ``--resume`` continues from (fp32 trainable weights, optimizer, scheduler, RNG)

This module reads and writes those files without importing the trainer, torch or transformers, so
``merge``, ``default_model`` and the runtime depend on it and not on ``genrec_edge.train``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import CorruptModelError, NotFoundError
from .jsonlog import read_json_object

RUN_CONFIG = "genrec_run.json"
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
    path = Path(run_dir) / RUN_CONFIG
    tmp = path.with_name(RUN_CONFIG + ".tmp")
    tmp.write_text(json.dumps(run, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def append_train_log(run_dir: str | Path, row: dict) -> None:
    with open(Path(run_dir) / TRAIN_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


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
