"""LoRA (or full) sequence training of a LLaMA base on users' histories, with HR@10 validation.

Training is SASRec-style: each user's training part of the chronological sequence (all but the last two
items; the validation and test targets are held out, as in ``prompts.leave_one_out``) is cut into windows
of ``history_len + 1`` titles (``prompts.training_windows``). One forward pass per window puts the loss on
every title (+ EOS) in it, and the window's last title sees exactly the inference prompt
(``prompts.build_prompt_ids`` of the titles before it), so training and serving agree token for token.

Validation uses the evaluation protocol's metric: HR@10 / NDCG@10 on the validation split (target = the
second-to-last item, history = everything before it), ranking titles by a **batched trie beam search
with a KV cache** in torch (:func:`rank_titles`). It is our own rather than ``model.generate(...,
prefix_allowed_tokens_fn=...)`` because (1) that callback runs in Python once per beam per step, which
dominates on a GPU, while here the trie is a pair of tensors and the mask is one scatter per step for the
whole batch of users; (2) seen titles are excluded by masking whole subtrees whose titles the user has all
seen, so no beam is wasted on a dead end; (3) scores are plain sums of token log-probs (the runtime's
score), without ``generate``'s length penalty. With a beam at least as wide as the catalog it is
exhaustive, which a test checks against scoring every title one by one.

The run directory is a plain peft adapter directory (``adapter_model.safetensors`` in bf16, the best
adapter by validation HR@10) plus ``genrec_run.json`` (the resolved config and provenance),
``train_log.jsonl`` (one row per validation) and ``checkpoint/`` (fp32 trainable weights, optimizer,
scheduler, RNG; what ``--resume`` continues from). A ``--full`` run holds a full HF model instead.

The same code runs under ``accelerate launch`` (``python -m genrec_edge.train`` takes the CLI's flags);
only the main process validates and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import Catalog
from .errors import CorruptModelError, NotFoundError, UsageError
from .models_hf import DEFAULT_BASE
from .prompts import (
    DEFAULT_HISTORY_LEN,
    IGNORE_INDEX,
    PromptTemplate,
    build_prompt_ids,
    build_training_window,
    training_windows,
)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RUN_CONFIG = "genrec_run.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoint"
TOP_K = 10
THROUGHPUT_PROBE_STEPS = 3  # steps before the up-front tokens/s + ETA line (the first is warm-up)


@dataclass
class TrainConfig:
    """Every training option; the CLI's flags and the ``--config`` JSON keys have these names."""

    base: str = DEFAULT_BASE
    history_len: int = DEFAULT_HISTORY_LEN
    epochs: int = 1
    lr: float = 5e-4
    batch_size: int = 16
    max_batch_tokens: int = 16384  # cap on padded tokens per micro-batch (0 = none): bounds GPU memory
    grad_accum: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    warmup: int = 10  # optimizer steps of linear warm-up, then cosine decay to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    full: bool = False
    valid_every: int = 0  # validate every N optimizer steps and at the end; 0 = at the end of each epoch
    valid_users: int = 200  # seeded sample of validation users; 0 = all
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = at each validation
    beam: int = 10
    eval_batch_users: int = 32
    seed: int = 0
    bf16: bool | None = None  # None = bf16 autocast where the GPU supports it, fp32 on CPU
    max_train_users: int = 0  # seeded sample of users to train on; 0 = all

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data


def resolve_config(config_file: str | Path | None = None, **overrides) -> TrainConfig:
    """Dataclass defaults < the JSON ``config_file`` < ``overrides`` (None = not given); unknown keys refused."""
    values: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise NotFoundError(f"no config file {path}")
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a JSON object")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(unknown)}")
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = [m.strip() for m in values["target_modules"].split(",") if m.strip()]
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    for name, value in values.items():
        expected = known[name].type
        if expected in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UsageError(f"option {name} must be a number, got {value!r}")
        if expected == "int" and isinstance(value, float):
            if value != int(value):
                raise UsageError(f"option {name} must be an integer, got {value!r}")
            values[name] = int(value)
    config = TrainConfig(**values)
    _check_config(config)
    return config


