"""Validation: HR@10 / NDCG@10 by the runtime's exact catalog-trie beam search, batched on the model's device.

:func:`rank_titles` ranks catalog titles for many prompts at once with the algorithm of the runtime's
``engine.constrained_beam_search``, on the same trie (``genrec_edge.trie.CatalogTrie``, through
:class:`~genrec_edge.train.trie_view.TrieTensors`): at every step each live beam is expanded to its trie
children that still lead to an unseen title; expansions that end a title (EOS) join the user's top-``k``
finished list; of the others, those that can still beat the k-th finished title (log-probs only
decrease) compete for the ``beam`` live slots. Scores are plain sums of token log-probs. With a beam at
least as wide as the catalog nothing is pruned and the ranking is exact (a test checks it against scoring
every title, and against ``Recommender.rank_titles`` on the GGUF of the same model).

It is our own rather than ``model.generate(..., prefix_allowed_tokens_fn=...)``: that callback runs in
Python once per beam per step, while here a step is a few tensor ops for the whole batch of users, the
prompt's KV cache is computed once (left-padded batch prefill) and reordered as beams branch, and seen
titles are excluded by never entering a subtree without an unseen title.

As in the runtime, a user for whom a narrow beam finishes fewer than ``k`` titles is searched again
without the titles found, so the ranking has ``k`` titles whenever ``k`` unseen titles exist.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence

from ..catalog import Catalog
from ..prompts import Example, PromptTemplate, build_prompt_ids
from ..trie import CatalogTrie
from .trie_view import TrieTensors, build_catalog_trie

TOP_K = 10


def _cache_kwarg(model) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns); earlier 5.x only know the old."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def search_titles(
    model,
    prompts: Sequence[Sequence[int]],
    seen: Sequence[Iterable[str]],
    trie: CatalogTrie | TrieTensors,
    beam: int = 10,
    k: int = TOP_K,
    pad_id: int = 0,
    batch_users: int = 32,
    autocast=None,
) -> list[list[tuple[str, float]]]:
    """Top-``k`` ``(title, score)`` per prompt, best first, the titles in ``seen[i]`` excluded.

    Users go ``batch_users`` at a time, sorted by prompt length so a batch pads little.
    """
    import torch

    device = next(model.parameters()).device
    view = trie if isinstance(trie, TrieTensors) and trie.device == device else None
    if view is None:
        view = TrieTensors(trie.trie if isinstance(trie, TrieTensors) else trie, device)
    titles = view.trie.titles
    index = {t: i for i, t in enumerate(titles)}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[tuple[str, float]]] = [[] for _ in prompts]
    with torch.no_grad(), autocast() if autocast else contextlib.nullcontext():
        for start in range(0, len(order), batch_users):
            chunk = order[start : start + batch_users]
            chunk_prompts = [prompts[i] for i in chunk]
            excluded = [[index[t] for t in seen[i] if t in index] for i in chunk]
            found = _search_chunk(
                model, chunk_prompts, view.unseen_mask(excluded), view, beam, k, pad_id, device
            )
            _search_again(model, chunk_prompts, excluded, found, view, beam, k, pad_id, device)
            for i, pairs in zip(chunk, found, strict=True):
                results[i] = [(titles[t], s) for t, s in pairs]
    return results


def _search_again(model, prompts, excluded, found, view: TrieTensors, beam, k, pad_id, device) -> None:
    """As the runtime does: a narrow beam can lose every path to the k-th title, so a user with fewer than
    ``k`` titles (and unseen titles left) is searched again without the titles found, until ``k`` or none
    come back. ``found`` is extended in place, best first. Rare with ``beam >= k``."""
    pending = [j for j, pairs in enumerate(found) if len(pairs) < k]
    while pending:
        masks = view.unseen_mask([excluded[j] + [t for t, _ in found[j]] for j in pending])
        groups: dict[int, list[int]] = {}  # titles still needed -> rows of `masks`
        for row, j in enumerate(pending):
            if bool(masks[row, 0]):  # the root still has an unseen title below it
                groups.setdefault(k - len(found[j]), []).append(row)
        still_short = []
        for need, rows in groups.items():
            users = [pending[row] for row in rows]
            more = _search_chunk(
                model, [prompts[j] for j in users], masks[rows], view, beam, need, pad_id, device
            )
            for j, extra in zip(users, more, strict=True):
                if extra:
                    found[j] = sorted(found[j] + extra, key=lambda pair: -pair[1])
                    if len(found[j]) < k:
                        still_short.append(j)
        pending = still_short


def rank_titles(model, prompts, seen, trie, beam=10, k=TOP_K, pad_id=0, batch_users=32, autocast=None):
    """:func:`search_titles` without the scores: top-``k`` titles per prompt, best first."""
    found = search_titles(model, prompts, seen, trie, beam, k, pad_id, batch_users, autocast)
    return [[title for title, _ in pairs] for pairs in found]


def _prefill(model, prompts, pad_id, device):
    """Left-padded prompts in one forward: (last-position log-probs, KV cache, attention mask, next positions)."""
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
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_kwarg(model): cache},
    )
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1), cache, attention, attention.sum(-1)


def _search_chunk(model, prompts, allowed, view: TrieTensors, beam, k, pad_id, device):
    """One batch of users; ``allowed`` is ``view.unseen_mask`` of their seen titles. ``[(title index, score)]`` each."""
    import torch

    logp, cache, attention, next_pos = _prefill(model, prompts, pad_id, device)
    cache_kw = _cache_kwarg(model)
    n_users, vocab = logp.shape
    users = torch.arange(n_users, device=device)
    nodes = torch.zeros(n_users, dtype=torch.long, device=device)  # one root beam per user at first
    scores = torch.zeros(n_users, device=device)
    rows_per_user = 1
    fin_scores = torch.full((n_users, k), float("-inf"), device=device)
    fin_titles = torch.full((n_users, k), -1, dtype=torch.long, device=device)
    for _depth in range(view.max_depth):
        rows, tokens, kids = view.expand(nodes)
        user_of = torch.div(rows, rows_per_user, rounding_mode="floor")
        cand = scores[rows] + logp[rows, tokens]
        ok = allowed[user_of, kids] & torch.isfinite(cand)
        is_eos = tokens == view.eos_id

        # Titles ended by EOS (at most one per row) join the user's k best finished.
        ended = ok & is_eos
        step_scores = torch.full((n_users, rows_per_user), float("-inf"), device=device)
        step_titles = torch.full((n_users, rows_per_user), -1, dtype=torch.long, device=device)
        step_scores[user_of[ended], rows[ended] % rows_per_user] = cand[ended]
        step_titles[user_of[ended], rows[ended] % rows_per_user] = view.leaf_title[kids[ended]]
        fin_scores, pick = torch.cat([fin_scores, step_scores], 1).topk(k, dim=1)
        fin_titles = torch.cat([fin_titles, step_titles], 1).gather(1, pick)

        # The others continue if they can still beat the k-th finished; the best `beam` per user.
        live = ok & ~is_eos & (cand > fin_scores[user_of, k - 1])
        dense = torch.full((n_users * rows_per_user, vocab), float("-inf"), device=device)
        dense[rows[live], tokens[live]] = cand[live]
        top_scores, top_index = dense.view(n_users, rows_per_user * vocab).topk(
            min(beam, rows_per_user * vocab), dim=-1
        )
        valid = torch.isfinite(top_scores)
        if not bool(valid.any()):
            break
        src = users[:, None] * rows_per_user + torch.div(top_index, vocab, rounding_mode="floor")
        token = top_index % vocab
        child = view.child(nodes[src], token)
        # Empty slots: score -inf on a childless node, fed the pad token from the user's first row.
        src = torch.where(valid, src, users[:, None] * rows_per_user).reshape(-1)
        nodes = torch.where(valid, child, view.childless_node).reshape(-1)
        scores = top_scores.reshape(-1)
        token = torch.where(valid, token, pad_id).reshape(-1)
        rows_per_user = top_scores.shape[1]

        cache.reorder_cache(src)
        attention = torch.cat([attention[src], attention.new_ones((len(src), 1))], dim=-1)
        next_pos = next_pos[src]
        out = model(
            input_ids=token[:, None],
            attention_mask=attention,
            position_ids=next_pos[:, None],
            use_cache=True,
            **{cache_kw: cache},
        )
        next_pos = next_pos + 1
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    found = []
    for user_scores, user_titles in zip(fin_scores.tolist(), fin_titles.tolist(), strict=True):
        found.append([(t, s) for s, t in zip(user_scores, user_titles, strict=True) if t >= 0])
    return found


def ranking_metrics(
    rankings: Sequence[Sequence[str]], targets: Sequence[str], k: int = TOP_K
) -> tuple[float, float]:
    """Mean HR@k and NDCG@k of each target title's rank in its ranking (``genrec_edge.metrics``)."""
    from .. import metrics

    ranks = [
        metrics.target_rank(list(ranked)[:k], target)
        for ranked, target in zip(rankings, targets, strict=True)
    ]
    return metrics.mean(metrics.hit_rate(r, k) for r in ranks), metrics.mean(
        metrics.ndcg(r, k) for r in ranks
    )


