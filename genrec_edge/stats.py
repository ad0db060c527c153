"""95% intervals for metrics that are means over users, and for paired differences between recommenders.

Every metric genrec-edge reports is the mean over users of a per-user value
(``metrics.per_user_metrics``), and users are the sampling unit: an interval says how far the mean could
move with another sample of users like these. Two recommenders scored on the **same** users are compared
through the mean of their per-user differences, resampling users (a paired bootstrap). That interval is
much tighter than two overlapping marginal intervals suggest, because both recommenders meet the same
easy and hard users; a difference whose interval excludes 0 is a real difference at that level.

The bootstrap is ``scipy.stats.bootstrap`` (paired, vectorised, seeded):

- **BCa** (bias-corrected and accelerated) up to ``BCA_MAX_USERS`` users: hit rates of a few percent are
  skewed, and BCa corrects for that. Its jackknife costs O(users²): measured 0.03 s at 610 users and
  0.43 s at 5,000 for two metrics; it would take ~40 s at 50,000.
- **percentile** above that, O(users × resamples): 1.2 s at 50,000 users (2,000 resamples, two metrics).
  With that many users the two methods agree to the third decimal.

A metric whose per-user values are all equal (HR@1 = 0 on a small sample, or a difference of two equal
recommenders) has a one-point bootstrap distribution: its interval is ``[v, v]`` (scipy's BCa would give
NaN). Fewer than two users give NaN bounds. The same values and seed always give the same interval.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000
BCA_MAX_USERS = 5000
# Below this many users a hit rate of a few percent has an interval about as wide as itself (HR@10 ~0.08 on 60
# users: ±0.07): quality columns on such samples are noise, and every report of them says so.
SMALL_SAMPLE = 200
SMALL_SAMPLE_NOTE = ("{users} users is a small sample: each mean is known only to within its interval, as wide as "
                     "the differences worth finding; compare by the paired differences, on " + str(SMALL_SAMPLE)
                     + " users or more")
# Bound the resampled arrays scipy holds at once: batch * users values per metric.
_VALUES_PER_BATCH = 1_000_000


@dataclass(frozen=True)
class Estimate:
    """A mean over users with its confidence interval ``[low, high]``."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (a difference that is not noise)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": _nan_to_none(self.low), "high": _nan_to_none(self.high)}


def mean_intervals(
    values: Mapping[str, Sequence[float] | np.ndarray],
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    method: str | None = None,
) -> dict[str, Estimate]:
    """The mean of each named per-user array with its bootstrap interval (users resampled jointly).

    All arrays hold one value per user, aligned (index i is the same user everywhere). ``method`` is
    ``"BCa"`` or ``"percentile"``; ``None`` picks by sample size (module docstring).
    """
    names = list(values)
    arrays = [np.asarray(values[name], dtype=np.float64) for name in names]
    if len({len(a) for a in arrays}) > 1:
        raise ValueError("every metric needs one value per user, for the same users")
    bounds = _bootstrap(arrays, confidence, n_resamples, seed, method)
    return {
        name: Estimate(float(np.mean(a)) if len(a) else 0.0, low, high)
        for name, a, (low, high) in zip(names, arrays, bounds, strict=True)
    }


def paired_differences(
    a: Mapping[str, Sequence[float] | np.ndarray],
    b: Mapping[str, Sequence[float] | np.ndarray],
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    method: str | None = None,
) -> dict[str, Estimate]:
    """mean(a) - mean(b) for each metric in both, with the paired bootstrap interval of the difference.

    ``a[name][i]`` and ``b[name][i]`` must be the same user's values.
    """
    common = [name for name in a if name in b]
    diffs = {}
    for name in common:
        x, y = np.asarray(a[name], dtype=np.float64), np.asarray(b[name], dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"{name}: {len(x)} and {len(y)} values; a paired difference needs the same users")
        diffs[name] = x - y
    return mean_intervals(diffs, confidence, n_resamples, seed, method)


