"""Sequence training on a tiny random LLaMA: config, data, validation search, learning, resume, CLI, accelerate."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import interrupt_once, start_cli_as_a_shell_would
from tinymodel import make_tiny_llama

from genrec_edge.catalog import Catalog
from genrec_edge.errors import UsageError
from genrec_edge.history import HistoryDB
from genrec_edge.prompts import Example, PromptTemplate, build_prompt_ids, leave_one_out
from genrec_edge.train import (
    BucketBatchSampler,
    TrainConfig,
    TrieTensors,
    Validator,
    build_catalog_trie,
    rank_titles,
    resolve_config,
    split_for_training,
    train_on_sequences,
)

N_TITLES = 40
TITLES = [f"Movie {i} ({1950 + i})" for i in range(N_TITLES)]
CATALOG = Catalog.from_pairs([(i + 1, t) for i, t in enumerate(TITLES)])
# Every user watches a prefix (4..15 items) of one fixed order of the catalog, so "what comes next" is
# learnable, and each user's validation target is a training target of the longer users.
MASTER_ORDER = [(7 * j) % N_TITLES + 1 for j in range(16)]
SEQUENCES = [(u, MASTER_ORDER[: 4 + u % 12]) for u in range(30)]

# The tiny LLaMA of tests/tinymodel.py: hidden 64, intermediate 128, 4 heads of 16, 2 KV heads, 2 layers.
HIDDEN, INTER, KV_OUT, LAYERS = 64, 128, 2 * 16, 2
LINEAR_SHAPES = {  # (in, out) of each linear layer of one decoder layer
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, KV_OUT),
    "v_proj": (HIDDEN, KV_OUT),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}


def expected_lora_params(r: int, targets) -> int:
    return LAYERS * sum(r * (LINEAR_SHAPES[t][0] + LINEAR_SHAPES[t][1]) for t in targets)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama", corpus=TITLES)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def tokenize_with(tokenizer):
    return lambda text, special: tokenizer(text, add_special_tokens=special)["input_ids"]


# ------------------------------------------------------------------------------------------ config
def test_config_precedence_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.01, "epochs": 3, "target_modules": ["q_proj", "v_proj"]}))
    config = resolve_config(path, epochs=5, lora_r=None)
    assert config.lr == 0.01  # from the file
    assert config.epochs == 5  # the flag wins over the file
    assert config.lora_r == TrainConfig().lora_r  # None = not given: the default stays
    assert config.target_modules == ("q_proj", "v_proj")
    assert resolve_config(None, target_modules="q_proj, o_proj").target_modules == ("q_proj", "o_proj")


@pytest.mark.parametrize(
    "content, message",
    [
        ({"learning_rate": 1}, "unknown training option"),
        ({"epochs": "2"}, "must be a number"),
        ({"epochs": 0}, "at least 1"),
        ({"loss": "masked"}, "loss must be one of plain, trie"),
        ({"loss": 1}, "must be a string"),
    ],
)
def test_config_rejects_bad_keys_and_values(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError, match=message):
        resolve_config(path)


# -------------------------------------------------------------------------------------------- data
def test_split_is_leave_one_out():
    sequences = [(1, [1, 2, 3, 4, 5]), (2, [3, 1]), (3, [2, 4, 6])]
    train, valid = split_for_training(sequences, CATALOG)
    assert valid == list(leave_one_out(sequences).valid)
    assert valid == [Example(1, (1, 2, 3), 4), Example(3, (2,), 4)]
    # training part = the validation history: neither held-out item is ever a training title
    assert train == {1: [TITLES[0], TITLES[1], TITLES[2]], 3: [TITLES[1]]}


def test_bucket_sampler_covers_every_window_once_per_epoch():
    lengths = [5 + (i * 37) % 23 for i in range(103)]
    sampler = BucketBatchSampler(lengths, batch_size=8, seed=3)
    epoch0, epoch1 = sampler.batches(0), sampler.batches(1)
    for batches in (epoch0, epoch1):
        assert sorted(i for b in batches for i in b) == list(range(103))
        assert len(batches) == len(sampler) == math.ceil(103 / 8)
    assert epoch0 != epoch1  # reshuffled each epoch...
    assert BucketBatchSampler(lengths, 8, 3).batches(1) == epoch1  # ...deterministically from the seed
    padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in epoch0)
    unsorted = sum(
        max(lengths[i] for i in range(s, min(s + 8, 103))) * len(range(s, min(s + 8, 103)))
        for s in range(0, 103, 8)
    )
    assert padding < unsorted - sum(lengths)  # bucketing pads less than batching in index order


def test_bucket_sampler_caps_padded_tokens_per_batch():
    lengths = [10 + (i * 53) % 200 for i in range(300)]
    sampler = BucketBatchSampler(lengths, batch_size=16, seed=0, max_tokens=1000)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert all(len(b) <= 16 and max(lengths[i] for i in b) * len(b) <= 1000 for b in batches)
    assert max(len(b) for b in batches) == 16  # short windows still fill a batch
    sampler.epoch = 0
    assert len(sampler) == len(batches)


# -------------------------------------------------------------------------------------- validation
def _brute_force_ranking(model, prompt, candidates, token_lists, k):
    """Score every candidate title by one uncached forward of prompt + title tokens (one batch)."""
    import torch

    rows = [prompt + token_lists[t] for t in candidates]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():  # right padding: the real tokens never attend to it
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    scored = []
    for row, title in enumerate(candidates):
        tokens = token_lists[title]
        score = sum(logp[row, len(prompt) - 1 + j, tok].item() for j, tok in enumerate(tokens))
        scored.append((score, title))
    return [t for _, t in sorted(scored, reverse=True)[:k]]


def test_trie_beam_search_with_a_wide_beam_is_exact(tiny_base, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tokenize = tokenize_with(tokenizer)
    eos = tokenizer.eos_token_id
    token_lists = {t: tokenize(t, False) + [eos] for t in TITLES}
    trie = build_catalog_trie(TITLES, tokenize, eos)
    histories = [TITLES[:3], TITLES[10:17], [TITLES[5]]]  # different prompt lengths: left padding matters
    template = PromptTemplate(history_len=5)
    prompts = [build_prompt_ids(tokenize, eos, h, template) for h in histories]
    ranked = rank_titles(
        model, prompts, [set(h) for h in histories], trie, beam=N_TITLES, k=10, pad_id=0, batch_users=2
    )
    for prompt, history, got in zip(prompts, histories, ranked, strict=True):
        candidates = [t for t in TITLES if t not in history]
        assert got == _brute_force_ranking(model, prompt, candidates, token_lists, 10)
        assert not set(got) & set(history)
    narrow = rank_titles(model, prompts, [set(h) for h in histories], trie, beam=10, k=10, pad_id=0)
    assert all(len(r) == 10 and len(set(r)) == 10 for r in narrow)
    assert (
        sum(a[0] == b[0] for a, b in zip(narrow, ranked, strict=True)) >= 2
    )  # beam 10 nearly always finds the best title


def test_unseen_mask_blocks_exactly_fully_seen_subtrees(tokenizer):
    tokenize = tokenize_with(tokenizer)
    titles = ["Movie 1 (1951)", "Movie 1 (1952)", "Movie 2 (1953)"]
    trie = build_catalog_trie(titles, tokenize, tokenizer.eos_token_id)
    paths = [
        [trie.walk(trie.tokens_of(t)[:d]) for d in range(1, len(trie.tokens_of(t)) + 1)] for t in range(3)
    ]
    view = TrieTensors(trie)
    one, everything = view.unseen_mask([[0], [0, 1, 2]]).tolist()
    assert not one[paths[0][-1]]  # its leaf
    assert all(one[node] for node in paths[1])  # nothing on the path of an unseen title
    assert one[0] and not everything[0]  # the root is blocked once every title is seen
    assert not any(everything[node] for node in paths[0][:1])  # the shared first token: all its titles seen


def test_colliding_titles_follow_the_runtime_trie(tiny_base):
    """Two titles with the same tokens: the first owns the leaf, the second is unreachable (not an error)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    tokens = {"A": [50, 60], "A twin": [50, 60], "B": [50, 70], "C": [80]}
    eos = 2
    trie = build_catalog_trie(list(tokens), lambda text, special: tokens[text], eos)
    assert trie.collisions == ["A twin"]
    prompt = [[1, 90, 91, 92]]
    wide = rank_titles(model, prompt, [set()], trie, beam=8, k=4)[0]
    assert sorted(wide) == ["A", "B", "C"]  # the twin never comes out
    seen_owner = rank_titles(model, prompt, [{"A"}], trie, beam=8, k=4)[0]
    assert sorted(seen_owner) == ["B", "C"]
    seen_twin = rank_titles(model, prompt, [{"A twin"}], trie, beam=8, k=4)[0]
    assert sorted(seen_twin) == ["A", "B", "C"]  # as the runtime: the unreachable twin excludes nothing