def _check_config(c: TrainConfig) -> None:
    positive = ("history_len", "epochs", "batch_size", "grad_accum", "lora_r", "beam", "eval_batch_users")
    for name in positive:
        if getattr(c, name) < 1:
            raise UsageError(f"{name} must be at least 1, got {getattr(c, name)}")
    for name in (
        "max_batch_tokens",
        "max_steps",
        "warmup",
        "valid_every",
        "valid_users",
        "checkpoint_every",
        "max_train_users",
    ):
        if getattr(c, name) < 0:
            raise UsageError(f"{name} must be >= 0, got {getattr(c, name)}")
    if not c.lr > 0:
        raise UsageError(f"lr must be > 0, got {c.lr}")
    if not 0 <= c.lora_dropout < 1:
        raise UsageError(f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
    if not c.full and not c.target_modules:
        raise UsageError("target_modules is empty (name the linear layers to adapt, or use --full)")


# ------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class ValidExample:
    user: int
    history: tuple[str, ...]  # titles, oldest first
    target: str


def split_histories(
    sequences: Iterable[tuple[int, Sequence[int]]], catalog: Catalog
) -> tuple[dict[int, list[str]], list[ValidExample]]:
    """Per user: the training titles (all but the last two items) and the validation example.

    The same split as ``prompts.leave_one_out`` (valid target = item n-2, its history = the training
    part), computed in linear time: leave_one_out materialises every training prefix.
    """
    train: dict[int, list[str]] = {}
    valid: list[ValidExample] = []
    for user, items in sequences:
        titles = [catalog.title_of(i) for i in items]
        if len(titles) < 3:  # no validation target: the user only has held-out items
            continue
        train[user] = titles[:-2]
        valid.append(ValidExample(user, tuple(titles[:-2]), titles[-2]))
    return train, valid


def build_windows(
    train_titles: Iterable[Sequence[str]], tokenize, eos_id: int, template: PromptTemplate
) -> list[tuple[list[int], list[int]]]:
    windows = []
    for titles in train_titles:
        for window, loss_from in training_windows(titles, template.history_len):
            windows.append(build_training_window(tokenize, eos_id, window, template, loss_from))
    return windows


class BucketBatchSampler:
    """Batches of similar-length windows, in a seeded order that changes every epoch.

    Each epoch shuffles all windows, sorts each run of ``batch_size * 50`` by length (little padding, yet
    no fixed batch composition), cuts batches and shuffles the batches. A batch holds at most
    ``batch_size`` windows and, if ``max_tokens`` > 0, at most ``max_tokens`` padded tokens: the logits
    of a 49k vocabulary take 4 bytes x vocab per token, so long windows must come in smaller batches.
    Set ``epoch`` before iterating.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, max_tokens: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.seed = seed
        self.epoch = 0
        self._count: dict[int, int] = {}

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * 50
        batches: list[list[int]] = []
        for start in range(0, len(order), span):
            batch: list[int] = []
            for i in sorted(order[start : start + span], key=lambda i: self.lengths[i]):
                # sorted ascending: the newest window is the longest, so it sets the padded width
                too_many_tokens = self.max_tokens and (len(batch) + 1) * self.lengths[i] > self.max_tokens
                if batch and (len(batch) == self.batch_size or too_many_tokens):
                    batches.append(batch)
                    batch = []
                batch.append(i)
            if batch:
                batches.append(batch)
        rng.shuffle(batches)
        self._count[epoch] = len(batches)
        return batches

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        if self.epoch not in self._count:
            self.batches(self.epoch)
        return self._count[self.epoch]


class PadCollator:
    """Right padding: pad id in the inputs, ``IGNORE_INDEX`` in the labels, 0 in the attention mask."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, windows):
        import torch

        width = max(len(ids) for ids, _ in windows)
        input_ids = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
        for row, (ids, labs) in enumerate(windows):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ------------------------------------------------------------------------------------- validation
class TitleTrie:
    """The catalog's token trie (``tokenize(title) + [EOS]`` per distinct title) as flat tensors.

    Edges are sorted by ``parent * vocab + token``: the sorted keys answer "child of (node, token)" by
    binary search, and since they are grouped by parent, ``start[node]``/``count[node]`` list a node's
    children. ``leaf_title[node]`` is the title index a leaf (reached by EOS) stands for, else -1.
    """

    def __init__(self, titles: Sequence[str], token_lists: Sequence[Sequence[int]], vocab_size: int):
        import torch

        children: list[dict[int, int]] = [{}]
        leaf_title = [-1]
        self.paths: list[list[int]] = []  # nodes below the root on each title's path, leaf last
        for index, tokens in enumerate(token_lists):
            node, path = 0, []
            for token in tokens:
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = len(children)
                    children[node][token] = nxt
                    children.append({})
                    leaf_title.append(-1)
                node = nxt
                path.append(node)
            if leaf_title[node] != -1:
                raise CorruptModelError(
                    f"the tokenizer gives two titles the same tokens: {titles[leaf_title[node]]!r}, {titles[index]!r}"
                )
            leaf_title[node] = index
            self.paths.append(path)
        edges = sorted(
            (parent * vocab_size + tok, child)
            for parent, kids in enumerate(children)
            for tok, child in kids.items()
        )
        self.titles = list(titles)
        self.vocab_size = vocab_size
        self.num_nodes = len(children)
        self.max_depth = max((len(t) for t in token_lists), default=0)
        self.edge_key = torch.tensor([k for k, _ in edges], dtype=torch.long)
        self.edge_child = torch.tensor([c for _, c in edges], dtype=torch.long)
        self.edge_token = self.edge_key % vocab_size
        counts = torch.tensor([len(kids) for kids in children], dtype=torch.long)
        self.count = counts
        self.start = torch.cumsum(counts, 0) - counts
        self.leaf_title = torch.tensor(leaf_title, dtype=torch.long)
        leaves_below = Counter(node for path in self.paths for node in path)
        self.leaves_below = leaves_below
        self.index_of = {t: i for i, t in enumerate(self.titles)}

    def to(self, device) -> TitleTrie:
        for name in ("edge_key", "edge_child", "edge_token", "count", "start", "leaf_title"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def blocked_nodes(self, seen_titles: Iterable[str]) -> set[int]:
        """Nodes all of whose titles were seen: a beam entering one could only end in an excluded title."""
        passes = Counter()
        for title in set(seen_titles):
            index = self.index_of.get(title)
            if index is not None:
                passes.update(self.paths[index])
        return {node for node, n in passes.items() if n == self.leaves_below[node]}

    def expand(self, nodes):
        """Every (row, token, child) edge out of ``nodes[row]``, flat."""
        import torch

        counts = self.count[nodes]
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), counts)
        first = torch.repeat_interleave(self.start[nodes], counts)
        offset_in_row = torch.arange(len(rows), device=nodes.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts
        )
        edge = first + offset_in_row
        return rows, self.edge_token[edge], self.edge_child[edge]

    def child(self, nodes, tokens):
        import torch

        keys = nodes * self.vocab_size + tokens
        found = torch.searchsorted(self.edge_key, keys).clamp(max=len(self.edge_key) - 1)
        return self.edge_child[found]


