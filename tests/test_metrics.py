"""Metrics and the evaluation protocol: hand-computed values, title merging, seen-item exclusion."""

from __future__ import annotations

import json
import math

import pytest

from genrec_edge.catalog import Catalog
from genrec_edge.errors import NotFoundError, UsageError
from genrec_edge.evaluation import (
    evaluate,
    from_rankings,
    seen_titles,
    topk_overlap,
    topk_rank_correlation,
)
from genrec_edge.metrics import (
    evaluate_rankings,
    evaluate_ranks,
    hit_rate,
    ndcg,
    overlap_at_k,
    rank_correlation,
    reciprocal_rank,
    target_rank,
)
from genrec_edge.prompts import Example


def test_hit_rate_by_hand():
    assert [hit_rate(r, 5) for r in (1, 2, 5, 6, 100, None)] == [1, 1, 1, 0, 0, 0]
    assert hit_rate(1, 1) == 1 and hit_rate(2, 1) == 0


def test_ndcg_for_every_rank_up_to_k_and_misses():
    # 1/log2(rank+1): rank 1 -> 1, rank 3 -> 1/2, rank 7 -> 1/3, rank 15 -> 1/4 (exact powers of two)
    assert ndcg(1, 10) == 1.0
    assert ndcg(3, 10) == 0.5
    assert ndcg(7, 10) == pytest.approx(1 / 3)
    assert ndcg(15, 15) == 0.25
    expected = {
        2: 0.6309297535714575,
        4: 0.43067655807339306,
        5: 0.38685280723454163,
        6: 0.3562071871080222,
        8: 0.31546487678572877,
        9: 0.30102999566398114,
        10: 0.2890648263178879,
    }
    for rank, value in expected.items():  # 1/log2(rank+1), values from a calculator
        assert ndcg(rank, 10) == pytest.approx(value, abs=1e-12)
    assert ndcg(11, 10) == 0.0 and ndcg(None, 10) == 0.0 and ndcg(6, 5) == 0.0


def test_reciprocal_rank_and_target_rank():
    assert [reciprocal_rank(r) for r in (1, 2, 4, None)] == [1.0, 0.5, 0.25, 0.0]
    assert target_rank(["a", "b", "c"], "c") == 3
    assert target_rank(["a", "b"], "z") is None
    assert target_rank([], "a") is None


def test_means_over_users_by_hand():
    # ranks 1, 3, miss, 7: HR@1 = 1/4, HR@5 = 2/4, HR@10 = 3/4; NDCG@10 = (1 + 1/2 + 0 + 1/3)/4;
    # NDCG@5 = (1 + 1/2)/4; MRR = (1 + 1/3 + 0 + 1/7)/4
    out = evaluate_ranks([1, 3, None, 7], ks=(1, 5, 10))
    assert out["hr"] == {1: 0.25, 5: 0.5, 10: 0.75}
    assert out["ndcg"][5] == pytest.approx(1.5 / 4)
    assert out["ndcg"][10] == pytest.approx((1 + 0.5 + 1 / 3) / 4)
    assert out["ndcg"][1] == out["hr"][1]
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7) / 4)
    assert out["n_users"] == 4
    assert evaluate_ranks([], ks=(10,))["hr"][10] == 0.0
    with pytest.raises(ValueError):
        evaluate_ranks([1], ks=(0,))
    assert evaluate_rankings([["a", "b"], ["c"]], ["b", "x"], ks=(1, 2))["hr"] == {1: 0.0, 2: 0.5}


def test_overlap_and_rank_correlation_by_hand():
    assert overlap_at_k(["a", "b", "c"], ["c", "x", "a"], 3) == pytest.approx(2 / 3)
    assert overlap_at_k(["a", "b", "c", "d"], ["a", "b", "x", "y"], 2) == 1.0
    assert rank_correlation(["a", "b", "c"], ["a", "b", "c"], 3) == pytest.approx(1.0)
    assert rank_correlation(["a", "b", "c"], ["c", "b", "a"], 3) == pytest.approx(-1.0)
    # union {a, b, c}: ranks in a = (1, 2, 3), in b = (2, 1, 3) -> Pearson = 0.5 (d = (-1, 1, 0), var 2 each)
    assert rank_correlation(["a", "b", "c"], ["b", "a", "c"], 3) == pytest.approx(0.5)
    # k=2, lists [a, b] and [a, c]: union a, b, c; x = (1, 2, 3), y = (1, 3, 2) -> rho = 0.5
    assert rank_correlation(["a", "b"], ["a", "c"], 2) == pytest.approx(0.5)
    # disjoint k=1: x = (1, 2), y = (2, 1) -> -1
    assert rank_correlation(["a"], ["b"], 1) == pytest.approx(-1.0)
    assert rank_correlation([], [], 3) == 1.0


# ------------------------------------------------------------------------------------------ the protocol

# Items 3 and 4 share one title: they are one title for ranking and for hits.
CATALOG = Catalog.from_pairs([(1, "A"), (2, "B"), (3, "Twin"), (4, "Twin"), (5, "C"), (6, "D")])


def fixed(ranking):
    return lambda example: ranking


def test_seen_titles():
    ex = Example(user=1, history=(1, 4), item=5)
    assert seen_titles(ex, CATALOG) == {"A", "Twin"}


def test_duplicate_titles_count_once_and_a_hit_is_a_title_match():
    # Target is item 4 ("Twin"); the ranker returns item 3, the same title -> a hit at rank 2, not a miss.
    ex = Example(user=7, history=(1,), item=4)
    result = evaluate(fixed([2, 3, 4, 5]), [ex], CATALOG, ks=(1, 2, 3), progress=False)
    assert result.ranks == (2,)
    assert result.rankings == (("B", "Twin", "C"),)  # "Twin" once: C moves up to rank 3
    assert result.hr == {1: 0.0, 2: 1.0, 3: 1.0}
    assert result.mrr == 0.5