# --------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def memorised_run(tiny_base, tmp_path_factory):
    config = TrainConfig(
        base=str(tiny_base),
        history_len=8,
        epochs=4,
        lr=1e-2,
        batch_size=8,
        warmup=3,
        lora_r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        valid_users=0,
        valid_every=10,
        seed=0,
    )
    out = tmp_path_factory.mktemp("runs") / "memorised"
    result = train_on_sequences(
        SEQUENCES, CATALOG, out, config, dataset="synthetic", command_line="test", quiet=True
    )
    return result, config


def test_exact_trainable_parameter_count(memorised_run):
    result, config = memorised_run
    assert result.trainable_params == expected_lora_params(16, config.target_modules)
    run = json.loads((result.out / "genrec_run.json").read_text())
    assert run["trainable_params"] == expected_lora_params(16, config.target_modules)


def test_loss_decreases_and_valid_hr_improves(memorised_run, tiny_base, tokenizer):
    from transformers import AutoModelForCausalLM

    result, config = memorised_run
    run = json.loads((result.out / "genrec_run.json").read_text())
    assert run["last_loss"] < 0.3 * run["first_loss"]
    # the untrained base, on the same validation users and search
    _, valid = split_for_training(SEQUENCES, CATALOG)
    validator = Validator(
        valid,
        CATALOG,
        tokenize_with(tokenizer),
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        PromptTemplate(history_len=config.history_len),
        beam=10,
        batch_users=32,
    )
    before = validator(AutoModelForCausalLM.from_pretrained(tiny_base))
    assert result.best["hr@10"] >= before["hr@10"] + 0.3
    assert result.best["ndcg@10"] >= before["ndcg@10"] + 0.3
    assert max(row["hr@10"] for row in result.history) == result.best["hr@10"]


