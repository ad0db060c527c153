"""bench.synth_ml25m: a seeded ML-25M-shaped MovieLens CSV release that our own ingest reads."""

from __future__ import annotations

import csv
import json
from collections import Counter

from bench.synth_ml25m import MIN_PER_USER, ML25M_ITEMS, ML25M_RATINGS, ML25M_USERS, generate
from genrec_edge.history import HistoryDB
from genrec_edge.ingest import ingest

SCALE = 0.01  # 1,625 users, 624 titles, 250k ratings (a user rates at most 60 % of the titles)


def test_small_release_has_the_shape_and_ingests(tmp_path):
    summary = generate(tmp_path / "a", scale=SCALE, seed=3, progress=False)
    users, items, ratings = (round(n * SCALE) for n in (ML25M_USERS, ML25M_ITEMS, ML25M_RATINGS))
    assert (summary["users"], summary["items"], summary["ratings"]) == (users, items, ratings)

    with open(tmp_path / "a" / "movies.csv", encoding="utf-8", newline="") as fh:
        movies = list(csv.DictReader(fh))
    titles = [m["title"] for m in movies]
    assert len(titles) == len(set(titles)) == items
    assert all(t[-7:-5] == " (" and t[-5:-1].isdigit() and t[-1] == ")" for t in titles)  # " (YEAR)"
    with open(tmp_path / "a" / "ratings.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == ratings
    pairs = [(int(r["userId"]), int(r["movieId"])) for r in rows]
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)  # by user then movie, each rated once
    per_user = Counter(u for u, _ in pairs)
    assert len(per_user) == users and min(per_user.values()) >= MIN_PER_USER
    assert max(per_user.values()) > 3 * sorted(per_user.values())[users // 2]  # heavy raters
    per_item = Counter(m for _, m in pairs)
    # Popular and obscure titles (flatter than at full size: 1,625 users rate 25 % of 624 titles each).
    assert max(per_item.values()) > 2 * sorted(per_item.values())[len(per_item) // 2]
    assert {r["rating"] for r in rows} <= {f"{x / 2:.1f}" for x in range(1, 11)}

    report = ingest(tmp_path / "a.db", "movielens-csv", tmp_path / "a", progress=False)
    assert (report.items, report.users, report.interactions, report.skipped) == (items, users, ratings, 0)
    with HistoryDB.open(tmp_path / "a.db", readonly=True) as db:
        assert len(db.catalog().unique_titles) == items
    assert json.loads((tmp_path / "a" / "synth.json").read_text())["ratings"] == ratings


def test_same_seed_same_files(tmp_path):
    generate(tmp_path / "a", scale=SCALE / 2, seed=1, progress=False)
    generate(tmp_path / "b", scale=SCALE / 2, seed=1, progress=False)
    generate(tmp_path / "c", scale=SCALE / 2, seed=2, progress=False)
    for name in ("movies.csv", "ratings.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
