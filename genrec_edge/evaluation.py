"""The evaluation protocol every recommender in genrec-edge is scored with.

- **Split: chronological leave-one-out** (``genrec_edge.prompts.leave_one_out``). Each user's items are
  ordered by timestamp, then item id. The last item is the test target, the second-to-last the validation
  target, every earlier item is training data. A test example's history is everything before its target
  (so it includes the validation item); a validation example's history is everything before *its* target.
- **Full-catalog ranking, no negative sampling.** A recommender ranks the whole catalog (or returns its top
  k of it); nothing is scored against a sample of 100 negatives.
- **Seen items excluded.** Every title in the example's history (all items before the target) is removed
  from the produced ranking before it is scored, so a recommender is never rewarded or punished for
  repeating the past. If the target's own title is in the history (a re-consumption, or a duplicate
  title) the example is necessarily a miss; ``EvalResult.n_target_seen`` counts such examples.
- **Duplicate titles merged.** The unit of ranking is the title: item ids are mapped to titles through the
  ``Catalog``, a ranking that contains two items with the same title keeps that title once (at its first
  position), and a hit is a title match. A catalog with two items of the same title is thus ranked by
  title; the LLM, which generates titles, cannot tell them apart either.
- **Metrics, one relevant title per user, binary relevance** (formulas in ``genrec_edge.metrics``):
  HR@k (k = 1, 5, 10), NDCG@k = 1/log2(rank + 1) if rank <= k (k = 5, 10; NDCG@1 = HR@1), and MRR, the
  reciprocal rank of the target title within the produced ranking, 0 if absent. A full-catalog ranker gives
  the full MRR; for a top-k recommender (the LLM's beam search returns k titles, ``k_max`` truncates any
  ranking to k) the same number is MRR@k. Every metric is a mean over users (one example per user).

Comparing two recommenders user by user: ``topk_overlap`` (share of top-k titles in common) and
``topk_rank_correlation`` (Spearman's rho over the union of the two top-k lists; see
``genrec_edge.metrics.rank_correlation`` for the exact definition).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .catalog import Catalog
from .errors import NotFoundError, UsageError
from .metrics import evaluate_ranks, mean, overlap_at_k, rank_correlation, target_rank
from .prompts import Example

RankFn = Callable[[Example], Sequence[int]]


@dataclass(frozen=True)
class EvalResult:
    """Mean metrics plus what each user got, so two results can be compared user by user.

    ``users``, ``targets`` (target titles), ``ranks`` (1-based rank of the target title, ``None`` for a
    miss) and ``rankings`` (the scored title ranking, truncated to ``max(ks)`` titles, or to ``k_max``
    when given) are aligned: index i is one user.
    """

    hr: dict[int, float]
    ndcg: dict[int, float]
    mrr: float
    n_users: int
    ks: tuple[int, ...]
    k_max: int | None
    users: tuple[int, ...] = field(repr=False)
    targets: tuple[str, ...] = field(repr=False)
    ranks: tuple[int | None, ...] = field(repr=False)
    rankings: tuple[tuple[str, ...], ...] = field(repr=False)
    n_target_seen: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        """The mean metrics only, with readable keys (``HR@10``, ``NDCG@10``, ``MRR`` or ``MRR@k``)."""
        out = {f"HR@{k}": v for k, v in self.hr.items()}
        out.update({f"NDCG@{k}": v for k, v in self.ndcg.items()})
        out["MRR" if self.k_max is None else f"MRR@{self.k_max}"] = self.mrr
        return out

    def to_dict(self, per_user: bool = True) -> dict:
        """JSON-ready: metrics (string keys), counts, and per-user ranks and rankings if ``per_user``."""
        data = {
            "hr": {str(k): v for k, v in self.hr.items()},
            "ndcg": {str(k): v for k, v in self.ndcg.items()},
            "mrr": self.mrr,
            "n_users": self.n_users,
            "ks": list(self.ks),
            "k_max": self.k_max,
            "n_target_seen": self.n_target_seen,
            "seconds": self.seconds,
        }
        if per_user:
            data["per_user"] = [
                {"user": u, "target": t, "rank": r, "ranking": list(ranking)}
                for u, t, r, ranking in zip(self.users, self.targets, self.ranks, self.rankings, strict=True)
            ]
        return data


def seen_titles(example: Example, catalog: Catalog) -> set[str]:
    """The titles of every item in the example's history (all items before its target)."""
    return {_title(catalog, item) for item in example.history}


def title_ranking(ranked_items: Sequence[int], catalog: Catalog, exclude: set[str]) -> list[str]:
    """Item ids -> titles, each title once at its first position, titles in ``exclude`` dropped."""
    kept: dict[str, None] = {}
    for item in ranked_items:
        title = _title(catalog, item)
        if title not in exclude:
            kept.setdefault(title, None)
    return list(kept)