def test_run_dir_is_a_peft_adapter_with_provenance(memorised_run, tiny_base):
    import torch
    from safetensors.torch import load_file

    result, config = memorised_run
    out = result.out
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.bfloat16 for t in adapter.values())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    run = json.loads((out / "genrec_run.json").read_text())
    assert run["catalog_sha256"] == CATALOG.sha256 and run["dataset"] == "synthetic"
    assert run["prompt_template"] == PromptTemplate(history_len=8).to_dict() and run["history_len"] == 8
    assert run["config"] == config.to_dict() and run["command_line"] == "test"
    assert run["base_model"]["directory"] == str(tiny_base) and len(run["base_model_sha256"]) == 64
    assert run["versions"]["torch"] and run["versions"]["peft"] and run["tokens_per_s"] > 0
    assert run["best"]["step"] in [row["step"] for row in run["history"]] and run["status"] == "done"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [row["step"] for row in run["history"]]
    assert {"step", "loss", "hr@10", "ndcg@10"} <= set(log[0])
    # The model card is ours, from genrec_run.json, not peft's template of blanks.
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card and card.startswith(f"# genrec-edge run `{out.name}`")
    assert f"status: **done**, {run['steps']} of {run['total_steps']} optimizer steps" in card
    assert f"HR@10 {run['best']['hr@10']:.4f}, NDCG@10 {run['best']['ndcg@10']:.4f}" in card
    assert f"step {run['best']['step']}," in card and run["prompt_template"]["instruction"] in card
    assert f"genrec-edge merge {out} --out {out}-merged" in card and run["command_line"] in card


