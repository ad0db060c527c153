"""A rating must lie in the range of the ratings its database holds: the same check, in the library, for
``HistoryDB.add_interaction``, ``genrec-edge history add`` and ``POST /history``."""

from __future__ import annotations

import pytest
from test_serve import http, running
from test_serve_policy import write_csv_dataset

from genrec_edge.cli import main
from genrec_edge.errors import UsageError
from genrec_edge.history import HistoryDB
from genrec_edge.ingest import ingest
from genrec_edge.serve import make_server


def _count(db_path) -> int:
    with HistoryDB.open(db_path, readonly=True) as db:
        return db.count_interactions()


def test_bundled_movielens_refuses_a_rating_of_99_over_http(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path))
    assert main(["init"]) == 0
    db_path = tmp_path / "default.db"
    with HistoryDB.open(db_path, readonly=True) as db:
        assert db.rating_range() == (0.5, 5.0)  # ml-latest-small's half-star scale
    before = _count(db_path)
    with running(make_server(db_path, port=0)) as server:
        status, body, _ = http(server.url + "/history", "POST", {"user": 1, "item_id": 1, "rating": 99})
        assert status == 400, body
        assert body == {"error": "rating 99 is outside this database's rating range, 0.5 to 5"}
        assert _count(db_path) == before  # nothing written
        for rating in (0.5, 5):
            status, body, _ = http(server.url + "/history", "POST",
                                   {"user": 1, "item_id": 1, "rating": rating, "timestamp": 2_000_000_000 + int(rating * 2)})
            assert status == 201 and body["rating"] == rating, body
        status, body, _ = http(server.url + "/history", "POST", {"user": 1, "item_id": 1, "rating": 0.4})
        assert status == 400 and "0.5 to 5" in body["error"]
    assert _count(db_path) == before + 2


def test_cli_history_add_applies_the_same_check(tiny_db, capsys):
    before = _count(tiny_db)
    rc = main(["history", "add", "--user", "1", "--item", "10", "--rating", "99", "--db", str(tiny_db)])
    err = capsys.readouterr().err
    assert rc == UsageError.exit_code
    assert err == "error: rating 99 is outside this database's rating range, 1 to 5\n"  # the tiny data: 1 to 5
    rc = main(["history", "add", "--user", "1", "--item", "10", "--rating", "nan", "--db", str(tiny_db)])
    assert rc == UsageError.exit_code
    assert capsys.readouterr().err == "error: rating must be a finite number, not nan\n"
    assert _count(tiny_db) == before
    rc = main(["history", "add", "--user", "1", "--item", "10", "--rating", "5", "--db", str(tiny_db)])
    assert rc == 0, capsys.readouterr().err
    assert _count(tiny_db) == before + 1


def test_an_ingest_while_serving_moves_the_range(tiny_db, tmp_path):
    """The range is cached per ingest: a dataset rated out of 10, ingested while the server runs, widens it."""
    with running(make_server(tiny_db, port=0)) as server:
        status, body, _ = http(server.url + "/history", "POST", {"user": 1, "item_id": 10, "rating": 8})
        assert status == 400 and "1 to 5" in body["error"]
        folder = write_csv_dataset(tmp_path / "tens", ratings=[1, 10])
        ingest(tiny_db, "csv", folder, interactions="inter.csv", items="items.csv", progress=False)
        status, body, _ = http(server.url + "/history", "POST", {"user": 1, "item_id": 10, "rating": 8})
        assert status == 201 and body["rating"] == 8, body


def test_a_database_without_ratings_takes_none(tmp_path):
    db_path = tmp_path / "implicit.db"
    folder = write_csv_dataset(tmp_path / "implicit", ratings=None)
    ingest(db_path, "csv", folder, interactions="inter.csv", items="items.csv", progress=False)
    with HistoryDB.open(db_path) as db:
        assert db.rating_range() is None
        with pytest.raises(UsageError, match=r"holds no ratings \(implicit feedback\)"):
            db.add_interaction(1, 9001, timestamp=5, rating=3.0)
        assert db.count_interactions() == 1
        assert db.add_interaction(1, 9001, timestamp=5).rating is None
        assert db.count_interactions() == 2
