"""A seeded synthetic dataset shaped like MovieLens 25M, written as a MovieLens CSV release.

    python -m bench.synth_ml25m --out /tmp/genrec-scale/ml-25m-synth            # full size: 690 MB, ~1 min
    python -m bench.synth_ml25m --out /tmp/genrec-scale/ml-2.5m-synth --scale 0.1
    genrec-edge data ingest movielens-csv /tmp/genrec-scale/ml-25m-synth --db ml25m-synth.db

What it imitates (ML-25M: 162,541 users, 62,423 movies, 25,000,095 ratings, 1995-2019):

- **Titles**: 62,423 distinct titles made of real words. The word count of each title is drawn from
  ml-latest-small's titles (year removed), its words from the pool of every word occurrence in them (so
  "The", "of", "Man" are as common as in real titles), then " (YEAR)" with a year drawn from the real years.
  Genres are drawn from the real genre strings. Movie ids are sparse, as in ML-25M (up to ~209k).
- **Item popularity**: Zipf-Mandelbrot, P(rank r) ∝ (r + 320)^-2, over a random permutation of the movies:
  drawn with repeats, the top movie would get ~78k ratings (ML-25M's most rated has 81k) and the median
  movie ~8. A user rates each movie once, so a heavy user's repeats are redrawn and spill into the tail.
- **Users**: at least 20 ratings each (as MovieLens guarantees), 20 + a log-normal draw with ML-25M's
  median (~71) and mean (~154) counts; the longest histories are tens of thousands. The counts are
  scaled to sum to exactly the requested number of ratings. A user rates distinct movies, drawn by
  popularity.
- **Time**: each user starts at a uniform time in 1995-2019 and rates in sessions (gaps of minutes, with
  a 5 % chance of a gap of weeks). **Ratings**: 0.5-5.0 with ml-latest-small's distribution.
- **Layout**: ``movies.csv`` (movieId,title,genres) and ``ratings.csv`` (userId,movieId,rating,timestamp)
  sorted by user then movie, as the real release is. ``synth.json`` records the seed, sizes and summary
  statistics.

Everything is generated in chunks of users, so memory stays bounded (~200 MB) whatever the size.
Full size writes 690 MB of ratings.csv in about a minute on one core (seed 0: the heaviest user has 20,760
ratings, the most rated movie 48k, the median movie 25; the top 1 % of movies hold 54 % of the ratings).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ML25M_USERS = 162_541
ML25M_ITEMS = 62_423
ML25M_RATINGS = 25_000_095
MAX_ITEM_ID = 209_171
MIN_PER_USER = 20
# 20 + LogNormal(mu, sigma): median 20 + e^mu ≈ 71, mean 20 + e^(mu + sigma²/2) ≈ 154 (ML-25M).
USER_MU, USER_SIGMA = np.log(51.0), 1.39
ZIPF_Q, ZIPF_A = 320.0, 2.0
START, END = 789_652_009, 1_574_327_703  # ML-25M's first and last rating (1995-01-09 .. 2019-11-21)
CHUNK_USERS = 4_096


def _bundled_movies() -> tuple[list[str], list[int], list[str]]:
    """(title words without the year, years, genres strings) of ml-latest-small's movies."""
    from genrec_edge.ingest import YEAR_RE
    from genrec_edge.paths import BUNDLED_DATASET

    titles, years, genres = [], [], []
    with open(Path(BUNDLED_DATASET) / "movies.csv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            match = YEAR_RE.search(row["title"])
            if match:
                years.append(int(match.group(1)))
            titles.append(YEAR_RE.sub("", row["title"]).strip())
            genres.append(row["genres"])
    return titles, years, genres


def _bundled_ratings() -> tuple[np.ndarray, np.ndarray]:
    """(rating values, their probabilities) of ml-latest-small."""
    from collections import Counter

    from genrec_edge.paths import BUNDLED_DATASET

    with open(Path(BUNDLED_DATASET) / "ratings.csv", encoding="utf-8", newline="") as fh:
        counts = Counter(row["rating"] for row in csv.DictReader(fh))
    values = sorted(counts, key=float)
    freq = np.asarray([counts[v] for v in values], dtype=np.float64)
    return np.asarray([float(v) for v in values]), freq / freq.sum()


def synthetic_titles(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct titles: real word counts, real words (by frequency) and real years."""
    real, years, _ = _bundled_movies()
    split = [t.split() for t in real if t.split()]
    lengths = np.asarray([len(words) for words in split])
    pool = [w for words in split for w in words if w.isprintable()]
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        want = n - len(out)
        counts = rng.choice(lengths, size=want)
        picks = rng.integers(0, len(pool), size=int(counts.sum()))
        chosen_years = rng.choice(years, size=want)
        at = 0
        for count, year in zip(counts.tolist(), chosen_years.tolist(), strict=True):
            title = " ".join(pool[i] for i in picks[at : at + count].tolist()) + f" ({year})"
            at += count
            if title not in seen:
                seen.add(title)
                out.append(title)
    return out


def user_counts(users: int, ratings: int, rng: np.random.Generator, items: int) -> np.ndarray:
    """Ratings per user: ``MIN_PER_USER`` + a log-normal tail, scaled to sum to exactly ``ratings``."""
    if ratings < users * MIN_PER_USER:
        raise ValueError(f"{ratings} ratings cannot give {users} users {MIN_PER_USER} each")
    cap = max(MIN_PER_USER, int(0.6 * items))
    extra = rng.lognormal(USER_MU, USER_SIGMA, size=users)
    extra *= (ratings - users * MIN_PER_USER) / extra.sum()
    counts = np.minimum(MIN_PER_USER + np.floor(extra).astype(np.int64), cap)
    short = ratings - int(counts.sum())  # floors and the cap: hand the rest out one by one, largest first
    order = np.argsort(-extra, kind="stable")
    while short > 0:
        room = order[counts[order] < cap][:short]
        if room.size == 0:
            raise ValueError(f"{ratings} ratings do not fit {users} users x {cap} items each")
        counts[room] += 1
        short -= room.size
    return counts


def item_weights(items: int, rng: np.random.Generator) -> np.ndarray:
    """Zipf-Mandelbrot popularity over a random permutation of the items (sums to 1)."""
    weights = 1.0 / (np.arange(1, items + 1) + ZIPF_Q) ** ZIPF_A
    return rng.permutation(weights / weights.sum())


def draw_distinct(counts: np.ndarray, cdf: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user index, item index) pairs sorted by user then item: ``counts[u]`` distinct items per user.

    Draws by popularity with replacement, drops repeats, and redraws the shortfall of the users still
    short (a few rounds); what a heavy user still lacks then (the head of the catalog is used up) is
    drawn uniformly from the items they have not rated, as heavy raters dig into the long tail.
    """
    n_items = len(cdf)
    counts = counts.astype(np.int64)
    keys = np.empty(0, dtype=np.int64)
    short = np.arange(len(counts))
    for _ in range(4):
        need = counts[short] - np.bincount(keys // n_items, minlength=len(counts))[short]
        short, need = short[need > 0], need[need > 0]
        if short.size == 0:
            break
        draw_u = np.repeat(short, need + need // 4 + 2)  # a little over: fewer rounds
        draw_i = np.minimum(np.searchsorted(cdf, rng.random(draw_u.size), side="right"), n_items - 1)
        keys = np.sort(np.concatenate([keys, draw_u * n_items + draw_i]))
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # np.unique's hash path is ~10x slower
    keys = _trim(keys, counts, n_items, rng)
    got = np.bincount(keys // n_items, minlength=len(counts))
    extra = []
    bounds = np.concatenate([[0], np.cumsum(got)])
    for user in np.nonzero(got < counts)[0]:
        free = np.ones(n_items, dtype=bool)
        free[keys[bounds[user] : bounds[user + 1]] - user * n_items] = False
        picked = rng.choice(np.flatnonzero(free), size=int(counts[user] - got[user]), replace=False)
        extra.append(user * n_items + picked)
    if extra:
        keys = np.sort(np.concatenate([keys, *extra]))
    return keys // n_items, keys % n_items


def _trim(keys: np.ndarray, counts: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted distinct (user, item) keys with each user's surplus over ``counts`` dropped at random."""
    users = keys // n_items
    got = np.bincount(users, minlength=len(counts))
    if not (got > counts).any():
        return keys
    order = np.argsort(users + rng.random(keys.size))  # by user, random within a user
    starts = np.concatenate([[0], np.cumsum(got)[:-1]])
    rank = np.arange(keys.size) - starts[users[order]]
    return np.sort(keys[order][rank < counts[users[order]]])


def session_times(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Timestamps per rating, user after user: a start in 1995-2019, then gaps of minutes or weeks."""
    total = int(counts.sum())
    gaps = np.where(rng.random(total) < 0.05, rng.exponential(21 * 86_400, total), rng.exponential(90, total))
    user_of = np.repeat(np.arange(len(counts)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cumulative = np.cumsum(gaps)
    offset = cumulative - (cumulative[starts] - gaps[starts])[user_of]  # restart the sum for each user
    begin = rng.integers(START, END - 86_400, size=len(counts))
    return np.minimum(begin[user_of] + offset.astype(np.int64), END)


def generate(out: Path, scale: float = 1.0, seed: int = 0, progress: bool = True) -> dict:
    """Write ``movies.csv``, ``ratings.csv`` and ``synth.json`` into ``out``; return the summary."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    n_users = max(1, round(ML25M_USERS * scale))
    n_items = max(MIN_PER_USER * 2, round(ML25M_ITEMS * scale))
    n_ratings = max(n_users * MIN_PER_USER, round(ML25M_RATINGS * scale))
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)

    titles = synthetic_titles(n_items, rng)
    _, _, genre_pool = _bundled_movies()
    genres = rng.choice(genre_pool, size=n_items)
    item_ids = np.sort(rng.choice(np.arange(1, max(MAX_ITEM_ID, n_items) + 1), size=n_items, replace=False))
    with open(out / "movies.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["movieId", "title", "genres"])
        writer.writerows(zip(item_ids.tolist(), titles, genres.tolist(), strict=True))

    counts = user_counts(n_users, n_ratings, rng, n_items)
    cdf = np.cumsum(item_weights(n_items, rng))
    rating_values, rating_p = _bundled_ratings()
    rating_text = np.asarray([f"{v:.1f}" for v in rating_values])
    per_item = np.zeros(n_items, dtype=np.int64)
    tmp = out / "ratings.csv.partial"
    with open(tmp, "w", encoding="utf-8", newline="") as fh, tqdm(
        total=n_ratings, unit="rating", unit_scale=True, desc="ratings.csv", disable=not progress, file=sys.stderr
    ) as bar:
        fh.write("userId,movieId,rating,timestamp\n")
        for first in range(0, n_users, CHUNK_USERS):
            chunk = counts[first : first + CHUNK_USERS]
            users, items = draw_distinct(chunk, cdf, rng)  # sorted by user, then item index (= movie id order)
            np.add.at(per_item, items, 1)
            # A user's times, shuffled within the user: the order of rating is not the order of movie ids.
            times = session_times(chunk, rng)[np.lexsort((rng.random(users.size), users))]
            stars = rating_text[rng.choice(len(rating_values), size=users.size, p=rating_p)]
            lines = [
                f"{u},{m},{r},{t}\n"
                for u, m, r, t in zip((users + first + 1).tolist(), item_ids[items].tolist(), stars.tolist(),
                                      times.tolist(), strict=True)
            ]
            fh.write("".join(lines))
            bar.update(users.size)
    tmp.replace(out / "ratings.csv")

    rated = np.sort(per_item)[::-1]
    summary = {
        "generator": "bench.synth_ml25m",
        "seed": seed,
        "scale": scale,
        "users": n_users,
        "items": n_items,
        "ratings": int(counts.sum()),
        "per_user": {"min": int(counts.min()), "median": float(np.median(counts)), "mean": float(counts.mean()),
                     "max": int(counts.max())},
        "per_item": {"max": int(rated[0]), "median": float(np.median(rated)), "unrated": int((rated == 0).sum()),
                     "top_1pct_share": float(rated[: max(1, n_items // 100)].sum() / rated.sum())},
        "title_chars": {"mean": float(np.mean([len(t) for t in titles])), "max": max(len(t) for t in titles)},
        "files_bytes": {name: (out / name).stat().st_size for name in ("movies.csv", "ratings.csv")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.synth_ml25m", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for movies.csv, ratings.csv, synth.json")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of ML-25M's users, items and ratings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 4:
        parser.error("--scale must be in (0, 4]")
    summary = generate(args.out, args.scale, args.seed)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
