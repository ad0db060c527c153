"""Merge a training run into a plain Hugging Face LLaMA directory the converter can read.

``merge(run_dir, out)`` loads the run's base (as ``genrec_run.json`` records it), applies the adapter,
folds it into the weights (``merge_and_unload``) and saves safetensors + config + tokenizer, plus
``genrec_provenance.json`` (catalog hash, dataset, prompt template, history length, base model, adapter
config hash) that ``convert`` writes into the GGUF as ``genrec.*`` keys.

Tied embeddings (SmolLM2): ``lm_head.weight`` *is* ``embed_tokens.weight``. If the adapter trained the
head (LoRA on ``lm_head``, or ``modules_to_save``), merging into the shared tensor would also change the
input embeddings, and saving with ``tie_word_embeddings=True`` would drop the trained head. So the
model is untied before the adapter is applied; after merging, the two are re-tied only if they are
still equal - the merged file then stays as small as the base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .convert import PROVENANCE_FILE
from .errors import CorruptModelError, NotFoundError, UsageError
from .runs import gguf_provenance, read_run_config

DTYPES = ("float32", "float16", "bfloat16")


def _untie(model) -> bool:
    """Give lm_head its own copy of the embedding matrix; True if they were tied."""
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return True


def _retie_if_equal(model) -> bool:
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not torch.equal(head.weight, embed.weight):
        return False
    head.weight = embed.weight
    model.config.tie_word_embeddings = True
    return True


def load_run_model(run_dir: str | Path):
    """The run's trained model in fp32 with the adapter (if any) applied but not merged: (model, run config)."""
    from . import models_hf

    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    if run["config"].get("full"):
        if not (run_dir / "config.json").is_file():
            raise NotFoundError(f"{run_dir} has no saved model yet (the run has not validated once)")
        return models_hf.load_model(models_hf.BaseSpec(str(run_dir), run_dir)), run
    if not (run_dir / "adapter_config.json").is_file():
        raise NotFoundError(f"{run_dir} has no adapter yet (the run has not validated once)")
    weights = [run_dir / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
    if not any(path.is_file() for path in weights):
        raise NotFoundError(f"{run_dir} has adapter_config.json but no adapter weights ({weights[0].name})")
    from peft import PeftModel

    spec = run_base(run)
    model = models_hf.load_model(spec)
    _untie(model)
    try:
        return PeftModel.from_pretrained(model, run_dir), run
    except Exception as exc:  # safetensors' own error type, torch's, peft's: a file that does not load
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptModelError(f"cannot load the adapter in {run_dir}: {reason}") from None


def run_base(run: dict):
    """The run's base model on this machine: where training found it, or, for a run made elsewhere (the
    shipped adapter records no directory), the named base installed here. ``merge`` then checks its sha256
    against the run's, so a different file is refused either way."""
    from . import models_hf

    recorded = run["base_model"]
    spec = models_hf.BaseSpec.from_dict(recorded)
    if recorded.get("directory") and spec.directory.exists():
        return spec
    if recorded.get("name") == models_hf.DEFAULT_BASE:
        return models_hf.resolve_base(models_hf.DEFAULT_BASE)
    raise NotFoundError(f"the run's base model is gone: {recorded.get('directory') or '(no directory recorded)'} "
                        f"({recorded.get('name')})")


def merge(run_dir: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the merged model of ``run_dir`` to ``out`` (a new directory); returns ``out``."""
    import torch

    from . import models_hf

    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty: refusing to overwrite")
    model, run = load_run_model(run_dir)
    spec = run_base(run)
    recorded = run.get("base_model_sha256")
    if recorded and spec.directory.exists() and models_hf.base_sha256(spec) != recorded:
        raise CorruptModelError(f"the base model at {spec.directory} changed since training (sha256 differs)")

    adapter_sha = None
    if run["config"].get("full"):
        tokenizer_spec = models_hf.BaseSpec(str(run_dir), run_dir)
    else:
        adapter_sha = hashlib.sha256((run_dir / "adapter_config.json").read_bytes()).hexdigest()
        model = model.merge_and_unload()
        tokenizer_spec = spec
    _retie_if_equal(model)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    models_hf.load_tokenizer(tokenizer_spec).save_pretrained(out)
    provenance = gguf_provenance(run, adapter_sha)
    (out / PROVENANCE_FILE).write_text(
        json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return out
