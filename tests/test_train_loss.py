"""The training losses on a tiny random LLaMA: trie-masked loss vs a brute-force loop, plain loss vs plain CE,
the trie nodes of a window, the schedule fitted to a time limit, and a short run with the trie loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinymodel import make_tiny_llama

from genrec_edge.catalog import Catalog
from genrec_edge.prompts import IGNORE_INDEX, PromptTemplate
from genrec_edge.train import (
    PadCollator,
    TrainConfig,
    TrieTensors,
    batch_loss,
    build_catalog_trie,
    build_windows,
    train_on_sequences,
    trie_masked_loss,
)
from genrec_edge.train.data import NO_NODE

# Shared prefixes on purpose: "Star ..." titles branch after a common start, the others are unique early.
TITLES = [
    "Star Wars (1977)",
    "Star Trek (1979)",
    "Star Trek II (1982)",
    "Stargate (1994)",
    "Heat (1995)",
    "Heathers (1989)",
    "Alien (1979)",
    "Aliens (1986)",
    "Toy Story (1995)",
    "Toy Story 2 (1999)",
    "Jumanji (1995)",
    "Matrix, The (1999)",
]
CATALOG = Catalog.from_pairs([(i + 1, t) for i, t in enumerate(TITLES)])
SEQUENCES = [(u, [(3 * j + u) % len(TITLES) + 1 for j in range(4 + u % 5)]) for u in range(10)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenize, eos id, pad id, trie, base dir) of a tiny random LLaMA over TITLES."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_tiny_llama(tmp_path_factory.mktemp("base") / "tiny", corpus=TITLES)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()

    def tokenize(text, special):
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    eos = tokenizer.eos_token_id
    return model, tokenize, eos, tokenizer.pad_token_id, build_catalog_trie(TITLES, tokenize, eos), base


def _batch(tiny, with_trie=True):
    _, tokenize, eos, pad, trie, _ = tiny
    histories = [TITLES[:5], [TITLES[1], TITLES[2], TITLES[9]], TITLES[3:11]]  # different lengths: padding
    windows = build_windows(histories, tokenize, eos, PromptTemplate(history_len=3), trie if with_trie else None)
    return PadCollator(pad)(windows)


def _brute_force_trie_loss(logits, batch, trie) -> tuple[float, int, int]:
    """Loop over every labelled position: cross-entropy with the softmax restricted to the trie's children.

    Returns (mean loss, positions with one allowed token, positions with several)."""
    import torch

    losses, single, several = [], 0, 0
    labels, nodes = batch["labels"], batch["trie_nodes"]
    for row in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[row, t + 1])
            if target == IGNORE_INDEX:
                continue
            allowed, _ = trie.children(int(nodes[row, t + 1]))
            allowed = [int(a) for a in allowed]
            assert target in allowed
            logp = torch.log_softmax(logits[row, t, allowed].double(), dim=-1)
            losses.append(-float(logp[allowed.index(target)]))
            single += len(allowed) == 1
            several += len(allowed) > 1
    return sum(losses) / len(losses), single, several


def test_trie_masked_loss_equals_a_brute_force_loop(tiny):
    import torch

    model, _, _, _, trie, _ = tiny
    batch = _batch(tiny)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, single, several = _brute_force_trie_loss(logits, batch, trie)
    assert single > 0 and several > 0  # both kinds of positions are exercised
    got = batch_loss(model, batch, "trie", TrieTensors(trie))
    assert abs(got.item() - expected) < 1e-5
    plain = batch_loss(model, batch, "plain")
    assert got.item() < plain.item()  # the same targets, normalised over fewer tokens


def test_trie_masked_loss_gradient_matches_the_brute_force_one(tiny):
    """The max used for stability is detached: the gradient must still be that of the exact loss."""
    import torch

    model, _, _, _, trie, _ = tiny
    batch = _batch(tiny)
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    batched = base.clone().requires_grad_(True)
    trie_masked_loss(batched, batch["labels"], batch["trie_nodes"], TrieTensors(trie)).backward()
    looped = base.clone().double().requires_grad_(True)
    terms = []
    for row in range(base.shape[0]):
        for t in range(base.shape[1] - 1):
            target = int(batch["labels"][row, t + 1])
            if target != IGNORE_INDEX:
                allowed = [int(a) for a in trie.children(int(batch["trie_nodes"][row, t + 1]))[0]]
                logp = torch.log_softmax(looped[row, t, allowed], dim=-1)
                terms.append(-logp[allowed.index(target)])
    torch.stack(terms).mean().backward()
    assert torch.allclose(batched.grad.double(), looped.grad, atol=1e-7)
    assert batched.grad.abs().sum() > 0


def test_single_child_positions_contribute_nothing(tiny):
    """IGD's zero-information tokens: where the trie allows one token, loss and gradient are exactly 0."""
    import torch

    model, _, _, _, trie, _ = tiny
    batch = _batch(tiny)
    view = TrieTensors(trie)
    labels = batch["labels"].clone()
    nodes = batch["trie_nodes"]
    single = (nodes >= 0) & (view.child_count[nodes.clamp(min=0)] == 1)
    assert single.any()
    labels[~single] = IGNORE_INDEX  # keep only the single-child positions
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.clone().requires_grad_(True)
    loss = trie_masked_loss(logits, labels, nodes, view)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().max().item() == 0.0