def _resume_config(base):
    return TrainConfig(
        base=str(base),
        history_len=4,
        epochs=2,
        max_steps=6,
        lr=5e-3,
        batch_size=4,
        grad_accum=2,
        warmup=2,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        valid_every=3,
        valid_users=5,
        seed=7,
    )


def test_resume_reproduces_an_uninterrupted_run(tiny_base, tmp_path):
    from safetensors.torch import load_file

    config = _resume_config(tiny_base)
    straight = train_on_sequences(SEQUENCES, CATALOG, tmp_path / "straight", config, quiet=True)
    stopped = train_on_sequences(SEQUENCES, CATALOG, tmp_path / "resumed", config, stop_after=2, quiet=True)
    assert stopped.stopped_early and stopped.steps == 2
    resumed = train_on_sequences(SEQUENCES, CATALOG, tmp_path / "resumed", config, resume=True, quiet=True)
    assert resumed.steps == straight.steps == 6
    a = load_file(tmp_path / "straight" / "checkpoint" / "trainable.safetensors")
    b = load_file(tmp_path / "resumed" / "checkpoint" / "trainable.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0  # it did train
    assert [(r["step"], r["hr@10"]) for r in resumed.history] == [
        (r["step"], r["hr@10"]) for r in straight.history
    ]


def test_resume_refuses_other_options_base_catalog_or_histories(tiny_base, tmp_path):
    import dataclasses

    config = _resume_config(tiny_base)
    run = tmp_path / "run"
    train_on_sequences(SEQUENCES, CATALOG, run, config, stop_after=1, quiet=True)
    before = (run / "genrec_run.json").read_text()
    with pytest.raises(UsageError, match=r"--resume continues a run as it began: --lora-r 8 \(it began with 4\)"):
        train_on_sequences(SEQUENCES, CATALOG, run, dataclasses.replace(config, lora_r=8), resume=True, quiet=True)
    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_base, other_base)
    (other_base / "config.json").write_text((other_base / "config.json").read_text().replace("{", '{"x": 1, ', 1))
    with pytest.raises(UsageError, match="is not the model this run began with"):
        train_on_sequences(SEQUENCES, CATALOG, run, dataclasses.replace(config, base=str(other_base)), resume=True,
                           quiet=True)
    other_catalog = Catalog.from_pairs([(i, f"{t} II") for i, t in zip(CATALOG.item_ids, CATALOG.titles, strict=True)])
    with pytest.raises(UsageError, match="catalog .* is not the one this run began with"):
        train_on_sequences(SEQUENCES, other_catalog, run, config, resume=True, quiet=True)
    fewer = list(SEQUENCES)[:-1]
    with pytest.raises(UsageError, match="histories changed since this run began"):
        train_on_sequences(fewer, CATALOG, run, config, resume=True, quiet=True)
    assert (run / "genrec_run.json").read_text() == before  # each refusal came before anything was written
    assert train_on_sequences(SEQUENCES, CATALOG, run, config, resume=True, quiet=True).steps == 6


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tiny_base, tmp_path):
    from genrec_edge.errors import NotFoundError

    config = _resume_config(tiny_base)
    with pytest.raises(NotFoundError, match="nothing to resume"):
        train_on_sequences(SEQUENCES, CATALOG, tmp_path / "none", config, resume=True, quiet=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "genrec_run.json").write_text("{}")
    with pytest.raises(UsageError, match="already holds a run"):
        train_on_sequences(SEQUENCES, CATALOG, tmp_path / "taken", config, quiet=True)


