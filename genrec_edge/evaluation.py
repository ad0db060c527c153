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
  ranking to k) the same number is MRR@k. Every metric is a mean over users (one example per user); its
  95% interval and the paired interval of a difference between two recommenders are in ``stats``.

Two paths compute the same numbers:

- **per user** (``evaluate``): a function returns each example's ranked item ids (the LLM's top k);
- **from scores** (``evaluate_scores``): a function returns a (users x titles) score matrix for a chunk of
  examples (popularity, SASRec). Seen titles are masked to -inf, the top k come from a threshold (the k-th
  best score of a strided sample of columns bounds the row's k-th best from below) and a stable sort of the
  few candidates above it, and the target's **rank is counted, not sorted**: 1 + the unseen titles scoring
  strictly higher + the unseen titles with the same score and a smaller title index. Python does
  O(users x (k + history)) work; the O(users x titles) part is numpy, in chunks of bounded memory.
- **Ties** between titles are broken by the title's index in ``Catalog.unique_titles`` (its smallest item
  id): the order ``PopularityRanker`` always used. A score of -inf means "not ranked" (a seen title).

Runs that take hours stream each user's result to a ``evalruns.ResultLog`` (JSONL) and resume from it.
``--by`` slices (``target_popularity_slices``, ``history_length_slices``) show where a recommender
helps. Comparing two recommenders user by user: ``topk_overlap`` (share of top-k titles in common) and
``topk_rank_correlation`` (Spearman's rho over the union of the two top-k lists; see
``genrec_edge.metrics.rank_correlation`` for the exact definition).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .catalog import Catalog
from .errors import NotFoundError, UsageError
from .metrics import evaluate_ranks, mean, overlap_at_k, rank_correlation, target_rank
from .prompts import Example

RankFn = Callable[[Example], Sequence[int]]
# examples -> (len(examples), n_titles) scores, columns in Catalog.unique_titles order; higher is better.
ScoreFn = Callable[[Sequence[Example]], np.ndarray]

# One chunk of the scores path holds about this many bytes of float64 scores. Under glibc's largest mmap
# threshold (32 MiB), freed chunks are reused rather than returned to the OS and page-faulted in again:
# 64 MiB chunks made a 50k x 17k popularity evaluation 2x slower.
CHUNK_BYTES = 24 << 20
MAX_CHUNK_USERS = 1024


