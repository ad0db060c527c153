"""Convert a HF LLaMA directory (config.json, *.safetensors, tokenizer) into one GGUF file for llama.cpp.

Read top to bottom: check the config is a plain LLaMA, derive every expected tensor shape from it, read
the tokenizer (``tokenizer.py``), then write metadata and tensors with gguf's typed writer into a temporary
file that is renamed over ``out`` only when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from genrec_edge.errors import CorruptModelError, NotFoundError, UsageError
from genrec_edge.paths import check_can_make_folder, make_folder

PROVENANCE_FILE = "genrec_provenance.json"
PROVENANCE_KEYS = (
    "catalog_sha256",
    "dataset",
    "prompt_template",
    "history_len",
    "base_model",
    "adapter_config_sha256",
)
OUTTYPES = ("f32", "f16", "bf16")


def _permute_for_llama_cpp_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder a q/k projection's output rows for llama.cpp's rotary layout.

    HF's ``rotate_half`` pairs dimension i of each head with i + head_dim/2; llama.cpp's NORM rope (the
    one it uses for llama) rotates adjacent pairs (2i, 2i+1). Interleaving the two halves of every head
    makes the same pairs adjacent, so both compute the same attention. Without it the file still loads
    and runs, and produces garbage: only a logits-parity test notices.
    """
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _load_config(hf_dir: Path):
    from transformers import AutoConfig

    if not (hf_dir / "config.json").is_file():
        raise NotFoundError(f"{hf_dir}: not a HF model directory (no config.json)")
    try:
        config = AutoConfig.from_pretrained(hf_dir)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError... for a bad config
        raise CorruptModelError(f"{hf_dir / 'config.json'}: cannot read ({type(exc).__name__}: {exc})") from None
    archs = getattr(config, "architectures", None) or []
    if config.model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise CorruptModelError(
            f"{hf_dir}: not a LLaMA model (model_type {config.model_type!r}, architectures {archs}); "
            "only LlamaForCausalLM converts"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise CorruptModelError(f"{hf_dir}: LLaMA with attention/MLP biases is not supported")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise CorruptModelError(f"{hf_dir}: hidden_act {config.hidden_act!r} is not supported (silu only)")
    return config


def _rope_theta(config, hf_dir: Path) -> float:
    # transformers 5 keeps rope settings in config.rope_parameters; older configs have rope_theta.
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise CorruptModelError(f"{hf_dir}: rope_type {rope_type!r} is not supported (default rope only)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise CorruptModelError(f"{hf_dir}: config has no rope theta")
    return float(theta)


def _read_provenance(hf_dir: Path, override: dict | None) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    path = hf_dir / PROVENANCE_FILE
    if path.is_file():
        try:
            merged.update(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise CorruptModelError(f"{path}: not valid JSON ({exc})") from None
    merged.update(override or {})
    unknown = sorted(set(merged) - set(PROVENANCE_KEYS))
    if unknown:
        raise UsageError(f"unknown provenance keys {unknown}; known: {', '.join(PROVENANCE_KEYS)}")
    template = merged.get("prompt_template")
    if template is not None and not isinstance(template, str):
        template = template.to_dict() if hasattr(template, "to_dict") else dict(template)
        if "history_len" in template and "history_len" not in merged:
            merged["history_len"] = template["history_len"]
        merged["prompt_template"] = json.dumps(template, sort_keys=True, ensure_ascii=False)
    return {k: v for k, v in merged.items() if v is not None}


def _expected_shapes(config, n_vocab: int, tied: bool) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a plain LLaMA checkpoint holds."""
    d, ff = config.hidden_size, config.intermediate_size
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // n_head
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (n_vocab, d), "model.norm.weight": (d,)}
    if not tied:
        shapes["lm_head.weight"] = (n_vocab, d)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (n_head * head_dim, d),
                p + "self_attn.k_proj.weight": (n_kv * head_dim, d),
                p + "self_attn.v_proj.weight": (n_kv * head_dim, d),
                p + "self_attn.o_proj.weight": (d, n_head * head_dim),
                p + "mlp.gate_proj.weight": (ff, d),
                p + "mlp.up_proj.weight": (ff, d),
                p + "mlp.down_proj.weight": (d, ff),
            }
        )
    return shapes


def _iter_checkpoint(hf_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    import torch
    from safetensors import SafetensorError, safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise NotFoundError(f"{hf_dir}: no *.safetensors weights")
    for file in files:
        try:
            with safe_open(file, framework="pt") as st:
                for name in st.keys():
                    # float32 in memory whatever the stored dtype (numpy has no bfloat16).
                    yield name, st.get_tensor(name).to(torch.float32).numpy()
        except SafetensorError as exc:
            raise CorruptModelError(f"{file}: cannot read ({exc})") from None


def convert(
    hf_dir: str | Path,
    out: str | Path,
    outtype: str = "f16",
    provenance: dict | None = None,
    pre: str | None = None,
    progress: bool = True,
    *,
    force: bool = False,
    _permute_qk: bool = True,  # tests switch it off to prove the parity test can fail
) -> Path:
    """Write ``hf_dir`` (a HF LlamaForCausalLM directory) as a GGUF file at ``out``; returns ``out``.

    ``outtype``: f32, f16 or bf16 for 2-D weights (1-D norms stay F32). ``provenance`` overrides keys of
    ``hf_dir/genrec_provenance.json``, written as ``genrec.*``. ``pre`` forces the BPE pre-tokenizer name.
    Refuses to overwrite ``out`` unless ``force``.
    """
    import gguf
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGMLQuantizationType, LlamaFileType, TensorNameMap

    from .tokenizer import read_vocab

    hf_dir, out = Path(hf_dir), Path(out)
    if outtype not in OUTTYPES:
        raise UsageError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    if not hf_dir.is_dir():
        what = "a file, not" if hf_dir.exists() else "no such directory, expected"
        raise NotFoundError(f"{hf_dir}: {what} a Hugging Face model directory (`genrec-edge merge` writes one)")
    if out.is_dir():
        raise UsageError(f"{out} is a folder: --out is the GGUF file to write (e.g. {out / 'model-F16.gguf'})")
    if out.exists() and out.resolve().parent == hf_dir.resolve():
        raise UsageError(f"{out} is a file of the model being converted: write the GGUF elsewhere")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists (use --force to overwrite)")
    check_can_make_folder(out.parent)  # created, if missing, once the model has been read and checked

    config = _load_config(hf_dir)
    theta = _rope_theta(config, hf_dir)
    prov = _read_provenance(hf_dir, provenance)
    n_vocab = config.vocab_size
    n_head, n_kv, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // n_head
    if n_head % n_kv or head_dim % 2:
        raise CorruptModelError(f"{hf_dir}: heads {n_head}/{n_kv} with head_dim {head_dim} is not a valid LLaMA")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    vocab = read_vocab(hf_dir, n_vocab, pre=pre)

    # ---- read and check every tensor before writing anything
    shapes = _expected_shapes(config, n_vocab, tied)
    name_map = TensorNameMap(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors: dict[str, np.ndarray] = {}
    from tqdm import tqdm

    for name, w in tqdm(_iter_checkpoint(hf_dir), desc="Reading", unit="tensor", disable=not progress):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the tied embedding is written once
        if name not in shapes:
            raise CorruptModelError(f"{hf_dir}: unexpected tensor {name!r} for a plain LLaMA")
        if tuple(w.shape) != shapes[name]:
            raise CorruptModelError(f"{hf_dir}: tensor {name!r} has shape {tuple(w.shape)}, expected {shapes[name]}")
        if name.endswith("self_attn.q_proj.weight") and _permute_qk:
            w = _permute_for_llama_cpp_rope(w, n_head)
        elif name.endswith("self_attn.k_proj.weight") and _permute_qk:
            w = _permute_for_llama_cpp_rope(w, n_kv)  # k has n_head_kv heads (GQA)
        tensors[name] = w
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise CorruptModelError(f"{hf_dir}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")

    # ---- write to a temporary file next to out, renamed only once complete
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16}
    make_folder(out.parent)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA])
    try:
        writer.add_name(prov.get("base_model") or hf_dir.name)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(file_type[outtype])
        writer.add_vocab_size(n_vocab)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(d)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if head_dim != d // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        _add_vocab(writer, vocab)
        _add_provenance(writer, prov)

        for name, w in tensors.items():
            gguf_name = name_map.get_name(name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise CorruptModelError(f"{hf_dir}: no GGUF name for tensor {name!r}")
            if w.ndim == 1 or outtype == "f32":
                writer.add_tensor(gguf_name, w.astype(np.float32))
            elif outtype == "f16":
                writer.add_tensor(gguf_name, w.astype(np.float16))
            else:
                bf16 = gguf.quants.quantize(w, GGMLQuantizationType.BF16)
                writer.add_tensor(gguf_name, bf16, raw_dtype=GGMLQuantizationType.BF16)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _add_vocab(writer, vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for setter, value in (
        (writer.add_bos_token_id, vocab.bos_id),
        (writer.add_eos_token_id, vocab.eos_id),
        (writer.add_unk_token_id, vocab.unk_id),
        (writer.add_pad_token_id, vocab.pad_id),
    ):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _add_provenance(writer, prov: dict[str, Any]) -> None:
    for key in PROVENANCE_KEYS:
        if key not in prov:
            continue
        value = prov[key]
        if key == "history_len":
            writer.add_uint32(f"genrec.{key}", int(value))
        else:
            writer.add_string(f"genrec.{key}", str(value))