def test_plain_loss_is_the_causal_lm_cross_entropy(tiny):
    import torch

    model = tiny[0]
    batch = _batch(tiny, with_trie=False)
    assert "trie_nodes" not in batch
    with torch.no_grad():
        got = batch_loss(model, batch, "plain")
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    assert abs(got.item() - expected.item()) < 1e-6


def test_window_trie_nodes_are_each_titles_prefix_node(tiny):
    _, tokenize, eos, _, trie, _ = tiny
    histories = [TITLES[:4]]
    (window,) = build_windows(histories, tokenize, eos, PromptTemplate(history_len=3), trie)
    expected = []
    for label in window.labels:
        if label == IGNORE_INDEX:
            expected.append(NO_NODE)
    prefix: list[int] = []
    walked = []
    for label in window.labels[len(expected) :]:
        walked.append(trie.walk(prefix))
        prefix = [] if label == eos else prefix + [label]
    assert window.nodes == expected + walked
    assert walked.count(0) == 4  # each of the 4 titles starts at the root


def test_fit_to_deadline_ends_the_cosine_inside_the_time_left():
    import torch
    from rich.console import Console

    from genrec_edge.train.loop import LoopState, Run, fit_to_deadline, lr_factor

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(0, 100))
    config = TrainConfig(epochs=2, warmup=0)
    fields = dict.fromkeys(
        ("out", "accelerator", "model", "loader", "sampler", "tokenizer", "trie_view", "validator", "autocast")
    )
    run = Run(config=config, optimizer=optimizer, scheduler=scheduler, micro_counts=[50, 50], total_steps=100,
              provenance={}, console=Console(quiet=True), trainable_params=1, **fields)  # fmt: skip
    state = LoopState(step=10, epoch=0)
    fit_to_deadline(run, state, seconds_per_step=1.0, valid_seconds=5.0, seconds_left=500.0)
    assert run.total_steps == 100 and state.fitted_steps is None  # it fits: nothing changes
    fit_to_deadline(run, state, seconds_per_step=1.0, valid_seconds=5.0, seconds_left=70.0)
    # 2 validations (one per epoch end) x 5 s leave 60 s: 60 steps after step 10
    assert run.total_steps == state.fitted_steps == 70
    factor = run.scheduler.lr_lambdas[0]
    assert factor(70) == pytest.approx(0.0) and factor(10) > 0.5


def test_a_run_with_the_trie_loss_learns_and_records_it(tiny, tmp_path):
    base = tiny[5]
    config = TrainConfig(base=str(base), history_len=3, epochs=3, lr=1e-2, batch_size=4, warmup=0, lora_r=4,
                         lora_alpha=8, lora_dropout=0.0, loss="trie", valid_users=0, seed=1)  # fmt: skip
    result = train_on_sequences(SEQUENCES, CATALOG, tmp_path / "run", config, quiet=True)
    run = json.loads((Path(result.out) / "genrec_run.json").read_text())
    assert run["config"]["loss"] == "trie" and run["status"] == "done"
    assert run["last_loss"] < run["first_loss"]
    assert result.best is not None and len(result.history) == 3  # validated at every epoch end
