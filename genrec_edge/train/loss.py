"""The training loss on a batch of windows: plain next-token cross-entropy, or the trie-masked loss.

``plain``: the causal-LM loss transformers computes (labels shifted by one, softmax over the whole
vocabulary, mean over labelled tokens).

``trie``: what the constrained search ranks. At a labelled token ``y`` whose title prefix ends at trie
node ``n`` (``data.title_nodes``), the softmax runs only over the tokens the catalog trie allows there,
the children of ``n`` (the EOS after a complete title is one of them)::

    loss = mean over labelled positions of  logsumexp_{c in children(n)} z[c]  -  z[y]

MSL (arXiv 2504.04178) trains this way; it optimises exactly the distribution the constrained beam
search ranks titles by. A position whose node has a single child (a token no other catalog title
branches from, e.g. the rest of a title once its prefix is unique) contributes exactly 0 loss and 0
gradient: the zero-information tokens IGD (arXiv 2506.13229) down-weights are dropped by construction,
so the mean is over all labelled positions but only branching positions train.

Batched on the logits' device: the children of every labelled position are gathered flat from the
trie's CSR arrays (ragged, not padded to the widest node: the root has thousands of children, most nodes
one or two), and each position's logsumexp is a segment reduction (max via ``scatter_reduce``, sum of
exponentials via ``index_add``).
"""

from __future__ import annotations

from ..prompts import IGNORE_INDEX
from .trie_view import TrieTensors

MODEL_INPUTS = ("input_ids", "attention_mask")


def batch_loss(model, batch: dict, kind: str = "plain", trie: TrieTensors | None = None):
    """The mean loss of ``batch`` (a ``data.PadCollator`` batch) under ``model``; ``kind`` is ``TrainConfig.loss``."""
    inputs = {name: batch[name] for name in MODEL_INPUTS}
    if kind == "plain":
        return model(**inputs, labels=batch["labels"]).loss
    if kind == "trie":
        if trie is None or "trie_nodes" not in batch:
            raise ValueError("the trie loss needs the trie and the batch's trie_nodes")
        logits = model(**inputs).logits
        return trie_masked_loss(logits, batch["labels"], batch["trie_nodes"], trie)
    raise ValueError(f"unknown loss {kind!r}")


def trie_masked_loss(logits, labels, nodes, trie: TrieTensors):
    """Mean over labelled positions of the cross-entropy restricted to the trie's children (module docstring).

    ``logits`` ``(batch, length, vocab)``; ``labels`` and ``nodes`` ``(batch, length)``, aligned with the
    inputs (the logits at position t predict the label at t + 1, as in the plain loss).
    """
    import torch

    labels, nodes = labels[:, 1:], nodes[:, 1:]
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    if len(rows) == 0:
        return logits.sum() * 0.0
    node = nodes[rows, cols]
    if bool((node < 0).any()) or bool((trie.child_count[node] == 0).any()):
        raise ValueError("a labelled token has no trie node with children (windows built without the trie?)")
    target = logits[rows, cols, labels[rows, cols]].float()
    position, tokens, _ = trie.expand(node)  # every allowed (position, token), flat
    allowed = logits[rows[position], cols[position], tokens].float()
    count = len(rows)
    top = torch.full((count,), float("-inf"), device=logits.device)
    top = top.scatter_reduce(0, position, allowed.detach(), reduce="amax")  # for stability only: no gradient
    total = torch.zeros(count, device=logits.device).index_add(
        0, position, torch.exp(allowed - top[position])
    )
    return (top + torch.log(total) - target).mean()