def test_seen_items_are_excluded_before_ranking():
    # The ranker puts the seen item 1 and the seen title "Twin" (via item 3, seen as 4) first.
    ex = Example(user=1, history=(1, 4), item=5)
    result = evaluate(fixed([1, 3, 5, 2]), [ex], CATALOG, ks=(1, 5), progress=False)
    assert result.ranks == (1,)
    assert result.rankings == (("C", "B"),)
    assert result.hr[1] == 1.0 and result.n_target_seen == 0


def test_target_title_already_seen_is_a_counted_miss():
    ex = Example(user=1, history=(3,), item=4)  # re-watching "Twin" under another item id
    result = evaluate(fixed([4, 3, 2]), [ex], CATALOG, progress=False)
    assert result.ranks == (None,) and result.n_target_seen == 1 and result.hr[10] == 0.0


def test_k_max_truncates_and_makes_mrr_at_k():
    examples = [Example(1, (1,), 6), Example(2, (1,), 2)]
    rank_fn = fixed([2, 3, 5, 6])  # titles B, Twin, C, D -> user 1's target at rank 4, user 2's at 1
    full = evaluate(rank_fn, examples, CATALOG, ks=(1, 5), progress=False)
    assert full.ranks == (4, 1) and full.mrr == pytest.approx((0.25 + 1) / 2)
    top3 = evaluate(rank_fn, examples, CATALOG, ks=(1, 5), k_max=3, progress=False)
    assert top3.ranks == (None, 1) and top3.mrr == 0.5 and top3.hr[5] == 0.5
    assert "MRR@3" in top3.summary() and "MRR" in full.summary()


def test_result_to_dict_is_json_and_complete():
    examples = [Example(1, (1,), 2), Example(2, (2,), 6)]
    result = evaluate(fixed([2, 5, 6]), examples, CATALOG, progress=False)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["hr"]["1"] == 0.5 and data["n_users"] == 2
    assert data["per_user"][1] == {"user": 2, "target": "D", "rank": 2, "ranking": ["C", "D"]}
    assert "per_user" not in result.to_dict(per_user=False)


def test_comparing_two_results_user_by_user():
    examples = [Example(1, (1,), 2), Example(2, (1,), 2)]
    a = evaluate(from_rankings(examples, [[2, 5, 6], [2, 5, 6]]), examples, CATALOG, ks=(3,), progress=False)
    b = evaluate(from_rankings(examples, [[2, 5, 6], [6, 3, 5]]), examples, CATALOG, ks=(3,), progress=False)
    # user 1 identical (overlap 1, rho 1); user 2: {B, C, D} vs {D, Twin, C} share C, D -> 2/3;
    # union B, C, D, Twin: x = (1, 2, 3, 4), y = (4, 3, 1, 2) -> rho = -0.8 (by hand: cov -4, var 5 each)
    assert topk_overlap(a, b, 3) == pytest.approx((1 + 2 / 3) / 2)
    assert topk_rank_correlation(a, b, 3) == pytest.approx((1 - 0.8) / 2)
    with pytest.raises(UsageError):
        topk_overlap(a, b, 4)  # only 3 titles were stored per user


def test_bad_input_raises_our_errors():
    with pytest.raises(NotFoundError, match="item id 99"):
        evaluate(fixed([99]), [Example(1, (1,), 2)], CATALOG, progress=False)
    with pytest.raises(UsageError, match="one example per user"):
        evaluate(fixed([2]), [Example(1, (1,), 2), Example(1, (1, 2), 5)], CATALOG, progress=False)
    with pytest.raises(UsageError):
        evaluate(fixed([2]), [Example(1, (1,), 2)], CATALOG, ks=(0,), progress=False)


def test_ndcg_is_one_over_log2_of_rank_plus_one_for_every_rank():
    for rank in range(1, 50):
        assert ndcg(rank, 50) == pytest.approx(math.log(2) / math.log(rank + 1))


def test_per_user_metrics_are_the_scalar_formulas_per_user():
    from genrec_edge.metrics import REPORTED, per_user_metrics

    ranks = [1, 2, 5, 6, 10, 11, None, 3]
    values = per_user_metrics(ranks, REPORTED + ("MRR@5",))
    assert list(values) == list(REPORTED) + ["MRR@5"]
    for i, rank in enumerate(ranks):
        assert values["HR@1"][i] == hit_rate(rank, 1) and values["HR@10"][i] == hit_rate(rank, 10)
        assert values["NDCG@5"][i] == pytest.approx(ndcg(rank, 5), abs=1e-15)
        assert values["NDCG@10"][i] == pytest.approx(ndcg(rank, 10), abs=1e-15)
        assert values["MRR"][i] == pytest.approx(reciprocal_rank(rank), abs=1e-15)
        assert values["MRR@5"][i] == pytest.approx(reciprocal_rank(rank if rank and rank <= 5 else None))
    # Their means are evaluate_ranks' numbers.
    means = evaluate_ranks(ranks, (1, 5, 10))
    assert values["HR@5"].mean() == pytest.approx(means["hr"][5])
    assert values["NDCG@10"].mean() == pytest.approx(means["ndcg"][10])
    assert values["MRR"].mean() == pytest.approx(means["mrr"])
    with pytest.raises(ValueError, match="unknown metric"):
        per_user_metrics([1], ["HR@0"])
    with pytest.raises(ValueError, match="unknown metric"):
        per_user_metrics([1], ["Recall@10"])