class Validator:
    """HR@10 / NDCG@10 on fixed validation examples (``prompts.Example``), prompts built once.

    A user's seen titles are the example's whole history, as in the evaluation protocol.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        catalog: Catalog,
        tokenize,
        eos_id: int,
        pad_id: int,
        template: PromptTemplate,
        beam: int = 10,
        batch_users: int = 32,
        trie: CatalogTrie | None = None,
    ):
        self.trie = trie if trie is not None else build_catalog_trie(catalog.unique_titles, tokenize, eos_id)
        self.examples = list(examples)
        histories = [[catalog.title_of(i) for i in ex.history] for ex in self.examples]
        self.prompts = [build_prompt_ids(tokenize, eos_id, h, template) for h in histories]
        self.targets = [catalog.title_of(ex.item) for ex in self.examples]
        self.seen = [set(h) for h in histories]
        self.pad_id, self.beam, self.batch_users = pad_id, beam, batch_users
        self._view: TrieTensors | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def rankings(self, model, autocast=None) -> list[list[str]]:
        device = next(model.parameters()).device
        if self._view is None or self._view.device != device:
            self._view = TrieTensors(self.trie, device)
        return rank_titles(
            model,
            self.prompts,
            self.seen,
            self._view,
            self.beam,
            TOP_K,
            self.pad_id,
            self.batch_users,
            autocast,
        )

    def __call__(self, model, autocast=None) -> dict:
        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            rankings = self.rankings(model, autocast)
        finally:
            if was_training:
                model.train()
        hr, ndcg = ranking_metrics(rankings, self.targets)
        return {"hr@10": hr, "ndcg@10": ndcg, "users": len(self), "seconds": time.perf_counter() - started}
