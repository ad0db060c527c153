"""Ranking metrics for one relevant title per user (the protocol is in ``evaluation.py``).

Every function here is pure and works on a 1-based ``rank`` of the target title in a produced ranking,
or ``None`` when the ranking does not contain it (a miss). Means over users are plain averages.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

# The metrics ``genrec-edge evaluate`` reports (NDCG@1 equals HR@1 and is left out).
REPORTED = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR")


def target_rank(ranking: Sequence[Hashable], target: Hashable) -> int | None:
    """The 1-based position of ``target`` in ``ranking``, or ``None`` if it is absent."""
    for position, candidate in enumerate(ranking, start=1):
        if candidate == target:
            return position
    return None


def hit_rate(rank: int | None, k: int) -> float:
    """HR@k = 1 if rank <= k else 0 (a miss, ``rank is None``, scores 0)."""
    return 1.0 if rank is not None and rank <= k else 0.0


def ndcg(rank: int | None, k: int) -> float:
    """NDCG@k with one relevant title and binary relevance.

    DCG@k = 1 / log2(rank + 1) if rank <= k else 0; the ideal DCG puts the one relevant title at rank 1,
    IDCG = 1 / log2(2) = 1, so NDCG@k = DCG@k. Rank 1 scores 1, rank 2 scores 1/log2(3) = 0.6309...
    """
    if rank is None or rank > k:
        return 0.0
    return 1.0 / math.log2(rank + 1)


def reciprocal_rank(rank: int | None) -> float:
    """RR = 1 / rank, 0 for a miss. Over a ranking truncated to k items this is RR@k."""
    return 0.0 if rank is None else 1.0 / rank


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for no values (an empty evaluation reports zeros, not NaN)."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def evaluate_ranks(ranks: Sequence[int | None], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Mean HR@k and NDCG@k for each k, and MRR, over per-user target ranks.

    Returns ``{"hr": {k: mean HR@k}, "ndcg": {k: mean NDCG@k}, "mrr": mean RR, "n_users": len(ranks)}``.
    """
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
    return {
        "hr": {k: mean(hit_rate(r, k) for r in ranks) for k in ks},
        "ndcg": {k: mean(ndcg(r, k) for r in ranks) for k in ks},
        "mrr": mean(reciprocal_rank(r) for r in ranks),
        "n_users": len(ranks),
    }


def per_user_metrics(ranks: Sequence[int | None], names: Sequence[str] = REPORTED) -> dict[str, np.ndarray]:
    """Each user's value of every named metric (``HR@k``, ``NDCG@k``, ``MRR``), as float arrays.

    The same formulas as ``hit_rate``, ``ndcg`` and ``reciprocal_rank``, vectorised: the per-user
    values whose means ``evaluate_ranks`` reports, and what a bootstrap resamples (``stats``).
    """
    rank = np.array([0 if r is None else r for r in ranks], dtype=np.float64)
    hit = rank > 0
    out: dict[str, np.ndarray] = {}
    for name in names:
        kind, _, k_text = name.partition("@")
        if kind == "MRR" and not k_text:
            out[name] = np.where(hit, 1.0 / np.where(hit, rank, 1.0), 0.0)
            continue
        if kind not in ("HR", "NDCG", "MRR") or not k_text.isdigit() or int(k_text) < 1:
            raise ValueError(f"unknown metric {name!r}; use HR@k, NDCG@k, MRR or MRR@k")
        within = hit & (rank <= int(k_text))
        if kind == "HR":
            out[name] = within.astype(np.float64)
        elif kind == "NDCG":
            out[name] = np.where(within, 1.0 / np.log2(np.where(within, rank, 1.0) + 1.0), 0.0)
        else:
            out[name] = np.where(within, 1.0 / np.where(within, rank, 1.0), 0.0)
    return out


def overlap_at_k(a: Sequence[Hashable], b: Sequence[Hashable], k: int) -> float:
    """|top_k(a) ∩ top_k(b)| / k: the share of k slots the two rankings agree on, order ignored."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(set(a[:k]) & set(b[:k])) / k


def rank_correlation(a: Sequence[Hashable], b: Sequence[Hashable], k: int) -> float:
    """Spearman's rho between two top-k lists, over the union of their top k items.

    Each item of the union gets its 1-based rank in each list; an item absent from a list's top k gets
    rank k + 1 there (all absent items tie last). rho is the Pearson correlation of the two rank vectors,
    so ties are handled exactly. Identical lists give 1.0, a reversed list of the same items -1.0. When a
    rank vector is constant (a union of one item, or an empty list) rho is undefined: we return 1.0 if
    the two top-k lists are equal and 0.0 otherwise.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top_a, top_b = list(a[:k]), list(b[:k])
    rank_a = {item: i for i, item in enumerate(top_a, start=1)}
    rank_b = {item: i for i, item in enumerate(top_b, start=1)}
    union = list(dict.fromkeys(top_a + top_b))
    xs = [rank_a.get(item, k + 1) for item in union]
    ys = [rank_b.get(item, k + 1) for item in union]
    n = len(union)
    if n == 0:
        return 1.0
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    var_x = sum((x - mean_x) ** 2 for x in xs)
    var_y = sum((y - mean_y) ** 2 for y in ys)
    if var_x == 0 or var_y == 0:
        return 1.0 if top_a == top_b else 0.0
    return cov / math.sqrt(var_x * var_y)


def evaluate_rankings(
    rankings: Sequence[Sequence[Hashable]], targets: Sequence[Hashable], ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """``evaluate_ranks`` over the ranks of ``targets[u]`` in ``rankings[u]`` (one pair per user)."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings but {len(targets)} targets")
    return evaluate_ranks([target_rank(r, t) for r, t in zip(rankings, targets, strict=True)], ks)