def _cache_kwarg(model) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns); earlier 5.x only know the old."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def rank_titles(
    model,
    prompts: Sequence[Sequence[int]],
    seen: Sequence[Iterable[str]],
    trie: TitleTrie,
    beam: int = 10,
    k: int = TOP_K,
    pad_id: int = 0,
    batch_users: int = 32,
    autocast=None,
) -> list[list[str]]:
    """Top-``k`` titles per prompt by trie-constrained beam search, the user's seen titles excluded.

    Users are processed ``batch_users`` at a time (left-padded, sorted by prompt length): one prefill,
    then one forward of ``users * beam`` rows per title token, reusing the KV cache. Each step keeps the
    best ``2 * beam`` expansions per user: those ending a title (EOS) join the user's finished list, the
    best ``beam`` others continue. A user is done once ``k`` titles are finished and no live beam can
    still beat the k-th (log-probs only decrease).
    """
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[str]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    trie.to(device)
    with torch.no_grad(), autocast() if autocast else contextlib.nullcontext():
        for start in range(0, len(order), batch_users):
            chunk = order[start : start + batch_users]
            ranked = _beam_search_chunk(
                model,
                [prompts[i] for i in chunk],
                [trie.blocked_nodes(seen[i]) for i in chunk],
                trie,
                beam,
                k,
                pad_id,
                device,
            )
            for i, titles in zip(chunk, ranked, strict=True):
                results[i] = titles
    return results


