"""Evaluation at scale: popularity on a synthetic 50k-user x 17k-title dataset, timed (issue 15 item 1).

The data is seeded and long-tailed like the held-out real set in FINDINGS.md ("Scale": 16,859 titles,
50,546 users, 440k interactions): item popularity follows a Zipf-like law, history lengths a geometric
law (at least 3 items per user, mean ~8.7), a few duplicate titles. It stays in memory (no SQLite): what is
timed is the evaluation protocol itself, ``evaluation.evaluate_scores`` over every test user, plus the 95%
intervals of its six metrics (``stats.mean_intervals``). ``--check-users N`` also runs the per-user path
(``evaluation.evaluate`` with ``PopularityRanker.rank``) on the first N users, asserts the same ranks and
rankings, and times it, so the speed-up is measured on the same data.

Example::

    python -m bench.eval_scale --users 50000 --titles 17000 --check-users 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def synthetic(users: int, titles: int, seed: int = 0, mean_length: float = 8.7):
    """``(sequences, catalog)``: seeded long-tailed histories over ``titles`` items (ids 1, 3, 5, ...)."""
    import numpy as np

    from genrec_edge.catalog import Catalog

    rng = np.random.default_rng(seed)
    item_ids = np.arange(1, 2 * titles, 2)  # ids are not positions
    names = [f"Synthetic Movie {i} ({1950 + i % 70})" for i in range(titles)]
    for i in range(0, titles, 997):  # a few duplicate titles, merged by the protocol
        names[i] = names[i + 1] if i + 1 < titles else names[i]
    weights = 1.0 / np.arange(1, titles + 1) ** 0.9
    weights = rng.permutation(weights / weights.sum())
    lengths = 3 + rng.geometric(1.0 / (mean_length - 2), size=users) - 1
    flat = rng.choice(titles, size=int(lengths.sum()), p=weights)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    sequences = [(u + 1, item_ids[flat[bounds[u] : bounds[u + 1]]].tolist()) for u in range(users)]
    return sequences, Catalog.from_pairs(list(zip(item_ids.tolist(), names, strict=True)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--titles", type=int, default=17_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-users", type=int, default=0, help="also run the per-user path on this many users")
    args = parser.parse_args(argv)

    from genrec_edge.baselines import popularity, split_examples
    from genrec_edge.evaluation import evaluate, evaluate_scores
    from genrec_edge.stats import mean_intervals

    t0 = time.perf_counter()
    sequences, catalog = synthetic(args.users, args.titles, args.seed)
    timings = {"generate_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    ranker = popularity(sequences, catalog, split="test")
    examples = split_examples(sequences, "test")
    timings["popularity_and_split_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = evaluate_scores(ranker.scores, examples, catalog, progress=False)
    timings["evaluate_scores_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    intervals = mean_intervals(result.per_user())
    timings["intervals_s"] = time.perf_counter() - t0
    report = {
        "users": len(examples),
        "titles": len(catalog.unique_titles),
        "interactions": sum(len(s) for _, s in sequences),
        **{name: round(v, 3) for name, v in timings.items()},
        "metrics": {name: e.to_dict() for name, e in intervals.items()},
    }
    if args.check_users:
        subset = examples[: args.check_users]
        t0 = time.perf_counter()
        slow = evaluate(ranker.rank, subset, catalog, progress=False)
        per_user_s = (time.perf_counter() - t0) / len(subset)
        fast = evaluate_scores(ranker.scores, subset, catalog, progress=False)
        if (slow.ranks, slow.rankings) != (fast.ranks, fast.rankings):
            print("error: the per-user and vectorised paths disagree", file=sys.stderr)
            return 1
        report["per_user_path_s_per_user"] = round(per_user_s, 5)
        report["per_user_path_extrapolated_s"] = round(per_user_s * len(examples), 1)
        report["check_users_identical"] = len(subset)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