# -------------------------------------------------------------------------------------------- CLI
def test_cli_train_on_the_tiny_db(tiny_db, tmp_path, capsys):
    from genrec_edge.cli import main

    base = make_tiny_llama(tmp_path / "base")  # the conftest catalog's titles
    out = tmp_path / "run"
    books = "Here are the books a reader read, in order. Recommend the next book."
    args = ["train", "--db", str(tiny_db), "--out", str(out), "--base", str(base), "--max-steps", "2",
            "--history-len", "4", "--batch-size", "4", "--lora-r", "2", "--target-modules", "q_proj,v_proj",
            "--valid-users", "0", "--instruction", books]  # fmt: skip
    assert main(args) == 0
    assert "2 steps" in capsys.readouterr().out
    run = json.loads((out / "genrec_run.json").read_text())
    assert run["trainable_params"] == expected_lora_params(2, ["q_proj", "v_proj"])
    assert run["prompt_template"]["instruction"] == books and run["config"]["instruction"] == books
    # ... and it is what the served model is prompted with: merge -> convert -> the GGUF's genrec.prompt_template.
    from genrec_edge.convert import convert
    from genrec_edge.merge import merge
    from genrec_edge.prompts import prefix_ids
    from genrec_edge.recommend import Recommender

    gguf = convert(merge(out, tmp_path / "merged"), tmp_path / "model-F32.gguf", outtype="f32")
    with Recommender.open(gguf, tiny_db, threads=1, warn=lambda m: None) as rec:
        assert rec.template.instruction == books and rec.template.history_len == 4
        assert rec.prefix == prefix_ids(rec.engine.tokenize, rec.template) == rec.engine.tokenize(books + "\n", True)
    from conftest import TINY_HISTORIES

    assert run["dataset"] and run["valid_users"] == sum(len(items) >= 3 for items in TINY_HISTORIES.values())
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (
        main(["train", "--db", str(tiny_db), "--out", str(tmp_path / "x"), "--base", str(tmp_path / "nope")])
        == 4
    )
    err = capsys.readouterr().err
    assert err.startswith("error: no base model") and len(err.strip().splitlines()) == 1


def test_cli_resume_uses_the_runs_database_and_refuses_another(tiny_db, tmp_path, capsys, monkeypatch):
    from genrec_edge.cli import main

    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))  # no default database there
    base = make_tiny_llama(tmp_path / "base")
    out = tmp_path / "run"
    assert main(["train", "--db", str(tiny_db), "--out", str(out), "--base", str(base), "--max-steps", "2",
                 "--stop-after", "1", "--history-len", "4", "--batch-size", "4", "--lora-r", "2",
                 "--valid-users", "0"]) == 0
    assert json.loads((out / "genrec_run.json").read_text())["db"] == str(tiny_db.resolve())
    other = tmp_path / "other.db"
    shutil.copy(tiny_db, other)
    with HistoryDB.open(other) as db:
        db.add_interaction(1, 10, timestamp=9_999_999_999)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--db", str(other)]) == 2
    assert "histories changed since this run began" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--config", str(out / "genrec_run.json")]) == 2
    assert "--config does not apply to --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0, capsys.readouterr().err  # no --db: the run's own
    assert json.loads((out / "genrec_run.json").read_text())["steps"] == 2


def test_accelerate_launch_with_two_cpu_processes(tiny_db, tmp_path):
    """Two gloo processes via torchrun (`--multi_gpu` on a machine without GPUs: accelerate's `--cpu`
    launcher runs one process unless MPI is installed); each trains on half of every epoch's batches."""
    base = make_tiny_llama(tmp_path / "base")
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "genrec_edge.train", "--db", str(tiny_db),
           "--out", str(out), "--base", str(base), "--epochs", "1", "--history-len", "4", "--batch-size", "2",
           "--lora-r", "2", "--valid-users", "0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "passive"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "genrec_run.json").read_text())
    assert run["num_processes"] == 2 and run["status"] == "done"
    assert run["steps"] == math.ceil(
        math.ceil(run["train_windows"] / 2) / 2
    )  # batches split over 2 processes
    assert (out / "adapter_model.safetensors").is_file()
    assert len(run["history"]) == 1  # only the main process validates and writes
    assert proc.stdout.count(f"{out}: ") == 1  # and only it prints the summary