def _beam_search_chunk(model, prompts, blocked, trie: TitleTrie, beam, k, pad_id, device) -> list[list[str]]:
    import torch
    from transformers import DynamicCache

    n_users = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((n_users, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n_users, width), dtype=torch.long)
    for row, ids in enumerate(prompts):  # left padding: every prompt ends at the last column
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    cache_kw = _cache_kwarg(model)
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
    )
    logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    vocab = logp.shape[-1]
    blocked_keys = torch.tensor(
        sorted(u * trie.num_nodes + n for u, nodes in enumerate(blocked) for n in nodes),
        dtype=torch.long,
        device=device,
    )
    nodes = torch.zeros(n_users, dtype=torch.long, device=device)  # one root beam per user at first
    scores = torch.zeros(n_users, device=device)
    next_pos = attention.sum(-1)
    rows_per_user = 1
    finished: list[list[tuple[float, int]]] = [[] for _ in range(n_users)]
    done = [False] * n_users
    for _depth in range(trie.max_depth):
        rows, tokens, kids = trie.expand(nodes)
        cand = scores[rows] + logp[rows, tokens]
        user_of_row = torch.div(rows, rows_per_user, rounding_mode="floor")
        if len(blocked_keys):
            cand = cand.masked_fill(
                torch.isin(user_of_row * trie.num_nodes + kids, blocked_keys), float("-inf")
            )
        dense = torch.full((n_users * rows_per_user, vocab), float("-inf"), device=device)
        dense[rows, tokens] = cand
        top_scores, top_index = dense.view(n_users, rows_per_user * vocab).topk(
            min(2 * beam, rows_per_user * vocab), dim=-1
        )
        src_row = torch.arange(n_users, device=device)[:, None] * rows_per_user + top_index // vocab
        top_token = top_index % vocab
        valid = torch.isfinite(top_scores)
        top_child = torch.where(valid, trie.child(nodes[src_row], top_token), torch.zeros_like(top_token))
        is_leaf = valid & (trie.leaf_title[top_child] >= 0)
        live = valid & ~is_leaf
        slot = torch.cumsum(live.long(), dim=-1) - 1
        keep = live & (slot < beam)

        for u, j in is_leaf.nonzero().tolist():
            if not done[u]:
                finished[u].append((top_scores[u, j].item(), trie.leaf_title[top_child[u, j]].item()))
        # the next beams: slot s of user u is row u * beam + s; empty slots carry -inf and the root
        new_nodes = torch.zeros((n_users, beam), dtype=torch.long, device=device)
        new_scores = torch.full((n_users, beam), float("-inf"), device=device)
        new_src = torch.arange(n_users, device=device)[:, None].expand(n_users, beam) * rows_per_user
        new_src = new_src.clone()
        new_tokens = torch.full((n_users, beam), pad_id, dtype=torch.long, device=device)
        us, js = keep.nonzero(as_tuple=True)
        ss = slot[us, js]
        new_nodes[us, ss] = top_child[us, js]
        new_scores[us, ss] = top_scores[us, js]
        new_src[us, ss] = src_row[us, js]
        new_tokens[us, ss] = top_token[us, js]

        best_live = new_scores.max(dim=-1).values.tolist()
        for u in range(n_users):
            if done[u]:
                continue
            fin = sorted((s for s, _ in finished[u]), reverse=True)
            if best_live[u] == float("-inf") or (len(fin) >= k and best_live[u] <= fin[k - 1]):
                done[u] = True
        if all(done):
            break

        rows_per_user = beam
        src = new_src.reshape(-1)
        cache.reorder_cache(src)
        attention = torch.cat(
            [attention[src], torch.ones((len(src), 1), dtype=attention.dtype, device=device)], dim=-1
        )
        next_pos = next_pos[src]
        nodes, scores = new_nodes.reshape(-1), new_scores.reshape(-1)
        out = model(
            input_ids=new_tokens.reshape(-1, 1),
            attention_mask=attention,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_kw: cache},
        )
        next_pos = next_pos + 1
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    ranked = []
    for u in range(n_users):
        best = sorted(finished[u], key=lambda pair: -pair[0])[:k]
        ranked.append([trie.titles[index] for _, index in best])
    return ranked


