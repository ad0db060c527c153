"""The vectorised scores path equals the per-user path: brute force, the tiny database, the bundled MovieLens,
SASRec's former torch.topk ranking, and a test-sized run of the 50k x 17k scale check (bench/eval_scale.py)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "passive")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a folder of scripts, not installed

from genrec_edge.baselines import popularity, split_examples, train_sasrec
from genrec_edge.catalog import Catalog
from genrec_edge.errors import NotFoundError
from genrec_edge.evaluation import (
    TitleSpace,
    evaluate,
    evaluate_scores,
    from_rankings,
    rank_scores,
    target_ranks,
    top_k_titles,
)
from genrec_edge.history import HistoryDB
from genrec_edge.prompts import Example


def brute_force(scores: np.ndarray, k: int):
    """The definition: finite scores sorted by (-score, column) - a stable descending sort."""
    tops, ranks = [], []
    for row in scores:
        order = [j for j in np.argsort(-row, kind="stable") if row[j] > -np.inf]
        tops.append(order[:k] + [-1] * (min(k, len(row)) - len(order[:k])))
        ranks.append(order)
    return np.asarray(tops), ranks


@pytest.mark.parametrize("n_cols, k", [(7, 3), (40, 10), (5000, 10), (5000, 1), (3000, 200)])
def test_top_k_and_target_ranks_equal_a_stable_sort(n_cols, k):
    rng = np.random.default_rng(n_cols + k)
    rows = 60
    # Integer-valued scores from a narrow range: ties everywhere, also at the k-th place.
    scores = rng.integers(0, 6, size=(rows, n_cols)).astype(np.float64)
    scores[rng.random((rows, n_cols)) < 0.2] = -np.inf
    scores[0] = 3.0  # one row entirely tied
    scores[1, :] = -np.inf  # one row with nothing rankable
    scores[1, : k // 2] = 1.0  # ... but fewer than k finite scores
    scores[2] = rng.standard_normal(n_cols)  # one row without ties
    expected_top, orders = brute_force(scores, k)
    np.testing.assert_array_equal(top_k_titles(scores, k), expected_top)
    targets = rng.integers(0, n_cols, size=rows)
    got = target_ranks(scores, targets)
    for row, target in enumerate(targets):
        want = orders[row].index(target) + 1 if scores[row, target] > -np.inf else 0
        assert got[row] == want, (row, target)


def test_float32_and_a_nan_check():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((20, 3000)).astype(np.float32)
    np.testing.assert_array_equal(top_k_titles(scores, 10), brute_force(scores, 10)[0])
    scores[3, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rank_scores(scores, np.array([0]), np.array([0]), np.zeros(20, dtype=np.int64), 10)


# ------------------------------------------------------------------------------------- popularity, real data


def _read(db_path):
    with HistoryDB.open(db_path, readonly=True) as db:
        return list(db.sequences()), db.catalog()


def _same(a, b):
    assert a.users == b.users and a.targets == b.targets
    assert a.ranks == b.ranks and a.rankings == b.rankings
    assert a.summary() == b.summary() and a.n_target_seen == b.n_target_seen


@pytest.mark.parametrize("split", ["test", "valid"])
@pytest.mark.parametrize("k_max", [None, 3])
def test_popularity_paths_agree_on_the_tiny_database(tiny_db, split, k_max):
    sequences, catalog = _read(tiny_db)
    ranker = popularity(sequences, catalog, split=split)
    examples = split_examples(sequences, split)
    per_user = evaluate(ranker.rank, examples, catalog, k_max=k_max, progress=False)
    vectorised = evaluate_scores(ranker.scores, examples, catalog, k_max=k_max, progress=False, chunk_users=3)
    _same(per_user, vectorised)
    assert per_user.n_users == len(examples) >= 6


def test_a_seen_target_title_is_a_counted_miss_in_both_paths():
    catalog = Catalog.from_pairs([(1, "A"), (2, "B"), (3, "Twin"), (4, "Twin"), (5, "C")])
    sequences = [(1, [3, 1, 4]), (2, [1, 2, 5]), (3, [2, 1])]
    ranker = popularity(sequences, catalog)
    examples = split_examples(sequences, "test")
    per_user = evaluate(ranker.rank, examples, catalog, progress=False)
    vectorised = evaluate_scores(ranker.scores, examples, catalog, progress=False)
    _same(per_user, vectorised)
    assert vectorised.ranks[0] is None and vectorised.n_target_seen == 1
    with pytest.raises(NotFoundError, match="item id 9"):
        evaluate_scores(ranker.scores, [Example(1, (9,), 1)], catalog, progress=False)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    from genrec_edge.ingest import build_default_db

    path = tmp_path_factory.mktemp("bundled") / "ml-latest-small.db"
    build_default_db(path, progress=False)
    return _read(path)


def test_popularity_paths_agree_on_the_bundled_movielens(bundled):
    sequences, catalog = bundled
    assert len(catalog.unique_titles) < len(catalog)  # ml-latest-small has duplicate titles
    for split, users in (("test", 200), ("valid", 100)):
        ranker = popularity(sequences, catalog, split=split)
        examples = split_examples(sequences, split)[:users]
        _same(evaluate(ranker.rank, examples, catalog, progress=False),
              evaluate_scores(ranker.scores, examples, catalog, progress=False))


def test_sasrec_scores_path_equals_the_former_topk_path_on_the_bundled_movielens(bundled):
    import torch

    sequences, catalog = bundled
    model = train_sasrec(sequences, catalog, epochs=1, eval_every=1, hidden=16, max_len=20, batch_size=128,
                         progress=False)
    examples = list(split_examples(sequences, "test")[:50])

    def topk_rank_many(k):  # what SASRecModel.rank_many did before the scores path
        scores = model.title_scores(examples)
        values, indices = torch.topk(scores, scores.shape[1] if k is None else k, dim=1)
        return [[model.title_item[j] for v, j in zip(vals, idx, strict=True) if v != -math.inf]
                for vals, idx in zip(values.tolist(), indices.tolist(), strict=True)]

    reference = topk_rank_many(None)
    before = evaluate(from_rankings(examples, reference), examples, catalog, progress=False)
    after = evaluate_scores(model.scores, examples, catalog, progress=False)
    _same(before, after)
    assert model.rank_many(examples, 10) == topk_rank_many(10)
    # torch.topk orders exact ties arbitrarily; the new order puts the smaller title index first. Outside
    # ties, the two full rankings are the same list.
    space = TitleSpace(catalog)
    scored = model.scores(examples)
    for row, ranking in enumerate(model.rank_many(examples)):
        assert sorted(ranking) == sorted(reference[row])
        indices = space.of_items(np.asarray(ranking))
        values = scored[row, indices]
        assert np.all(np.diff(values) <= 0)  # best first
        ties = np.flatnonzero(np.diff(values) == 0)
        assert np.all(indices[ties] < indices[ties + 1])  # ties: smaller title index first


def test_scale_check_runs_and_agrees_with_the_per_user_path(capsys):
    from bench.eval_scale import main

    assert main(["--users", "3000", "--titles", "2000", "--check-users", "150"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["users"] == 3000 and report["titles"] <= 2000
    assert report["check_users_identical"] == 150
    assert 0 < report["metrics"]["HR@10"]["mean"] < 1
    assert report["metrics"]["HR@10"]["low"] <= report["metrics"]["HR@10"]["mean"] <= report["metrics"]["HR@10"]["high"]
