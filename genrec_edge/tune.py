"""Choosing the collaborative prior's weight λ on the validation split, in minutes on a laptop.

Running the fused search once per candidate λ would cost a full search per user per λ. Instead, per
validation user:

1. the language model's own top ``n_lm`` titles (the search with no prior) and the prior's top ``n_cf``
   unseen titles form a candidate set C;
2. every title in C gets its exact ``log P_LM`` (``Recommender.score_titles``: one search restricted to C);
3. for every λ of the grid, C is ranked by ``log P_LM + λ · log P_CF`` and the target's rank is scored.

The fused search ranks the whole catalog, not C, so this is an approximation of it (a title outside C
could enter a fused top-10 only with both a low LM score and a low prior - rare when C holds both
lists' heads); check the chosen λ with the real fused search (``genrec-edge evaluate --split valid``). The same pass
also measures the retrieve-then-rank alternative exactly: the prior's top ``n_cf`` re-ranked by the
fused score (nothing outside them can be recommended).

Only validation targets are used; the test split is never read here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .metrics import ndcg
from .prompts import Example

DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


@dataclass(frozen=True)
class TuneResult:
    weights: tuple[float, ...]
    n_users: int
    hr10: dict[float, float]  # fused over the candidates, per λ
    ndcg10: dict[float, float]
    rerank_hr10: dict[float, float]  # the prior's top n_cf re-ranked (retrieve-then-rank), per λ
    rerank_ndcg10: dict[float, float]
    best_weight: float
    candidates_hold_target: float  # share of users whose target is in C (an upper bound on HR)
    seconds: float
    n_lm: int = 20
    n_cf: int = 50
    per_user: list = field(default_factory=list, repr=False)
    decisive: bool = True  # False: every λ scored the same, so best_weight (the smallest) is no choice at all

    def table(self) -> list[dict]:
        return [{"weight": w, "HR@10": self.hr10[w], "NDCG@10": self.ndcg10[w],
                 "rerank HR@10": self.rerank_hr10[w], "rerank NDCG@10": self.rerank_ndcg10[w]}
                for w in self.weights]


def _rank_of(target: str, ranked: Sequence[str]) -> int | None:
    try:
        return ranked.index(target) + 1
    except ValueError:
        return None


def tune_weight(rec, prior, examples: Sequence[Example], catalog, weights: Sequence[float] = DEFAULT_WEIGHTS,
                n_lm: int = 20, n_cf: int = 50, progress: bool = True, rerank: bool = False) -> TuneResult:
    """Grid-search λ for ``prior`` with ``rec`` (a Recommender) on validation ``examples`` (see the module).

    ``rerank``: choose λ for the ``rerank`` variant (the prior's top ``n_cf`` re-ranked; exact), else for
    a search over the whole catalog (the candidates' fused ranking approximates it).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    weights = tuple(sorted(set(float(w) for w in weights)))
    titles = prior.titles
    index = {t: j for j, t in enumerate(titles)}
    hits = {w: [] for w in weights}
    gains = {w: [] for w in weights}
    rerank_hits = {w: [] for w in weights}
    rerank_gains = {w: [] for w in weights}
    in_candidates = []
    per_user = []
    for ex in tqdm(examples, desc="tune λ", unit="user", disable=not progress):
        history = [catalog.title_of(i) for i in ex.history]
        seen = set(history)
        target = catalog.title_of(ex.item)
        mask = np.zeros(len(titles), dtype=bool)
        mask[[index[t] for t in seen]] = True
        logp = prior.log_probs(list(ex.history), mask)
        lm_top = rec.rank_titles(history, seen, k=n_lm, history_items=list(ex.history), prior="none")
        lm = dict(zip(lm_top.titles, lm_top.lm_scores, strict=True))
        cf_top = [titles[j] for j in np.argsort(-logp, kind="stable")[:n_cf] if np.isfinite(logp[j])]
        missing = [t for t in cf_top if t not in lm]
        if missing:
            lm.update(rec.score_titles(history, missing))
        candidates = list(lm)
        in_candidates.append(target in lm)
        cf_set = set(cf_top)
        ranks = {}
        for w in weights:
            fused = sorted(candidates, key=lambda t: (-(lm[t] + w * logp[index[t]]), index[t]))
            r = _rank_of(target, fused[:10])
            hits[w].append(r is not None)
            gains[w].append(ndcg(r, 10))
            reranked = [t for t in fused if t in cf_set][:10]
            r2 = _rank_of(target, reranked)
            rerank_hits[w].append(r2 is not None)
            rerank_gains[w].append(ndcg(r2, 10))
            ranks[w] = r
        per_user.append({"user": ex.user, "target": target, "ranks": ranks})
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    ndcg10 = {w: mean(gains[w]) for w in weights}
    hr10 = {w: mean(hits[w]) for w in weights}
    rerank_ndcg = {w: mean(rerank_gains[w]) for w in weights}
    rerank_hr = {w: mean(rerank_hits[w]) for w in weights}
    by_ndcg, by_hr = (rerank_ndcg, rerank_hr) if rerank else (ndcg10, hr10)
    score = {w: (round(by_ndcg[w], 12), round(by_hr[w], 12)) for w in weights}
    best = max(weights, key=lambda w: (*score[w], -w))
    return TuneResult(weights, len(examples), hr10, ndcg10, rerank_hr, rerank_ndcg, best, mean(in_candidates),
                      time.perf_counter() - started, n_lm, n_cf, per_user, decisive=len(set(score.values())) > 1)