def ranking_metrics(
    rankings: Sequence[Sequence[str]], targets: Sequence[str], k: int = TOP_K
) -> tuple[float, float]:
    """Mean HR@k and NDCG@k of each target title's rank in its ranking (``genrec_edge.metrics``)."""
    from . import metrics

    ranks = [
        metrics.target_rank(list(ranked)[:k], target)
        for ranked, target in zip(rankings, targets, strict=True)
    ]
    return metrics.mean(metrics.hit_rate(r, k) for r in ranks), metrics.mean(
        metrics.ndcg(r, k) for r in ranks
    )


class Validator:
    """HR@10 / NDCG@10 on a fixed sample of validation users, prompts built once."""

    def __init__(
        self, examples, catalog: Catalog, tokenize, eos_id, pad_id, template, beam, batch_users, vocab_size
    ):
        titles = catalog.unique_titles
        self.trie = TitleTrie(titles, [tokenize(t, False) + [eos_id] for t in titles], vocab_size)
        self.examples = list(examples)
        self.prompts = [build_prompt_ids(tokenize, eos_id, ex.history, template) for ex in self.examples]
        self.targets = [ex.target for ex in self.examples]
        self.seen = [set(ex.history) for ex in self.examples]
        self.pad_id, self.beam, self.batch_users = pad_id, beam, batch_users

    def __len__(self) -> int:
        return len(self.examples)

    def __call__(self, model, autocast=None) -> dict:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        rankings = rank_titles(
            model,
            self.prompts,
            self.seen,
            self.trie,
            self.beam,
            TOP_K,
            self.pad_id,
            self.batch_users,
            autocast,
        )
        if was_training:
            model.train()
        hr, ndcg = ranking_metrics(rankings, self.targets)
        return {"hr@10": hr, "ndcg@10": ndcg, "users": len(self), "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    out: Path
    steps: int
    trainable_params: int
    tokens_per_s: float
    best: dict | None
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    main_process: bool = True  # False in the other processes of a multi-process launch


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("genrec-edge", "torch", "transformers", "peft", "accelerate", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_on_sequences(
    sequences: Iterable[tuple[int, Sequence[int]]],
    catalog: Catalog,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    dataset: str | None = None,
    resume: bool = False,
    stop_after: int = 0,
    time_limit_s: float = 0.0,
    command_line: str | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train on ``(user, item ids oldest first)`` sequences; write the run directory ``out``.

    ``stop_after`` > 0 stops after that many optimizer steps with a checkpoint, as an interruption
    would (a rented GPU's time limit): ``resume=True`` later continues to exactly the same result.
    ``time_limit_s`` > 0 does the same once that many seconds have passed, validating first so the
    run still has a best adapter (single-process runs only: processes would disagree on the clock).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.console import Console

    from . import models_hf

    config = config or TrainConfig()
    _check_config(config)
    out = Path(out)
    console = Console(stderr=True, quiet=quiet)
    if resume:
        if not (out / CHECKPOINT_DIR / "state.pt").is_file():
            raise NotFoundError(f"nothing to resume in {out} (no {CHECKPOINT_DIR}/state.pt)")
    elif (out / RUN_CONFIG).exists() or (out / CHECKPOINT_DIR).exists():
        raise UsageError(f"{out} already holds a run: choose another --out, or pass --resume to continue it")

    use_bf16 = config.bf16
    if use_bf16 is None:
        use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # cpu=True on a machine without an accelerator is what makes accelerate treat a multi-process launch
    # (torchrun, `accelerate launch --multi_gpu`) as MULTI_CPU with gloo instead of N lone processes.
    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=no_accelerator)
    main = accelerator.is_main_process
    if not main:
        console.quiet = True
    set_seed(config.seed)

    started = time.monotonic()
    spec = models_hf.resolve_base(config.base)
    tokenizer = models_hf.load_tokenizer(spec)
    tokenize = models_hf.hf_tokenize(tokenizer)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    template = PromptTemplate(history_len=config.history_len)

    train_titles, valid_examples = split_histories(sequences, catalog)
    users = sorted(train_titles)
    if config.max_train_users and config.max_train_users < len(users):
        users = sorted(random.Random(config.seed).sample(users, config.max_train_users))
    windows = build_windows((train_titles[u] for u in users), tokenize, eos_id, template)
    if not windows:
        raise UsageError("no training data: every user needs at least 3 interactions (2 are held out)")
    if config.valid_users and config.valid_users < len(valid_examples):
        valid_examples = random.Random(config.seed + 1).sample(valid_examples, config.valid_users)

    with console.status("loading the base model"):
        model = models_hf.load_model(spec)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    if not config.full:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as exc:
            raise UsageError(f"cannot apply LoRA to {spec.name}: {exc}") from None
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for _, p in trainable)

    sampler = BucketBatchSampler(
        [len(ids) for ids, _ in windows], config.batch_size, config.seed, config.max_batch_tokens
    )
    loader = torch.utils.data.DataLoader(
        windows,
        batch_sampler=sampler,
        collate_fn=PadCollator(pad_id),
        generator=torch.Generator().manual_seed(config.seed),
    )
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    micro_counts = []  # batches per epoch (per process): a token cap makes it vary with the shuffle
    for epoch in range(config.epochs):
        sampler.epoch = epoch
        micro_counts.append(len(loader))
    total_steps = sum(math.ceil(n / config.grad_accum) for n in micro_counts)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup, total_steps))

    validator = None
    if main and valid_examples:
        validator = Validator(
            valid_examples,
            catalog,
            tokenize,
            eos_id,
            pad_id,
            template,
            config.beam,
            config.eval_batch_users,
            vocab_size,
        )

    state = {
        "step": 0,
        "epoch": 0,
        "micro": 0,
        "history": [],
        "best": None,
        "tokens": 0,
        "train_seconds": 0.0,
    }
    pending_rng = None
    if resume:
        state, pending_rng = _load_checkpoint(
            out / CHECKPOINT_DIR, accelerator.unwrap_model(model), optimizer, scheduler, accelerator
        )

    provenance = {
        "config": config.to_dict(),
        "base_model": spec.to_dict(),
        "base_model_sha256": models_hf.base_sha256(spec) if main else None,
        "catalog_sha256": catalog.sha256,
        "dataset": dataset,
        "prompt_template": template.to_dict(),
        "history_len": template.history_len,
        "versions": _versions(),
        "trainable_params": trainable_params,
        "train_users": len(users),
        "train_windows": len(windows),
        "train_tokens_per_epoch": sum(len(ids) for ids, _ in windows),
        "valid_users": len(valid_examples),
        "bf16": bool(use_bf16),
        "num_processes": accelerator.num_processes,
        "command_line": command_line,
    }
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_run_json(out, provenance, state, status="running")
        console.print(
            f"training {spec.name}: {'full fine-tuning' if config.full else f'LoRA r={config.lora_r}'}, "
            f"{trainable_params:,} trainable params; {len(windows):,} windows from {len(users):,} users, "
            f"{total_steps} optimizer steps; validating on {len(valid_examples)} users"
        )

    autocast = accelerator.autocast if use_bf16 else None
    unwrapped = accelerator.unwrap_model(model)
    loss_since_valid: list[float] = []
    stopped_early = False
    probe: dict = {}

    def validate_and_checkpoint(validate: bool) -> None:
        if validate and validator is not None:
            metrics = validator(unwrapped, autocast)
            row = {
                "step": state["step"],
                "epoch": state["epoch"],
                "loss": sum(loss_since_valid) / len(loss_since_valid) if loss_since_valid else None,
                **metrics,
            }
            loss_since_valid.clear()
            state["history"].append(row)
            with open(out / TRAIN_LOG, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            best = state["best"]
            if best is None or (row["hr@10"], row["ndcg@10"]) > (best["hr@10"], best["ndcg@10"]):
                state["best"] = row
                _save_model(unwrapped, out, config.full, tokenizer)
            console.print(
                f"step {row['step']}: loss {row['loss'] if row['loss'] is None else round(row['loss'], 4)}, "
                f"valid HR@10 {row['hr@10']:.4f}, NDCG@10 {row['ndcg@10']:.4f} ({row['seconds']:.1f} s)"
            )
        _save_checkpoint(out / CHECKPOINT_DIR, unwrapped, optimizer, scheduler, state, accelerator)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not main or quiet,
    )
    model.train()
    step_started = time.perf_counter()
    with progress:
        task = progress.add_task("train", total=total_steps, completed=state["step"], loss="-", tps="-")
        while state["step"] < total_steps and state["epoch"] < config.epochs:
            sampler.epoch = state["epoch"]
            micro_per_epoch = micro_counts[state["epoch"]]
            skip = state["micro"]
            micro = 0
            group_losses: list[float] = []
            group_tokens = 0
            for batch in loader:
                if micro < skip:  # resuming mid-epoch: these batches were trained on before the checkpoint
                    micro += 1
                    continue
                if (
                    pending_rng is not None
                ):  # after the loader drew its seeds, as it had before the checkpoint
                    torch.set_rng_state(pending_rng)
                    pending_rng = None
                group_start = micro - micro % config.grad_accum
                group_size = min(config.grad_accum, micro_per_epoch - group_start)
                last_of_group = micro + 1 == group_start + group_size
                sync = contextlib.nullcontext() if last_of_group else accelerator.no_sync(model)
                with sync:
                    loss = model(**batch).loss
                    accelerator.backward(loss / group_size)
                group_losses.append(loss.item())
                group_tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
                micro += 1
                if not last_of_group:
                    continue
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["micro"] = micro
                step_loss = sum(group_losses) / len(group_losses)
                group_losses = []
                loss_since_valid.append(step_loss)
                state.setdefault("first_loss", step_loss)
                state["last_loss"] = step_loss
                now = time.perf_counter()
                state["train_seconds"] += now - step_started
                state["tokens"] += group_tokens
                tps = state["tokens"] / max(state["train_seconds"], 1e-9)
                _probe_throughput(probe, state, group_tokens, now - step_started, total_steps, console, main)
                group_tokens = 0
                progress.update(task, completed=state["step"], loss=f"{step_loss:.4f}", tps=f"{tps:,.0f}")

                end_of_epoch = micro == micro_per_epoch
                at_end = state["step"] >= total_steps
                out_of_time = bool(time_limit_s) and time.monotonic() - started >= time_limit_s
                stopping = ((bool(stop_after) and state["step"] >= stop_after) or out_of_time) and not at_end
                if config.valid_every:
                    due_valid = at_end or state["step"] % config.valid_every == 0
                else:
                    due_valid = at_end or end_of_epoch
                due_valid = due_valid or out_of_time
                due_ckpt = (
                    due_valid
                    or stopping
                    or (config.checkpoint_every and state["step"] % config.checkpoint_every == 0)
                )
                if end_of_epoch:
                    state["epoch"] += 1
                    state["micro"] = 0
                if due_ckpt:
                    if main:
                        validate_and_checkpoint(bool(due_valid))
                    _save_rng(out / CHECKPOINT_DIR, accelerator)
                    accelerator.wait_for_everyone()
                if at_end or stopping:
                    stopped_early = stopping
                    break
                step_started = time.perf_counter()
            if stopped_early or state["step"] >= total_steps:
                break

    tokens_per_s = state["tokens"] / max(state["train_seconds"], 1e-9)
    if main:
        if validator is None and not stopped_early:  # nothing to select on: the final weights are the result
            _save_model(unwrapped, out, config.full, tokenizer)
        provenance["tokens_per_s"] = tokens_per_s
        _write_run_json(out, provenance, state, status="stopped" if stopped_early else "done")
        best = state["best"]
        if best:
            console.print(
                f"best step {best['step']}: valid HR@10 {best['hr@10']:.4f}, NDCG@10 {best['ndcg@10']:.4f}; "
                f"{tokens_per_s:,.0f} tokens/s; run in {out}"
            )
    accelerator.wait_for_everyone()
    return TrainResult(
        out,
        state["step"],
        trainable_params,
        tokens_per_s,
        state["best"],
        state["history"],
        stopped_early,
        main,
    )