def compare(
    per_user: Mapping[str, Mapping[str, Sequence[float] | np.ndarray]],
    slices: Mapping[str, Sequence[str]] | None = None,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> dict:
    """Intervals for every recommender and paired differences for every pair, overall and within slices.

    ``per_user[name][metric]`` holds one value per user, the same users in the same order for every
    recommender; ``slices[slicing]`` holds each user's label (e.g. ``"head"``). Pairs are taken in the
    order given, earlier minus later. Returns ``{"users": n, "recommenders": {name: {metric: Estimate}},
    "differences": [{"a": name, "b": name, "metrics": {metric: Estimate}}], "slices": {slicing: {label:
    {"users", "recommenders", "differences"}}}}``; ``to_jsonable`` turns it into plain JSON.
    """
    names = list(per_user)
    sizes = {len(np.asarray(v)) for metrics in per_user.values() for v in metrics.values()}
    if len(sizes) > 1:
        raise ValueError("every recommender needs one value per user, for the same users")
    n = sizes.pop() if sizes else 0
    options = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}

    def block(rows: np.ndarray | None) -> dict:
        def pick(metrics):
            return {m: np.asarray(v, dtype=np.float64)[rows] if rows is not None else v for m, v in metrics.items()}

        chosen = {name: pick(per_user[name]) for name in names}
        return {
            "users": n if rows is None else int(len(rows)),
            "recommenders": {name: mean_intervals(chosen[name], **options) for name in names},
            "differences": [
                {"a": a, "b": b, "metrics": paired_differences(chosen[a], chosen[b], **options)}
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            ],
        }

    out = block(None)
    out["slices"] = {}
    for slicing, labels in (slices or {}).items():
        if len(labels) != n:
            raise ValueError(f"slice {slicing!r} labels {len(labels)} users, not {n}")
        labels = np.asarray(labels, dtype=object)
        out["slices"][slicing] = {
            label: block(np.flatnonzero(labels == label)) for label in dict.fromkeys(labels.tolist())
        }
    return out


def to_jsonable(value):
    """``compare``'s result (or any nesting of dicts, lists and ``Estimate``) as plain JSON values."""
    if isinstance(value, Estimate):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def choose_method(n_users: int) -> str:
    return "BCa" if n_users <= BCA_MAX_USERS else "percentile"


def _bootstrap(arrays: list[np.ndarray], confidence: float, n_resamples: int, seed: int,
               method: str | None) -> list[tuple[float, float]]:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    n = len(arrays[0]) if arrays else 0
    nan = (math.nan, math.nan)
    if n < 2:
        return [nan for _ in arrays]
    out: list[tuple[float, float]] = [nan] * len(arrays)
    varying = []
    for i, a in enumerate(arrays):
        if np.all(a == a[0]):
            out[i] = (float(a[0]), float(a[0]))
        else:
            varying.append(i)
    method = method or choose_method(n)
    if method not in ("BCa", "percentile"):
        raise ValueError(f"method must be 'BCa' or 'percentile', got {method!r}")
    todo = varying
    for attempt in (method, "percentile"):
        if not todo:
            break
        bounds = _scipy_interval([arrays[i] for i in todo], confidence, n_resamples, seed, attempt)
        retry = []
        for i, (low, high) in zip(todo, bounds, strict=True):
            if math.isnan(low) or math.isnan(high):
                retry.append(i)  # BCa's acceleration can be undefined (a single non-zero user)
            else:
                out[i] = (low, high)
        todo = retry if attempt != "percentile" else []
    return out


def _scipy_interval(arrays: list[np.ndarray], confidence: float, n_resamples: int, seed: int,
                    method: str) -> list[tuple[float, float]]:
    from scipy.stats import bootstrap

    def means(*samples, axis):
        return np.stack([s.mean(axis=axis) for s in samples])

    n = len(arrays[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate cases are handled by the caller (NaN -> retry)
        result = bootstrap(
            tuple(arrays),
            means,
            paired=True,
            vectorized=True,
            method=method,
            n_resamples=n_resamples,
            confidence_level=confidence,
            batch=max(1, _VALUES_PER_BATCH // n),
            rng=np.random.default_rng(seed),
        )
    low = np.atleast_1d(result.confidence_interval.low)
    high = np.atleast_1d(result.confidence_interval.high)
    return [(float(lo), float(hi)) for lo, hi in zip(low, high, strict=True)]


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def format_estimate(estimate: Estimate, digits: int = 4, signed: bool = False) -> str:
    """``0.0426 [0.0279, 0.0590]`` (``+0.0150 [...]`` with ``signed``); ``—`` bounds when undefined."""
    sign = "+" if signed else ""
    mean = f"{estimate.mean:{sign}.{digits}f}"
    if math.isnan(estimate.low) or math.isnan(estimate.high):
        return f"{mean} [—]"
    return f"{mean} [{estimate.low:{sign}.{digits}f}, {estimate.high:{sign}.{digits}f}]"