def evaluate(
    rank_fn: RankFn,
    examples: Sequence[Example],
    catalog: Catalog,
    ks: Sequence[int] = (1, 5, 10),
    k_max: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score ``rank_fn`` (example -> item ids, best first) on ``examples`` under the protocol above.

    ``k_max`` truncates each (deduplicated, seen-filtered) title ranking to its first ``k_max`` titles;
    ``None`` scores the whole ranking ``rank_fn`` returns. Examples must be one per user.
    """
    ks = tuple(sorted(set(ks)))
    if not ks or ks[0] < 1:
        raise UsageError(f"ks must be positive integers, got {ks}")
    if k_max is not None and k_max < 1:
        raise UsageError(f"k_max must be >= 1, got {k_max}")
    users = [ex.user for ex in examples]
    if len(set(users)) != len(users):
        raise UsageError("evaluate() takes one example per user; got a user twice")
    keep = k_max if k_max is not None else ks[-1]

    from tqdm.auto import tqdm

    start = time.perf_counter()
    targets: list[str] = []
    ranks: list[int | None] = []
    rankings: list[tuple[str, ...]] = []
    n_target_seen = 0
    for example in tqdm(examples, desc="evaluate", unit="user", disable=not progress, leave=False):
        seen = seen_titles(example, catalog)
        target = _title(catalog, example.item)
        n_target_seen += target in seen
        ranking = title_ranking(rank_fn(example), catalog, seen)
        if k_max is not None:
            ranking = ranking[:k_max]
        targets.append(target)
        ranks.append(target_rank(ranking, target))
        rankings.append(tuple(ranking[:keep]))
    means = evaluate_ranks(ranks, ks)
    return EvalResult(
        hr=means["hr"],
        ndcg=means["ndcg"],
        mrr=means["mrr"],
        n_users=len(ranks),
        ks=ks,
        k_max=k_max,
        users=tuple(users),
        targets=tuple(targets),
        ranks=tuple(ranks),
        rankings=tuple(rankings),
        n_target_seen=n_target_seen,
        seconds=time.perf_counter() - start,
    )


def _paired_rankings(a: EvalResult, b: EvalResult) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    by_user_b = dict(zip(b.users, b.rankings, strict=True))
    pairs = [(ra, by_user_b[u]) for u, ra in zip(a.users, a.rankings, strict=True) if u in by_user_b]
    if not pairs:
        raise UsageError("the two evaluation results have no user in common")
    return pairs


def per_user_topk_overlap(a: EvalResult, b: EvalResult, k: int) -> dict[int, float]:
    """For each user in both results, ``metrics.overlap_at_k`` of their two title rankings."""
    _check_stored(a, b, k)
    by_user_b = dict(zip(b.users, b.rankings, strict=True))
    return {
        u: overlap_at_k(ra, by_user_b[u], k)
        for u, ra in zip(a.users, a.rankings, strict=True)
        if u in by_user_b
    }


def topk_overlap(a: EvalResult, b: EvalResult, k: int) -> float:
    """Mean over common users of |top_k(a) ∩ top_k(b)| / k (title rankings as scored)."""
    _check_stored(a, b, k)
    return mean(overlap_at_k(ra, rb, k) for ra, rb in _paired_rankings(a, b))


def topk_rank_correlation(a: EvalResult, b: EvalResult, k: int) -> float:
    """Mean over common users of Spearman's rho between the two top-k title lists (``rank_correlation``)."""
    _check_stored(a, b, k)
    return mean(rank_correlation(ra, rb, k) for ra, rb in _paired_rankings(a, b))


def from_rankings(examples: Sequence[Example], rankings: Sequence[Sequence[int]]) -> RankFn:
    """A rank_fn that returns rankings computed beforehand (e.g. in batches), looked up by user."""
    by_user = {ex.user: list(r) for ex, r in zip(examples, rankings, strict=True)}
    return lambda example: by_user[example.user]


def _check_stored(a: EvalResult, b: EvalResult, k: int) -> None:
    # Rankings are stored truncated; comparing beyond what was stored would silently understate overlap.
    for result in (a, b):
        stored = result.k_max if result.k_max is not None else max(result.ks)
        if k > stored:
            raise UsageError(f"k={k} exceeds the {stored} titles stored per user; evaluate with larger ks")


def _title(catalog: Catalog, item: int) -> str:
    try:
        return catalog.title_of(item)
    except KeyError:
        raise NotFoundError(f"item id {item} is not in the catalog") from None