def _probe_throughput(
    probe: dict, state: dict, tokens: int, seconds: float, total_steps: int, console, main: bool
) -> None:
    """Print tokens/s and an ETA once, after the first few steps, so a user knows before waiting."""
    if probe.get("printed"):
        return
    if probe.get("steps") is None:  # the first step of this process pays for warm-up: leave it out
        probe.update(steps=0, tokens=0, seconds=0.0)
        return
    probe["steps"] += 1
    probe["tokens"] += tokens
    probe["seconds"] += seconds
    if probe["steps"] >= THROUGHPUT_PROBE_STEPS - 1 or state["step"] >= total_steps:
        probe["printed"] = True
        per_step = probe["seconds"] / probe["steps"]
        remaining = (total_steps - state["step"]) * per_step
        if main:
            console.print(
                f"throughput: {probe['tokens'] / max(probe['seconds'], 1e-9):,.0f} tokens/s, {per_step:.2f} s/step; "
                f"ETA {_format_seconds(remaining)} for the remaining {total_steps - state['step']} steps (plus validation)"
            )


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _save_model(model, out: Path, full: bool, tokenizer) -> None:
    """The run's result: a peft adapter in bf16 (small), or for --full the whole model in fp32.

    Full fine-tuning keeps fp32: its updates are often below bf16's resolution of the weight itself.
    """
    import torch
    from safetensors.torch import load_file, save_file

    if full:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return
    model.save_pretrained(out, safe_serialization=True)
    path = out / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def _trainable_state(model) -> dict:
    return {
        name: p.detach().float().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad
    }