@dataclass(frozen=True)
class UserResult:
    """One user's outcome: the target title's rank (``None``: a miss) and the top titles produced.

    ``rank`` is the target's 1-based rank among the unseen titles, within the ranking as scored (truncated
    to ``k_max`` when one applies); ``top`` holds the first titles of that ranking.
    """

    user: int
    target: str
    rank: int | None
    top: tuple[str, ...]
    target_seen: bool = False
    history_len: int = 0

    def to_dict(self) -> dict:
        return {
            "user": self.user, "target": self.target, "rank": self.rank, "top": list(self.top),
            "target_seen": self.target_seen, "history_len": self.history_len,
        }

    @classmethod
    def from_dict(cls, data: dict) -> UserResult:
        rank = data["rank"]
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise ValueError(f"bad rank {rank!r}")
        return cls(int(data["user"]), str(data["target"]), rank, tuple(str(t) for t in data["top"]),
                   bool(data.get("target_seen", False)), int(data.get("history_len", 0)))


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

    @classmethod
    def from_user_results(
        cls, results: Sequence[UserResult], ks: Sequence[int], k_max: int | None, seconds: float = 0.0
    ) -> EvalResult:
        ks = tuple(sorted(set(ks)))
        ranks = [r.rank for r in results]
        means = evaluate_ranks(ranks, ks)
        return cls(
            hr=means["hr"],
            ndcg=means["ndcg"],
            mrr=means["mrr"],
            n_users=len(ranks),
            ks=ks,
            k_max=k_max,
            users=tuple(r.user for r in results),
            targets=tuple(r.target for r in results),
            ranks=tuple(ranks),
            rankings=tuple(r.top for r in results),
            n_target_seen=sum(r.target_seen for r in results),
            seconds=seconds,
        )

    def summary(self) -> dict:
        """The mean metrics only, with readable keys (``HR@10``, ``NDCG@10``, ``MRR`` or ``MRR@k``)."""
        out = {f"HR@{k}": v for k, v in self.hr.items()}
        out.update({f"NDCG@{k}": v for k, v in self.ndcg.items()})
        out["MRR" if self.k_max is None else f"MRR@{self.k_max}"] = self.mrr
        return out

    def per_user(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Each user's metric values (``metrics.per_user_metrics``), what ``stats`` resamples."""
        from .metrics import REPORTED, per_user_metrics

        return per_user_metrics(self.ranks, names or REPORTED)

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


# ============================================================================================ per user
def seen_titles(example: Example, catalog: Catalog) -> set[str]:
    """The titles of every item in the example's history (all items before its target)."""
    return {_title(catalog, item) for item in example.history}


def result_from_titles(
    example: Example, titles: Sequence[str], catalog: Catalog, keep: int, k_max: int | None = None
) -> UserResult:
    """Score one example's produced title list (best first) under the protocol: dedupe, drop seen, truncate."""
    seen = seen_titles(example, catalog)
    kept: dict[str, None] = {}
    for title in titles:
        if title not in catalog.title_to_items:
            raise NotFoundError(f"title {title!r} is not in the catalog")
        if title not in seen:
            kept.setdefault(title, None)
    ranking = list(kept)
    if k_max is not None:
        ranking = ranking[:k_max]
    target = _title(catalog, example.item)
    return UserResult(example.user, target, target_rank(ranking, target), tuple(ranking[:keep]),
                      target in seen, len(example.history))


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
    ks, keep = _check_args(examples, ks, k_max)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    results = []
    for example in tqdm(examples, desc="evaluate", unit="user", disable=not progress, leave=False):
        titles = [_title(catalog, item) for item in rank_fn(example)]
        results.append(result_from_titles(example, titles, catalog, keep, k_max))
    return EvalResult.from_user_results(results, ks, k_max, time.perf_counter() - start)


# ========================================================================================= from scores
class TitleSpace:
    """A catalog's titles as column indices 0..T-1 (``Catalog.unique_titles`` order) and item id lookups."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.titles: list[str] = catalog.unique_titles
        index = {t: j for j, t in enumerate(self.titles)}
        ids = np.asarray(catalog.item_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[order]
        self._sorted_title = np.asarray([index[t] for t in catalog.titles], dtype=np.int64)[order]
        self._first_item = [catalog.title_to_items[t][0] for t in self.titles]

    def __len__(self) -> int:
        return len(self.titles)

    def of_items(self, items: np.ndarray) -> np.ndarray:
        """Title index of each item id; NotFoundError for an id outside the catalog."""
        items = np.asarray(items, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, items)
        pos = np.minimum(pos, len(self._sorted_ids) - 1)
        bad = self._sorted_ids[pos] != items
        if bad.any():
            raise NotFoundError(f"item id {int(items[bad][0])} is not in the catalog")
        return self._sorted_title[pos]

    def first_item(self, title_index: int) -> int:
        """The item id that stands for a title in item-id rankings (its smallest)."""
        return self._first_item[title_index]

    def batch(self, examples: Sequence[Example]):
        """``(seen_rows, seen_cols, targets)``: every history title as (example row, title index) pairs."""
        lengths = np.fromiter((len(ex.history) for ex in examples), dtype=np.int64, count=len(examples))
        flat = np.fromiter(itertools.chain.from_iterable(ex.history for ex in examples), dtype=np.int64,
                           count=int(lengths.sum()))
        seen_rows = np.repeat(np.arange(len(examples)), lengths)
        seen_cols = self.of_items(flat)
        targets = self.of_items(np.fromiter((ex.item for ex in examples), dtype=np.int64, count=len(examples)))
        return seen_rows, seen_cols, targets


def top_k_titles(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the column indices of the ``k`` best finite scores, best first; ties by smaller index.

    Returns a ``(rows, k)`` int array padded with -1 where a row has fewer than ``k`` finite scores.
    """
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    out = np.full((n_rows, k), -1, dtype=np.int64)
    if k == 0 or n_rows == 0:
        return out
    if 8 * k >= n_cols:  # most of the row is wanted anyway: one stable sort
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        finite = np.take_along_axis(scores, order, axis=1) > -np.inf
        out[finite] = order[finite]
        return out
    # A lower bound on each row's k-th best score: the k-th best of every stride-th column.
    stride = max(1, n_cols // max(1024, 8 * k))
    sample = scores[:, ::stride]
    m = sample.shape[1]
    threshold = np.partition(sample, m - k, axis=1)[:, m - k]
    # -inf scores are never ranked: a row with fewer than k finite sampled scores takes every finite one.
    threshold = np.maximum(threshold, np.nextafter(scores.dtype.type(-np.inf), scores.dtype.type(0)))
    # By row, then by column. 1-D nonzero is 5x faster than 2-D on a sparse mask.
    rows, cols = np.divmod(np.flatnonzero(scores >= threshold[:, None]), n_cols)
    order = np.lexsort((cols, -scores[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    position = np.arange(len(rows)) - starts[rows]
    wanted = position < k
    out[rows[wanted], position[wanted]] = cols[wanted]
    return out


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the 1-based rank of column ``targets[row]`` among the finite scores (0 if its score is -inf).

    rank = 1 + #(scores > s) + #(scores == s at a smaller column), s the target's score: the position the
    target has in ``top_k_titles``' order, counted without sorting. One row at a time: two counts over
    slices read the row once and write nothing, 3-4x faster than the same counts on the whole matrix.
    """
    ranks = np.zeros(len(targets), dtype=np.int64)
    for row, column in enumerate(targets.tolist()):
        line = scores[row]
        score = line[column]
        if score > -np.inf:
            ranks[row] = 1 + np.count_nonzero(line[:column] >= score) + np.count_nonzero(line[column + 1 :] > score)
    return ranks


def rank_scores(
    scores: np.ndarray, seen_rows: np.ndarray, seen_cols: np.ndarray, targets: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mask seen titles (in place) and return ``(top_k_titles(scores, k), target_ranks(scores, targets))``."""
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    scores[seen_rows, seen_cols] = -np.inf
    return top_k_titles(scores, k), target_ranks(scores, targets)


def score_results(
    score_fn: ScoreFn,
    examples: Sequence[Example],
    space: TitleSpace,
    keep: int,
    k_max: int | None = None,
    chunk_users: int | None = None,
) -> Iterator[list[UserResult]]:
    """The protocol's ``UserResult`` of every example, computed from ``score_fn`` one chunk of users at a time."""
    n_titles = len(space)
    if chunk_users is None:
        chunk_users = max(1, min(MAX_CHUNK_USERS, CHUNK_BYTES // (8 * max(n_titles, 1))))
    keep = min(keep, k_max) if k_max is not None else keep
    titles = space.titles
    for start in range(0, len(examples), chunk_users):
        batch = list(examples[start : start + chunk_users])
        seen_rows, seen_cols, targets = space.batch(batch)
        scores = np.asarray(score_fn(batch))
        if scores.shape != (len(batch), n_titles):
            raise ValueError(f"score function gave shape {scores.shape}, expected {(len(batch), n_titles)}")
        if scores.dtype.kind != "f":
            scores = scores.astype(np.float64)
        elif not scores.flags.writeable:
            scores = scores.copy()
        target_seen = np.zeros(len(batch), dtype=bool)
        target_seen[seen_rows[seen_cols == targets[seen_rows]]] = True
        top, ranks = rank_scores(scores, seen_rows, seen_cols, targets, keep)
        out = []
        for row, ex in enumerate(batch):
            rank = int(ranks[row])
            hit = rank > 0 and (k_max is None or rank <= k_max)
            out.append(UserResult(ex.user, titles[targets[row]], rank if hit else None,
                                  tuple(titles[j] for j in top[row] if j >= 0), bool(target_seen[row]),
                                  len(ex.history)))
        yield out


def evaluate_scores(
    score_fn: ScoreFn,
    examples: Sequence[Example],
    catalog: Catalog,
    ks: Sequence[int] = (1, 5, 10),
    k_max: int | None = None,
    progress: bool = True,
    chunk_users: int | None = None,
) -> EvalResult:
    """``evaluate`` for a recommender that scores every title: the same ``EvalResult``, vectorised.

    ``score_fn(examples)`` returns a ``(len(examples), len(catalog.unique_titles))`` array; columns follow
    ``Catalog.unique_titles``. Equal to ``evaluate`` on the ranking "by score, ties by title index".
    """
    ks, keep = _check_args(examples, ks, k_max)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    results: list[UserResult] = []
    with tqdm(total=len(examples), desc="evaluate", unit="user", disable=not progress, leave=False) as bar:
        for chunk in score_results(score_fn, examples, TitleSpace(catalog), keep, k_max, chunk_users):
            results.extend(chunk)
            bar.update(len(chunk))
    return EvalResult.from_user_results(results, ks, k_max, time.perf_counter() - start)


# ================================================================================================ slices
POPULARITY_SHARES = (0.5, 0.8)
HISTORY_EDGES = (5, 20, 50, 100, 200)


def target_popularity_slices(sequences, catalog: Catalog, split: str, examples: Sequence[Example]) -> list[str]:
    """``head`` / ``torso`` / ``tail``: how popular each example's target title is in the split's training part.

    Titles are counted as popularity counts them (``baselines.popularity``) and sorted by count, most
    first. **head**: the most popular titles that together hold the first 50% of training interactions;
    **torso**: the next ones, up to 80%; **tail**: the rest, including titles never seen in training. The
    cut is made on counts, so titles with equal counts are always in the same slice: a title is in the
    head if its count is at least that of the title at which the cumulative share first reaches 50%.
    """
    from .baselines import popularity

    counts = popularity(sequences, catalog, split=split).counts
    ordered = sorted(counts.values(), reverse=True)
    total = sum(ordered)
    cuts = []
    for share in POPULARITY_SHARES:
        running, cut = 0, None
        for count in ordered:
            running += count
            if total and running >= share * total:
                cut = count
                break
        cuts.append(max(cut or 0, 1))
    head, torso = cuts

    def label(title: str) -> str:
        count = counts.get(title, 0)
        return "head" if count >= head else "torso" if count >= torso else "tail"

    return [label(_title(catalog, ex.item)) for ex in examples]


def history_length_slices(examples: Sequence[Example], edges: Sequence[int] = HISTORY_EDGES) -> list[str]:
    """The bucket of each example's history length (all items before the target): ``1-5``, ``6-20``, ... ``>200``."""
    labels = []
    for ex in examples:
        low = 1
        for edge in edges:
            if len(ex.history) <= edge:
                labels.append(f"{low}-{edge}")
                break
            low = edge + 1
        else:
            labels.append(f">{edges[-1]}")
    return labels


def slice_order(labels: Iterable[str]) -> list[str]:
    """Slice labels in reading order: head, torso, tail; history buckets from short to long."""
    fixed = {"head": 0, "torso": 1, "tail": 2}

    def key(label: str):
        if label in fixed:
            return (0, fixed[label])
        return (1, int(label.lstrip(">").split("-")[0]) + (label.startswith(">")))

    return sorted(set(labels), key=key)


# ============================================================================================ comparisons
def _paired_rankings(a: EvalResult, b: EvalResult) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    by_user_b = dict(zip(b.users, b.rankings, strict=True))
    pairs = [(ra, by_user_b[u]) for u, ra in zip(a.users, a.rankings, strict=True) if u in by_user_b]
    if not pairs:
        raise UsageError("the two evaluation results have no user in common")
    return pairs


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


def _check_args(examples: Sequence[Example], ks: Sequence[int], k_max: int | None) -> tuple[tuple[int, ...], int]:
    ks = tuple(sorted(set(ks)))
    if not ks or ks[0] < 1:
        raise UsageError(f"ks must be positive integers, got {ks}")
    if k_max is not None and k_max < 1:
        raise UsageError(f"k_max must be >= 1, got {k_max}")
    users = [ex.user for ex in examples]
    if len(set(users)) != len(users):
        raise UsageError("evaluate() takes one example per user; got a user twice")
    return ks, (k_max if k_max is not None else ks[-1])


def _title(catalog: Catalog, item: int) -> str:
    try:
        return catalog.title_of(item)
    except KeyError:
        raise NotFoundError(f"item id {item} is not in the catalog") from None