def test_split_returns_leave_one_out_examples_and_titles():
    train, valid = split_for_training([(5, [1, 2, 3, 4])], CATALOG)
    assert valid == [Example(5, (1, 2), 3)] and train == {5: [TITLES[0], TITLES[1]]}


def test_train_trials_bench_runs_a_list_and_survives_a_failing_trial(tiny_db, tmp_path):
    import csv

    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1])
    )  # bench/ is a folder of scripts, not installed
    from bench.train_trials import check_export
    from bench.train_trials import main as trials_main

    base = make_tiny_llama(tmp_path / "base")
    common = {"history_len": 4, "batch_size": 4, "max_steps": 2, "lora_alpha": 4, "eval_batch_users": 8}
    trials = [
        {"name": "r2", "lora_r": 2, **common},
        {"name": "broken", "target_modules": ["no_such_layer"], **common},
        {"name": "r4-lr", "lora_r": 4, "lr": 1e-2, **common},
        {"name": "full-ref", "full": True, "ship": False, "lr": 1e-2, **common},
    ]
    (tmp_path / "trials.json").write_text(json.dumps(trials))
    out, exported = tmp_path / "results", tmp_path / "exported"
    args = ["--db", str(tiny_db), "--out", str(out), "--trials", str(tmp_path / "trials.json"),
            "--base", str(base), "--budget-s", "300", "--export", str(exported), "--quiet"]  # fmt: skip
    assert trials_main(args) == 0
    rows = list(csv.DictReader(open(out / "trials.csv", encoding="utf-8")))
    assert [r["trial"] for r in rows] == ["r2", "broken", "r4-lr", "full-ref"]
    assert rows[0]["status"] == rows[2]["status"] == rows[3]["status"] == "ok"
    assert rows[1]["status"].startswith("failed: UsageError")
    for row in (rows[0], rows[2]):
        run = json.loads((Path(row["run_dir"]) / "genrec_run.json").read_text())
        assert float(row["valid_hr@10"]) == run["best"]["hr@10"] and run["valid_users"] == 6  # all of them
        assert float(row["tokens_per_s"]) > 0 and int(row["steps"]) == 2 and row["loss"] == "plain"
        assert float(row["limit_s"]) >= 300 / 4 - 1  # its share of the budget, at least
    # the best shippable trial; full fine-tuning is a reference point, never best/
    best = max((rows[0], rows[2]), key=lambda r: (float(r["valid_hr@10"]), float(r["valid_ndcg@10"])))
    best_run = json.loads((out / "best" / "genrec_run.json").read_text())
    assert best_run["config"]["lora_r"] == int(best["lora_r"]) and not best_run["config"]["full"]
    assert (out / "best" / "adapter_model.safetensors").is_file() and not (
        out / "best" / "checkpoint"
    ).exists()
    assert "| r4-lr | ok |" in (out / "trials.md").read_text()
    assert check_export(exported)["hr@10"] == best_run["best"]["hr@10"]
    assert (exported / "trials.csv").read_text() == (out / "trials.csv").read_text()

    # --resume keeps finished trials as they are and runs the others again
    stamp = (Path(rows[0]["run_dir"]) / "genrec_run.json").stat().st_mtime_ns
    assert trials_main([*args, "--resume"]) == 0
    again = list(csv.DictReader(open(out / "trials.csv", encoding="utf-8")))
    assert [r["status"][:6] for r in again] == ["ok", "failed", "ok", "ok"]
    assert again[0] == rows[0] and again[2] == rows[2]
    assert (Path(rows[0]["run_dir"]) / "genrec_run.json").stat().st_mtime_ns == stamp


def test_a_time_limit_shortens_the_schedule_to_fit(tiny_base, tmp_path):
    """After its first timed steps a time-limited run that cannot fit ends its cosine schedule early."""
    config = TrainConfig(base=str(tiny_base), history_len=4, epochs=3, batch_size=4, lora_r=2, lora_alpha=4,
                         valid_users=5, valid_every=1000, seed=0)  # fmt: skip
    # an enormous expected validation leaves no time for training: the schedule ends one step later
    result = train_on_sequences(SEQUENCES, CATALOG, tmp_path / "fit", config, time_limit_s=1e5,
                                valid_seconds_hint=1e6, quiet=True)  # fmt: skip
    run = json.loads((tmp_path / "fit" / "genrec_run.json").read_text())
    assert run["planned_steps"] > 5 and run["total_steps"] == result.steps == 5 and run["status"] == "done"
    assert not result.stopped_early and result.best is not None