def _save_checkpoint(directory: Path, model, optimizer, scheduler, state: dict, accelerator) -> None:
    """fp32 trainable weights + optimizer + scheduler + loop state, written to a temp dir then renamed."""
    import shutil

    import torch
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable_state(model), tmp / "trainable.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state},
        tmp / "state.pt",
    )
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def _save_rng(directory: Path, accelerator) -> None:
    """Each process's torch RNG (LoRA dropout), written after the main process has replaced the directory."""
    import torch

    accelerator.wait_for_everyone()
    torch.save(torch.get_rng_state(), directory / f"rng_{accelerator.process_index}.pt")


def _load_checkpoint(directory: Path, model, optimizer, scheduler, accelerator):
    import torch
    from safetensors.torch import load_file

    saved = load_file(directory / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [name for name, p in params.items() if p.requires_grad and name not in saved]
    if missing or set(saved) - set(params):
        raise UsageError(
            f"the checkpoint in {directory} does not match this model/config (e.g. {(missing or sorted(set(saved) - set(params)))[0]})"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    blob = torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    rng_path = directory / f"rng_{accelerator.process_index}.pt"
    rng = torch.load(rng_path, weights_only=False) if rng_path.is_file() else None
    return blob["state"], rng


def _write_run_json(out: Path, provenance: dict, state: dict, status: str) -> None:
    data = dict(provenance)
    data.update(
        status=status,
        steps=state["step"],
        best=state["best"],
        history=state["history"],
        first_loss=state.get("first_loss"),
        last_loss=state.get("last_loss"),
    )
    tmp = out / (RUN_CONFIG + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / RUN_CONFIG)


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise NotFoundError(f"not a training run directory (no {RUN_CONFIG}): {run_dir}")
    return json.loads(path.read_text(encoding="utf-8"))


def train(
    db: str | Path,
    out: str | Path,
    *,
    config_file: str | Path | None = None,
    resume: bool = False,
    stop_after: int = 0,
    command_line: str | None = None,
    quiet: bool = False,
    **options,
) -> TrainResult:
    """Train on the histories in the database ``db``; ``options`` are :class:`TrainConfig` fields.

    On ``resume`` the run's saved config is the starting point and the given options override it.
    """
    from .history import HistoryDB

    if resume:
        saved = read_run_config(out)["config"]
        config = resolve_config(None, **{**saved, **{k: v for k, v in options.items() if v is not None}})
    else:
        config = resolve_config(config_file, **options)
    with HistoryDB.open(db, readonly=True) as history:
        catalog = history.catalog()
        dataset = history.dataset()
        sequences = list(history.sequences())
    if not sequences:
        raise UsageError(f"the database {db} holds no interactions")
    return train_on_sequences(
        sequences,
        catalog,
        out,
        config,
        dataset=dataset.name if dataset else None,
        resume=resume,
        stop_after=stop_after,
        command_line=command_line,
        quiet=quiet,
    )


if __name__ == "__main__":  # `accelerate launch -m genrec_edge.train ...` takes the CLI's train flags
    from .cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
