"""Training data: the leave-one-out split as titles, SASRec-style windows, length-bucketed batches.

Each user's training part of the chronological sequence is the validation example's history
(``prompts.leave_one_out``: all but the last two items; the validation and test targets are held out).
It is cut into windows of ``history_len + 1`` titles (``prompts.training_windows``); one forward pass per
window puts the loss on every title (+ EOS) in it, and the window's last title sees exactly the inference
prompt (``prompts.build_prompt_ids`` of the titles before it).

A :class:`Window` also carries, for the trie-masked loss, the catalog-trie node *before* each labelled
token (the title's prefix so far): the loss's softmax runs over that node's children.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from ..catalog import Catalog
from ..errors import UsageError
from ..prompts import (
    IGNORE_INDEX,
    Example,
    PromptTemplate,
    build_training_window,
    leave_one_out,
    training_windows,
)
from ..trie import CatalogTrie

NO_NODE = -1  # a position without a label has no trie node


class Window(NamedTuple):
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss
    nodes: list[int] | None  # trie node before each labelled token, NO_NODE elsewhere; None without a trie


def split_for_training(
    sequences: Iterable[tuple[int, Sequence[int]]], catalog: Catalog
) -> tuple[dict[int, list[str]], list[Example]]:
    """Per user: the training titles, and the validation examples (``prompts.leave_one_out``'s valid split).

    A user's training titles are their validation example's history, so neither held-out item is ever a
    training target; users with fewer than 3 items have no validation example and no training part.
    """
    valid = list(leave_one_out(sequences, train=False).valid)
    train = {ex.user: [catalog.title_of(i) for i in ex.history] for ex in valid}
    return train, valid


def trie_edges(trie: CatalogTrie) -> dict[tuple[int, int], int]:
    """``{(node, token): child}`` for every edge of the trie: one dict lookup per labelled token."""
    parents = trie.parent[trie.child_node].tolist()
    return dict(
        zip(zip(parents, trie.child_token.tolist(), strict=True), trie.child_node.tolist(), strict=True)
    )


def title_nodes(edges: dict[tuple[int, int], int], eos_id: int, labels: Sequence[int]) -> list[int]:
    """The trie node before each labelled token of a window (``NO_NODE`` where the label is ignored).

    Labelled tokens are whole titles, each ``tokenize(title) + [EOS]``: the walk starts at the root and
    returns to it after every EOS. ``edges`` is :func:`trie_edges`. A labelled token the trie does not
    have means the trie and the windows were tokenized differently: refused.
    """
    nodes = []
    node = 0
    for token in labels:
        if token == IGNORE_INDEX:
            nodes.append(NO_NODE)
            continue
        nodes.append(node)
        child = edges.get((node, token))
        if child is None:
            raise UsageError(f"token {token} of a training title is not in the catalog trie")
        node = 0 if token == eos_id else child
    return nodes


def build_windows(
    train_titles: Iterable[Sequence[str]],
    tokenize,
    eos_id: int,
    template: PromptTemplate,
    trie: CatalogTrie | None = None,
) -> list[Window]:
    """Every user's windows; with a ``trie``, each window also gets its :func:`title_nodes`."""
    edges = trie_edges(trie) if trie is not None else None
    windows = []
    for titles in train_titles:
        for window, loss_from in training_windows(titles, template.history_len):
            ids, labels = build_training_window(tokenize, eos_id, window, template, loss_from)
            windows.append(
                Window(ids, labels, title_nodes(edges, eos_id, labels) if edges is not None else None)
            )
    return windows


def sample_users(users: Sequence[int], count: int, seed: int) -> list[int]:
    """A seeded sample of ``count`` users (all if ``count`` is 0 or at least their number), sorted."""
    users = sorted(users)
    if count and count < len(users):
        return sorted(random.Random(seed).sample(users, count))
    return users


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
    """Right padding: pad id in the inputs, ``IGNORE_INDEX`` in the labels, 0 in the attention mask.

    Windows with trie nodes also give ``trie_nodes`` (``NO_NODE`` in the padding), which the model's
    forward must not see: the loop pops it before calling the model.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, windows: Sequence[Window]) -> dict:
        import torch

        width = max(len(w.input_ids) for w in windows)
        input_ids = torch.full((len(windows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
        with_nodes = windows[0].nodes is not None
        nodes = torch.full((len(windows), width), NO_NODE, dtype=torch.long) if with_nodes else None
        for row, window in enumerate(windows):
            n = len(window.input_ids)
            input_ids[row, :n] = torch.tensor(window.input_ids)
            labels[row, : len(window.labels)] = torch.tensor(window.labels)
            attention_mask[row, :n] = 1
            if nodes is not None:
                nodes[row, : len(window.nodes)] = torch.tensor(window.nodes)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if nodes is not None:
            batch["trie_nodes"] = nodes
        return batch
