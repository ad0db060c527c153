"""HistoryDB on real SQLite files: schema, order, lookups, writes and every way opening can fail."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import stat
import threading
import unicodedata

import pytest
from conftest import EMPTY_USER, TINY_HISTORIES, TINY_ITEM_IDS, TINY_TITLES, dump, tiny_rating, tiny_timestamp

from genrec_edge.catalog import catalog_sha256
from genrec_edge.cli import main
from genrec_edge.errors import DatabaseError, NotFoundError, UsageError
from genrec_edge.history import SCHEMA_VERSION, HistoryDB, _applied_migrations, migrations
from genrec_edge.paths import BUNDLED_DATASET


# ----------------------------------------------------------------------------- schema
def test_schema_matches_the_architecture(tiny_db):
    conn = sqlite3.connect(tiny_db)
    sql = {name: s for name, s in conn.execute("SELECT name, sql FROM sqlite_master")}
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    pk = [r[1] for r in sorted(conn.execute("PRAGMA table_info(interactions)"), key=lambda r: r[5]) if r[5]]
    assert pk == ["user_id", "timestamp", "item_id"]
    assert "WITHOUT ROWID" in sql["interactions"]
    assert [r[2] for r in conn.execute("PRAGMA index_info(idx_interactions_item)")] == ["item_id"]
    assert {"datasets", "items", "users", "interactions"} <= set(sql)
    # A user's history is a range scan of the primary key, never a sort of the table.
    plan = " ".join(
        r[3]
        for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT item_id FROM interactions WHERE user_id = 4 ORDER BY timestamp, item_id"
        )
    )
    assert "USING PRIMARY KEY" in plan and "TEMP B-TREE" not in plan
    conn.close()


def test_readonly_open_of_an_old_schema_is_refused_then_upgraded(tmp_path):
    import sqlite_utils

    path = tmp_path / "old.db"
    old = sqlite_utils.Database(path)
    migrations().apply(old, stop_before="m002_items_title_index")
    old.close()
    with pytest.raises(DatabaseError, match="schema is version 1, this genrec-edge needs 2"):
        HistoryDB.open(path, readonly=True)
    with HistoryDB.open(path) as db:
        assert db.schema_version() == SCHEMA_VERSION == 2
    assert "idx_items_title" in {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}


def test_applied_migrations_are_read_as_sqlite_utils_reads_them(tmp_path, tiny_db):
    import sqlite_utils

    path = tmp_path / "old.db"
    old = sqlite_utils.Database(path)
    assert _applied_migrations(old.conn) == [] == migrations().applied(old)  # no table yet
    migrations().apply(old, stop_before="m002_items_title_index")
    for conn in (old.conn, sqlite3.connect(tiny_db)):
        ours = _applied_migrations(conn)
        assert ours == [m.name for m in migrations().applied(sqlite_utils.Database(conn))] and ours
    assert _applied_migrations(old.conn) == ["m001_initial"]


def test_opening_an_up_to_date_database_does_not_import_sqlite_utils(tiny_db):
    """sqlite_utils imports pandas where it is installed (~0.45 s): only a create or an upgrade needs it."""
    import subprocess
    import sys

    code = ("import sys; from genrec_edge.history import HistoryDB\n"
            f"for ro in (True, False):\n    with HistoryDB.open({str(tiny_db)!r}, readonly=ro) as db: db.history(1)\n"
            "print(sorted(m for m in ('sqlite_utils', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_unknown_future_migration_is_refused(tiny_db):
    conn = sqlite3.connect(tiny_db)
    with conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations(migration_set, name, applied_at) VALUES ('genrec_edge', 'm999_x', 'now')"
        )
    conn.close()
    with pytest.raises(DatabaseError, match=r"schema is newer than this genrec-edge \(unknown migrations \['m999_x'\]\)"):
        HistoryDB.open(tiny_db)


# ----------------------------------------------------------------------------- reads
def test_history_is_chronological_with_titles_ratings_and_ties_by_item_id(tiny_db):
    with HistoryDB.open(tiny_db, readonly=True) as db:
        for user, items in TINY_HISTORIES.items():
            history = db.history(user)
            assert [h.item_id for h in history] == items
            assert [h.title for h in history] == [TINY_TITLES[i] for i in items]
            assert [h.rating for h in history] == [tiny_rating(user, p) for p in range(len(items))]
            assert [h.timestamp for h in history] == [tiny_timestamp(user, p) for p in range(len(items))]
        tied = db.history(3)
        assert tied[1].timestamp == tied[2].timestamp and [h.item_id for h in tied[1:]] == [120, 130]


def test_history_limit_keeps_the_last_n_oldest_first(tiny_db):
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert [h.item_id for h in db.history(7, limit=3)] == [50, 40, 30]
        assert db.history(7, limit=0) == []
        assert [h.item_id for h in db.history(6, limit=5)] == [90]


def test_sequences_users_catalog_and_dataset(tiny_db):
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert dict(db.sequences()) == TINY_HISTORIES
        assert [u for u, _ in db.sequences()] == sorted(TINY_HISTORIES)
        assert db.users() == sorted([*TINY_HISTORIES, EMPTY_USER])
        catalog = db.catalog()
        assert list(catalog.item_ids) == TINY_ITEM_IDS
        assert list(catalog.titles) == [TINY_TITLES[i] for i in TINY_ITEM_IDS]
        dataset = db.dataset()
        assert dataset.name == "tiny-ml" and dataset.source.startswith("movielens-csv:")
        assert dataset.catalog_sha256 == catalog.sha256 == catalog_sha256(list(TINY_TITLES.items()))
        assert db.count_interactions() == sum(map(len, TINY_HISTORIES.values()))
        assert db.quick_check() == "ok"
        assert db.seen_items(4) == set(TINY_HISTORIES[4])


def test_items_lookup_search_and_year(tiny_db):
    with HistoryDB.open(tiny_db, readonly=True) as db:
        amelie = db.item(130)
        assert amelie.title.startswith("Amélie") and amelie.year == 2001
        assert db.item(110).title == 'Quote "Me" (2001)' and db.item(120).title == "Back\\slash (2002)"
        assert db.item(10).genres == ("Adventure", "Animation", "Children", "Comedy", "Fantasy")
        assert db.item(40).genres == ()  # "(no genres listed)"
        assert [i.id for i in db.item_by_title("Heat (1995)")] == [30]
        assert [i.id for i in db.item_by_title(unicodedata.normalize("NFD", amelie.title))] == [130]
        assert db.item_by_title("Heat") == []
        # Exact title first, then prefix matches, then the rest by id; case-insensitive.
        assert [i.id for i in db.find_items("matrix")] == [150, 160]
        assert [i.id for i in db.find_items("Alien")] == [170, 180]
        assert [i.id for i in db.find_items("Aliens (1986)")] == [180]
        assert [i.id for i in db.find_items("(1995)", limit=3)] == [10, 20, 30]
        assert db.find_items("100%") == [] and db.find_items("_") == []
        with pytest.raises(UsageError, match="NUL"):
            db.find_items("\x00")  # SQLite's LIKE stops at a NUL: it matched every title
        assert [i.id for i in db.find_items("\\")] == [120]
        # Case is ignored in every script, not only ASCII (SQLite's LIKE): "AMÉLIE" finds "Amélie".
        assert [i.id for i in db.find_items("AMÉLIE")] == [i.id for i in db.find_items("amélie")] == [130]
        assert [i.id for i in db.find_items("ALIEN")] == [170, 180]


def test_unknown_user_and_item(tiny_db):
    with HistoryDB.open(tiny_db) as db:
        with pytest.raises(NotFoundError, match=r"^unknown user 99999$"):
            db.history(99999)
        with pytest.raises(NotFoundError, match=r"^unknown user 99999$"):
            db.seen_items(99999)
        with pytest.raises(NotFoundError, match=r"^unknown item 12345$"):
            db.item(12345)
        with pytest.raises(NotFoundError, match=r"^unknown item 12345$"):
            db.add_interaction(1, 12345)
        assert db.history(EMPTY_USER) == []


# ----------------------------------------------------------------------------- writes
def test_add_interaction_creates_the_user_and_keeps_order(tiny_db):
    before = dump(tiny_db)
    with HistoryDB.open(tiny_db) as db:
        added = db.add_interaction(500, 30, timestamp=2_000_000_000, rating=4.5)
        assert (added.item_id, added.title, added.timestamp, added.rating) == (30, "Heat (1995)", 2_000_000_000, 4.5)
        db.add_interaction(500, 10, timestamp=1_000_000_000)
        db.add_interaction(500, 10, timestamp=1_000_000_000, rating=1.0)  # same key: the first one stays
        assert [(h.item_id, h.rating) for h in db.history(500)] == [(10, None), (30, 4.5)]
        assert 500 in db.users()
        now = db.add_interaction(1, 200)
        assert db.history(1)[-1].item_id == 200 and now.timestamp > tiny_timestamp(8, 99)
    assert dump(tiny_db) != before


# ----------------------------------------------------------------------------- bad files
def test_missing_database(tmp_path):
    path = tmp_path / "nope.db"
    with pytest.raises(DatabaseError, match=r"^no database at .*nope\.db \(run `genrec-edge init`\)$"):
        HistoryDB.open(path)
    assert not path.exists()


def test_not_a_sqlite_file(tmp_path):
    path = tmp_path / "text.db"
    path.write_text("hello, this is not a database at all" * 10)
    with pytest.raises(DatabaseError, match=r"^not a SQLite database: .*text\.db$"):
        HistoryDB.open(path)
    with pytest.raises(DatabaseError, match=r"^not a SQLite database: "):
        HistoryDB.open(path, readonly=True)
    assert path.read_text().startswith("hello")


def test_a_foreign_sqlite_file_is_not_taken_over(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseError, match=r"not a genrec-edge database \(it has tables \['notes'\]\)"):
        HistoryDB.open(path)


def test_locked_by_another_writer(tiny_db):
    other = sqlite3.connect(tiny_db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO users(id) VALUES (777)")
    try:
        with HistoryDB.open(tiny_db, busy_timeout=0.2) as db:
            assert len(db.history(1)) == 5  # WAL: readers are not blocked by the writer
            with pytest.raises(DatabaseError, match=r"^database is locked by another writer \(waited 0\.2 s\): "):
                db.add_interaction(1, 200, timestamp=5)
        rc_main = main(["history", "add", "--user", "1", "--item", "200", "--db", str(tiny_db), "--busy-timeout", "0.2"])
        assert rc_main == DatabaseError.exit_code
    finally:
        other.rollback()
        other.close()
    with HistoryDB.open(tiny_db) as db:
        assert 777 not in db.users() and [h.item_id for h in db.history(1)] == TINY_HISTORIES[1]


def test_read_only_file(tiny_db):
    before = dump(tiny_db)
    os.chmod(tiny_db, stat.S_IRUSR | stat.S_IRGRP)
    try:
        with pytest.raises(DatabaseError, match=r"^database is read-only: .*tiny\.db \(fix its permissions"):
            HistoryDB.open(tiny_db)
        with HistoryDB.open(tiny_db, readonly=True) as db:
            assert [h.item_id for h in db.history(2)] == TINY_HISTORIES[2]
            with pytest.raises(DatabaseError, match=r"^database is read-only: "):
                db.add_interaction(2, 10)
    finally:
        os.chmod(tiny_db, stat.S_IRUSR | stat.S_IWUSR)
    assert dump(tiny_db) == before


# ----------------------------------------------------------------------------- the done-when check
def test_init_then_history_show_user_42(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GENREC_EDGE_HOME", str(tmp_path / "home"))
    with open(BUNDLED_DATASET / "ratings.csv", encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["userId"] == "42"]
    expected = [int(r["movieId"]) for r in sorted(rows, key=lambda r: (int(r["timestamp"]), int(r["movieId"])))]
    assert len(expected) == 440

    assert main(["init"]) == 0
    assert (tmp_path / "home" / "default.db").exists()
    capsys.readouterr()
    assert main(["history", "show", "--user", "42", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in shown] == expected
    assert [r["timestamp"] for r in shown] == sorted(r["timestamp"] for r in shown)

    assert main(["history", "show", "--user", "42"]) == 0
    table = capsys.readouterr().out
    assert "Runaway Bride (1999)" in table and "440" in table


# ----------------------------------------------------------------------------- CLI: one line and an exit code
def _run(capsys, *args):
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


def test_cli_bad_input_messages_and_exit_codes(tiny_db, tmp_path, capsys):
    db = str(tiny_db)
    assert _run(capsys, "history", "show", "--user", "99999", "--db", db) == (4, "", "error: unknown user 99999")
    assert _run(capsys, "history", "add", "--user", "1", "--item", "12345", "--db", db) == (
        4, "", "error: unknown item 12345",
    )  # fmt: skip
    missing = tmp_path / "missing.db"
    assert _run(capsys, "history", "show", "--user", "1", "--db", str(missing)) == (
        3, "", f"error: no database at {missing} (run `genrec-edge init`)",
    )  # fmt: skip
    assert not missing.exists()
    text = tmp_path / "notes.txt"
    text.write_text("not sqlite " * 100)
    assert _run(capsys, "items", "search", "x", "--db", str(text)) == (3, "", f"error: not a SQLite database: {text}")
    # A user with no interactions: not an error, an explicit message (JSON: an empty list).
    assert _run(capsys, "history", "show", "--user", str(EMPTY_USER), "--db", db) == (
        0, f"user {EMPTY_USER} has no interactions yet (add one with `genrec-edge history add`)\n", "",
    )  # fmt: skip
    assert _run(capsys, "history", "show", "--user", str(EMPTY_USER), "--db", db, "--json") == (0, "[]\n", "")
    rc, _, err = _run(capsys, "history", "add", "--user", "1", "--db", db)
    assert (rc, err) == (2, "error: give exactly one of --item ID or --title TITLE")


def test_cli_history_add_by_title_and_show(tiny_db, capsys):
    db = str(tiny_db)
    rc, out, _ = _run(capsys, "history", "add", "--user", "1", "--title", "Heat (1995)", "--rating", "4.5",
                      "--timestamp", "2000000000", "--db", db)  # fmt: skip
    assert rc == 0 and "user 1: added item 30 'Heat (1995)' at 2033-05-18 03:33:20 UTC" in out
    rc, _, err = _run(capsys, "history", "add", "--user", "1", "--title", "Matrix", "--db", db)
    assert rc == 4
    assert err == "error: no item titled 'Matrix'; did you mean: 'Matrix, The (1999)' (id 150), " \
                  "'Matrix Reloaded, The (2003)' (id 160)"
    rc, out, _ = _run(capsys, "history", "show", "--user", "1", "--db", db, "--json", "--limit", "2")
    assert [(r["item_id"], r["rating"]) for r in json.loads(out)] == [(50, tiny_rating(1, 4)), (30, 4.5)]
    rc, out, _ = _run(capsys, "history", "show", "--user", "1", "--db", db, "--limit", "2")
    assert "the last 2 of 6 interactions" in out and "Heat (1995)" in out


def test_cli_duplicate_title_lists_candidates(tiny_db, capsys):
    import sqlite3 as sq

    conn = sq.connect(tiny_db)
    with conn:
        conn.execute("INSERT INTO items(id, title) VALUES (999, 'Heat (1995)')")
    conn.close()
    rc, _, err = _run(capsys, "history", "add", "--user", "1", "--title", "Heat (1995)", "--db", str(tiny_db))
    assert (rc, err) == (2, "error: title 'Heat (1995)' matches 2 items (ids 30, 999): use --item ID")


def test_cli_items_search(tiny_db, capsys):
    rc, out, _ = _run(capsys, "items", "search", "alien", "--db", str(tiny_db), "--json")
    assert rc == 0 and [r["item_id"] for r in json.loads(out)] == [170, 180]
    rc, out, _ = _run(capsys, "items", "search", "amélie", "--db", str(tiny_db), "--limit", "1")
    assert rc == 0 and "130" in out
    assert _run(capsys, "items", "search", "zzz", "--db", str(tiny_db)) == (0, "no item title contains 'zzz'\n", "")


def test_cli_read_only_file_reads_but_refuses_writes(tiny_db, capsys):
    os.chmod(tiny_db, stat.S_IRUSR)
    try:
        rc, out, _ = _run(capsys, "history", "show", "--user", "2", "--db", str(tiny_db), "--json")
        assert rc == 0 and [r["item_id"] for r in json.loads(out)] == TINY_HISTORIES[2]
        rc, _, err = _run(capsys, "history", "add", "--user", "2", "--item", "10", "--db", str(tiny_db))
        assert (rc, err) == (3, f"error: database is read-only: {tiny_db} (fix its permissions or open it read-only)")
    finally:
        os.chmod(tiny_db, stat.S_IRUSR | stat.S_IWUSR)


def test_numpy_ids_and_bad_limits(tiny_db):
    import numpy as np

    from genrec_edge.errors import NotFoundError, UsageError

    with HistoryDB.open(tiny_db) as db:
        assert [h.item_id for h in db.history(np.int64(1))] == TINY_HISTORIES[1]
        assert db.item(np.int64(10)).id == 10
        assert db.add_interaction(np.int64(1), np.int32(10), timestamp=np.int64(7)).timestamp == 7
        assert [h.item_id for h in db.history(1, limit=np.int64(1))] == [db.history(1)[-1].item_id]
        for limit in (-1, "3", 2.5, True):
            with pytest.raises(UsageError, match="limit must be a whole number"):
                db.history(1, limit=limit)
        with pytest.raises(UsageError, match="not a whole number"):
            db.add_interaction("1", 10)
        with pytest.raises(NotFoundError, match="unknown user abc"):
            db.history("abc")
        with pytest.raises(UsageError, match="is a string"):
            db.find_items(None)


def test_cli_history_add_says_when_the_interaction_was_already_there(tiny_db, capsys):
    args = ["history", "add", "--user", "1", "--item", "10", "--timestamp", "77", "--db", str(tiny_db)]
    assert main([*args, "--rating", "4"]) == 0
    assert "added item 10" in capsys.readouterr().out
    assert main([*args, "--rating", "2"]) == 0
    out = capsys.readouterr().out
    assert "was already recorded, rating 4; kept as it was" in " ".join(out.split())
    with HistoryDB.open(tiny_db, readonly=True) as db:
        assert [(h.item_id, h.rating) for h in db.history(1) if h.timestamp == 77] == [(10, 4.0)]


def test_misuse_is_a_usage_error_not_a_raw_exception(tiny_db, tmp_path):
    import numpy as np

    from genrec_edge.errors import FileAccessError, UsageError

    with HistoryDB.open(tiny_db, readonly=True) as db:
        for bad in ({"limit": None}, {"limit": "x"}, {"limit": 1.5}, {"limit": -1}, {"limit": 0}):
            with pytest.raises(UsageError):
                db.find_items("a", **bad)  # TypeError, "datatype mismatch" (exit 3) or everything (-1) before
        assert len(db.find_items("(1995)", limit=np.int64(2))) == 2  # numpy ints are fine, as elsewhere
        with pytest.raises(UsageError):
            db.find_items("x" * 60_000)  # SQLite's "LIKE pattern too complex", blamed on the database
        assert db.find_items("\ud800") == [] and db.item_by_title("\ud800") == []  # no UnicodeEncodeError
        with pytest.raises(UsageError):
            db.item_by_title(None)
    closed = HistoryDB.open(tiny_db, readonly=True)
    closed.close()
    for call in (lambda: closed.history(1), lambda: closed.catalog(), lambda: closed.users()):
        with pytest.raises(UsageError, match="closed"):  # sqlite3.ProgrammingError escaped
            call()
    with pytest.raises(UsageError):
        HistoryDB.open(None)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(FileAccessError):
        HistoryDB.open(a_file / "sub" / "x.db", create=True)
    other = HistoryDB.open(tiny_db, readonly=True)
    errors = []
    thread = threading.Thread(target=lambda: errors.append(_raises(other.close)))
    thread.start()
    thread.join()
    assert errors == [UsageError]
    other.close()


def _raises(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        return type(exc)
    return None