def test_a_run_out_of_time_stops_validated(tiny_base, tmp_path):
    config = TrainConfig(base=str(tiny_base), history_len=4, epochs=2, batch_size=4, lora_r=2, lora_alpha=4,
                         valid_users=5, seed=0)  # fmt: skip
    result = train_on_sequences(SEQUENCES, CATALOG, tmp_path / "late", config, time_limit_s=1e-6, quiet=True)
    run = json.loads((tmp_path / "late" / "genrec_run.json").read_text())
    assert result.stopped_early and result.steps == 1 and run["status"] == "stopped"
    assert [row["step"] for row in result.history] == [1] and (
        tmp_path / "late" / "adapter_model.safetensors"
    ).is_file()


def test_a_truncated_gguf_base_is_named_as_such(tiny_db, tmp_path, capsys):
    from tinymodel import tiny_gguf

    from genrec_edge.cli import main

    whole = tiny_gguf(tmp_path / "g")
    for size in (100, whole.stat().st_size // 2):  # inside the header; inside the tensor data
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(whole.read_bytes()[:size])
        rc = main(["train", "--db", str(tiny_db), "--out", str(tmp_path / f"run-{size}"), "--base", str(cut),
                   "--max-steps", "1"])
        err = capsys.readouterr().err
        assert rc == 7 and err.count("error: ") == 1 and "truncated" in err and "tokenizer" not in err, err
        assert not (tmp_path / f"run-{size}").exists()


def test_a_run_stopped_before_its_first_checkpoint_says_so_and_starts_over(tiny_db, tmp_path):
    """Ctrl-C mid-training, before any checkpoint: the record said "running" forever, the README promised
    weights it did not have, and the directory could be neither resumed nor trained again."""

    base = make_tiny_llama(tmp_path / "base")
    out = tmp_path / "run"
    argv = ["train", "--db", str(tiny_db), "--out", str(out), "--base", str(base), "--epochs", "500",
            "--valid-every", "100000",  # validation, and so the first checkpoint, only at the end
            "--history-len", "4", "--batch-size", "2", "--lora-r", "2", "--valid-users", "0"]
    proc = start_cli_as_a_shell_would(*argv, stderr=subprocess.PIPE, text=True)
    err = interrupt_once(proc, (out / "genrec_run.json").exists, "training", wait_s=120, settle_s=0.5)  # in the steps
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err[-500:]
    assert json.loads((out / "genrec_run.json").read_text())["status"] == "interrupted"
    card = (out / "README.md").read_text()
    assert "no weights in this directory (interrupted)" in card and "holds the final weights" not in card
    from genrec_edge.cli import main
    from genrec_edge.errors import NotFoundError

    assert main(["train", "--out", str(out), "--resume"]) == NotFoundError.exit_code
    assert main([*argv[:argv.index("--epochs")], "--max-steps", "1", "--history-len", "4", "--batch-size", "2",
                 "--lora-r", "2", "--valid-users", "0"]) == 0  # the same --out: started over
    run = json.loads((out / "genrec_run.json").read_text())
    assert run["status"] == "done" and run["steps"] == 1


def test_a_base_without_a_tokenizer_or_a_folder_for_config_is_one_clear_line(tiny_db, tmp_path, capsys):
    from genrec_edge.cli import main

    base = make_tiny_llama(tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (base / name).unlink(missing_ok=True)
    rc = main(["train", "--db", str(tiny_db), "--out", str(tmp_path / "run"), "--base", str(base), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 4 and err.count("error: ") == 1 and "has no tokenizer (tokenizer.json" in err, err
    rc = main(["train", "--db", str(tiny_db), "--out", str(tmp_path / "run"), "--config", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a folder: give the JSON file of options" in err, err
