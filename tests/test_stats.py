"""Bootstrap intervals (genrec_edge.stats): coverage-sized widths, degenerate cases, pairing, slices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from genrec_edge.stats import (
    BCA_MAX_USERS,
    Estimate,
    choose_method,
    compare,
    format_estimate,
    mean_intervals,
    paired_differences,
    to_jsonable,
)


def bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_interval_of_a_hit_rate_has_the_normal_approximation_width(method):
    # 2,000 users, p = 0.3: the 95% interval is about mean +- 1.96 * sqrt(p(1-p)/n) = +- 0.0201.
    values = bernoulli(0.3, 2000, seed=1)
    est = mean_intervals({"HR@10": values}, method=method, seed=3)["HR@10"]
    expected_half = 1.96 * math.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert est.mean == pytest.approx(values.mean())
    assert est.low < est.mean < est.high
    assert (est.high - est.low) / 2 == pytest.approx(expected_half, rel=0.15)


def test_the_same_seed_gives_the_same_interval_and_metrics_share_resamples():
    values = {"a": bernoulli(0.1, 500, 0), "b": bernoulli(0.5, 500, 1)}
    first, again = mean_intervals(values, seed=7), mean_intervals(values, seed=7)
    assert first == again
    alone = mean_intervals({"a": values["a"]}, seed=7)["a"]
    assert alone == first["a"]  # resampling users jointly gives each metric the interval it has alone
    assert mean_intervals(values, seed=8)["a"] != first["a"]


def test_degenerate_and_tiny_samples():
    constant = mean_intervals({"HR@1": np.zeros(50), "HR@10": np.ones(50)})
    assert constant["HR@1"] == Estimate(0.0, 0.0, 0.0) and constant["HR@10"] == Estimate(1.0, 1.0, 1.0)
    one = mean_intervals({"x": [0.5]})["x"]
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high)
    assert to_jsonable(one) == {"mean": 0.5, "low": None, "high": None}
    assert format_estimate(one) == "0.5000 [—]"
    empty = mean_intervals({"x": []})["x"]
    assert empty.mean == 0.0 and math.isnan(empty.low)
    # A single hit among many users: BCa's acceleration is undefined there; the interval still exists.
    single = mean_intervals({"x": np.eye(1, 300)[0]})["x"]
    assert single.low == 0.0 and 0 < single.high < 0.05
    with pytest.raises(ValueError, match="one value per user"):
        mean_intervals({"a": [1, 0], "b": [1, 0, 1]})


def test_paired_difference_sees_a_shift_that_marginal_intervals_hide():
    # b is a plus one extra hit for ~3% of users: the marginal intervals overlap, the paired one excludes 0.
    rng = np.random.default_rng(5)
    a = (rng.random(1000) < 0.3).astype(float)
    b = a.copy()
    b[(a == 0) & (rng.random(1000) < 0.04)] = 1.0
    ea, eb = mean_intervals({"m": a})["m"], mean_intervals({"m": b})["m"]
    assert ea.high > eb.low  # overlapping
    diff = paired_differences({"m": b}, {"m": a})["m"]
    assert diff.mean == pytest.approx(b.mean() - a.mean())
    assert diff.low > 0 and diff.excludes_zero
    same = paired_differences({"m": a}, {"m": a})["m"]
    assert same == Estimate(0.0, 0.0, 0.0) and not same.excludes_zero
    with pytest.raises(ValueError, match="same users"):
        paired_differences({"m": a}, {"m": a[:10]})


def test_method_follows_the_sample_size():
    assert choose_method(610) == "BCa" and choose_method(BCA_MAX_USERS) == "BCa"
    assert choose_method(BCA_MAX_USERS + 1) == "percentile"
    with pytest.raises(ValueError):
        mean_intervals({"x": [0, 1, 1]}, method="studentized")


def test_compare_pairs_and_slices_add_up():
    rng = np.random.default_rng(2)
    n = 300
    per_user = {
        "llm": {"HR@10": (rng.random(n) < 0.2).astype(float)},
        "sasrec": {"HR@10": (rng.random(n) < 0.15).astype(float)},
        "pop": {"HR@10": (rng.random(n) < 0.1).astype(float)},
    }
    labels = ["head" if i % 3 else "tail" for i in range(n)]
    out = compare(per_user, {"popularity": labels}, seed=1)
    assert out["users"] == n and list(out["recommenders"]) == ["llm", "sasrec", "pop"]
    assert [(d["a"], d["b"]) for d in out["differences"]] == [("llm", "sasrec"), ("llm", "pop"), ("sasrec", "pop")]
    assert out["differences"][1]["metrics"]["HR@10"].mean == pytest.approx(
        per_user["llm"]["HR@10"].mean() - per_user["pop"]["HR@10"].mean())
    groups = out["slices"]["popularity"]
    assert {label: g["users"] for label, g in groups.items()} == {"tail": 100, "head": 200}
    for name in per_user:  # the overall mean is the users-weighted mean of the slices' means
        weighted = sum(g["users"] * g["recommenders"][name]["HR@10"].mean for g in groups.values()) / n
        assert weighted == pytest.approx(out["recommenders"][name]["HR@10"].mean)
    with pytest.raises(ValueError, match="labels"):
        compare(per_user, {"history": labels[:-1]})
